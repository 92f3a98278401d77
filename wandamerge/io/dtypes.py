"""The one dtype table: the names users write, the codes safetensors stores, and torch's dtypes."""

from __future__ import annotations

import torch

from ..errors import ConfigError

# Weight dtypes a user may ask for (command line, recipes), by name.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
_BY_NAME = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# safetensors' dtype codes.
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype by name (``float32``/``fp32``, ``float16``/``fp16``, ``bfloat16``/``bf16``); ``None`` and
    ``"auto"`` give None, a torch dtype is returned as is."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _BY_NAME:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    return _BY_NAME[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).split(".")[1]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
