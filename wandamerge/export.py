"""2:4-pruned weights as PyTorch semi-structured sparse tensors (GPU inference).

A weight pruned with ``pattern="2:4"`` keeps at most 2 of every 4 consecutive
inputs of a row. NVIDIA Ampere and later GPUs (sm80+) multiply such a matrix
with sparse tensor cores; PyTorch exposes them as
:class:`torch.sparse.SparseSemiStructuredTensor`, a tensor subclass that
``F.linear`` dispatches to cuSPARSELt (the default) or CUTLASS.
:func:`to_semi_structured` swaps the weight of every 2:4 ``nn.Linear`` in the
decoder blocks for such a tensor, in place; the model then runs as before
(``model(...)``, :func:`wandamerge.evaluation.perplexity.perplexity`, a manual
decoding loop), only its decoder linear maps use the sparse kernels.

What PyTorch supports (``torch/sparse/semi_structured.py``):

* CUDA tensors only, sm80 or newer; 2-D and contiguous.
* float16 / bfloat16 (both backends also take int8, CUTLASS float32, but
  Hugging Face linear maps hold float16/bfloat16 weights; only those are
  converted here).
* shape: both dimensions at least, and multiples of, the backend's minimum:
  cuSPARSELt 16 x 16 for float16/bfloat16; CUTLASS 32 rows x 64 columns.
  The dense operand (the tokens) is padded by PyTorch itself, to a multiple
  of 8 rows, inside the matmul; no padding is needed here.
* backend: cuSPARSELt unless ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is
  set; ``backend="auto"`` here also falls back to CUTLASS when this PyTorch
  build has no cuSPARSELt. PyTorch's CUTLASS kernels run on sm8x only (A100,
  RTX 30/40): on Hopper (sm90) only cuSPARSELt works, so CUTLASS is refused
  there rather than converted into a weight that cannot be multiplied.

GPT-2's ``Conv1D`` stores its weight transposed, ``(in, out)``, and multiplies
with ``addmm(bias, x, W)``; semi-structured tensors compress along the last
dimension, so the stored weight is not 2:4 along the dimension the kernel
needs. Conv1D maps are therefore not converted: they are refused
(``strict=True``) or skipped with that reason (``strict=False``).

Converted weights cannot be saved with ``save_pretrained`` nor moved off the
GPU except to the CPU (densified); convert as the last step before inference.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .models import block_linears, block_prefix, decoder_blocks

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SUPPORTED_DTYPES", "Converted", "check_2of4", "conversion_problem",
           "resolve_backend", "semi_structured_weight", "to_semi_structured"]

BACKENDS = ("auto", "cusparselt", "cutlass")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
CONV1D_REASON = ("GPT-2 Conv1D stores its weight transposed (in, out); semi-structured tensors compress "
                 "along the last dimension, so Conv1D maps are not converted")


class Converted(list):
    """The full parameter names converted (a ``list[str]``), with ``skipped``: name -> reason."""

    def __init__(self, names=(), skipped: dict[str, str] | None = None):
        super().__init__(names)
        self.skipped: dict[str, str] = dict(skipped or {})


def check_2of4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs in each row of ``weight`` (out, in) has >= 2 zeros.

    A width not divisible by 4 cannot be 2:4 (False). The weight is not modified.
    """
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return True
    if weight.ndim != 2:
        raise ValueError(f"check_2of4 needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        return False
    zeros = (weight.detach() == 0).reshape(rows, cols // 4, 4).sum(-1)
    return bool((zeros >= 2).all())


def resolve_backend(backend: str = "auto") -> type:
    """The ``SparseSemiStructuredTensor`` subclass ``backend`` names ("auto": what PyTorch would pick)."""
    from torch.sparse import SparseSemiStructuredTensor as Base
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CuSparseLt
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cutlass" or (backend == "auto" and (Base._FORCE_CUTLASS or not _has_cusparselt())):
        return Cutlass
    return CuSparseLt


def _has_cusparselt() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except Exception:  # pragma: no cover - builds without the backend module
        return False


def _device_ok(weight: torch.Tensor) -> bool:
    """A CUDA tensor on an sm80+ device (the hook tests replace to exercise the logic on the CPU)."""
    return weight.is_cuda and torch.cuda.get_device_capability(weight.device) >= (8, 0)


def _where(weight: torch.Tensor) -> str:
    if weight.is_cuda:
        major, minor = torch.cuda.get_device_capability(weight.device)
        return f"cuda sm{major}{minor}"
    return weight.device.type


def conversion_problem(weight: torch.Tensor, *, backend: str = "auto") -> str | None:
    """Why ``weight`` (out, in) cannot become a semi-structured sparse tensor, or None if it can."""
    dtype = str(weight.dtype).removeprefix("torch.")
    if not _device_ok(weight) or weight.dtype not in SUPPORTED_DTYPES:
        return ("semi-structured sparse tensors need a CUDA device (sm80+) and float16/bfloat16 weights; "
                f"got {_where(weight)} {dtype}")
    if backend == "cusparselt" and not _has_cusparselt():
        return "this PyTorch build has no cuSPARSELt; use backend='cutlass' or 'auto'"
    if weight.ndim != 2:
        return f"semi-structured sparse tensors need a 2-D weight, got shape {tuple(weight.shape)}"
    cls = resolve_backend(backend)
    if cls.BACKEND == "cutlass" and weight.is_cuda and torch.cuda.get_device_capability(weight.device)[0] != 8:
        # PyTorch's CUTLASS sparse GEMM checks for compute capability 8.x at matmul time
        hint = "use backend='cusparselt'" if _has_cusparselt() else "this PyTorch build has no cuSPARSELt either"
        return f"PyTorch's CUTLASS semi-structured kernels run on sm8x GPUs only, got {_where(weight)}; {hint}"
    limits = cls._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
    rows, cols = weight.shape
    min_rows, min_cols = limits.sparse_min_rows, limits.sparse_min_cols
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return (f"semi-structured sparse tensors ({cls.BACKEND}, {dtype}) need out_features a multiple of "
                f"{min_rows} and in_features a multiple of {min_cols}; got {rows}x{cols}")
    if not check_2of4(weight):
        return ("weight is not 2:4 sparse (a group of 4 consecutive inputs keeps more than 2); "
                "prune it with pattern='2:4' first")
    return None


def _compress(weight: torch.Tensor, cls: type) -> torch.Tensor:
    """``to_sparse_semi_structured(weight)``, through the backend class when it is not PyTorch's default."""
    from torch.sparse import SparseSemiStructuredTensor as Base
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CuSparseLt
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    default = Cutlass if Base._FORCE_CUTLASS else CuSparseLt
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")
        if cls is default:
            return torch.sparse.to_sparse_semi_structured(weight)
        return cls.from_dense(weight)


def semi_structured_weight(weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """One 2:4 weight (out, in) as a semi-structured sparse tensor; ValueError with the reason if it cannot be."""
    problem = conversion_problem(weight, backend=backend)
    if problem:
        raise ValueError(problem)
    return _compress(weight.detach().contiguous(), resolve_backend(backend))


def to_semi_structured(model: nn.Module, *, strict: bool = True, backend: str = "auto") -> Converted:
    """Swap the weight of every 2:4 ``nn.Linear`` in the decoder blocks for a semi-structured sparse tensor.

    Returns the full parameter names converted (e.g. ``model.layers.0.mlp.down_proj.weight``), as a
    list whose ``skipped`` attribute maps each map not converted to the reason. With ``strict=True``
    (default) any map that cannot be converted (CPU, float32, an unsupported shape, a weight that is
    not 2:4, a GPT-2 Conv1D) raises a one-line ``ValueError`` before any weight is touched; with
    ``strict=False`` such maps are left dense and reported in ``skipped``. A weight that is not 2:4
    is never densified nor pruned here. Maps already converted are left alone (listed in
    ``skipped`` as "already semi-structured", never an error). Embeddings and the LM head stay dense.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    blocks = decoder_blocks(model)
    prefix = block_prefix(model)
    plan: list[tuple[str, nn.Linear]] = []
    problems: dict[str, str] = {}
    already: dict[str, str] = {}
    for index, block in enumerate(blocks):
        for linear in block_linears(block):
            name = f"{prefix}.{index}.{linear.name}.weight"
            if linear.transposed:
                problems[name] = CONV1D_REASON
                continue
            weight = linear.module.weight
            if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
                already[name] = "already semi-structured"
                continue
            problem = conversion_problem(weight, backend=backend)
            if problem:
                problems[name] = problem
            else:
                plan.append((name, linear.module))

    if problems and strict:
        first_name, first = next(iter(problems.items()))
        total = len(plan) + len(problems) + len(already)
        if len(problems) == total and len(set(problems.values())) == 1:
            where = f"all {total} decoder linear maps"
        else:
            where = f"{first_name}" + (f" and {len(problems) - 1} more of {total} maps" if len(problems) > 1 else "")
        raise ValueError(f"{first} ({where}; strict=False skips such maps)")

    cls = resolve_backend(backend)
    converted = Converted(skipped={**problems, **already})
    with torch.no_grad():
        for name, module in plan:
            sparse = _compress(module.weight.detach().contiguous(), cls)
            module.weight = nn.Parameter(sparse, requires_grad=False)
            converted.append(name)
    if problems:
        reasons = sorted(set(problems.values()))
        log.warning("%d decoder linear map(s) left dense: %s", len(problems), "; ".join(reasons))
    log.info("%d decoder linear maps converted to semi-structured sparse tensors (%s)", len(converted), cls.BACKEND)
    return converted
