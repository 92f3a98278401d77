"""safetensors on disk: tensors read lazily one at a time (or by rows), and shards written as tensors arrive."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ConfigError, InputError
from .dtypes import SAFETENSORS_DTYPES, TORCH_DTYPES, element_size

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "2GB"  # the largest shard written, as transformers' save_pretrained


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; a damaged file is an :class:`InputError` naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{file} is not valid JSON ({str(exc).splitlines()[0]}); the model is damaged: "
                         f"download or save it again") from None
    if not isinstance(data, dict):
        raise InputError(f"{file} holds a JSON {type(data).__name__}, not an object; the model is damaged: "
                         f"download or save it again")
    return data


def _shard_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} has no weight_map; the model is damaged: download or save it again")
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path} holds no safetensors weights (convert .bin checkpoints with save_pretrained)")
    return {name: file for file in files for name in read_header(file)}


class Checkpoint:
    """A full transformers checkpoint directory, read lazily, one tensor at a time.

    Each read opens the shard, copies the one tensor out and closes it again, so
    the shard's memory map never keeps a whole input resident.
    """

    kind = "checkpoint"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise InputError(f"{self.path} is not a transformers model directory (no config.json); give the "
                             f"directory that holds config.json and the weights")
        self.config = read_json(self.path / "config.json")
        self.files = _shard_files(self.path)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            for name, (shape, dtype) in read_header(file).items():
                self._meta[name] = (shape, dtype)
        missing = [n for n in self.files if n not in self._meta]
        if missing:
            raise InputError(f"{self.path}: the index names tensors its shards lack, e.g. {missing[:2]}")

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        return self._meta[name][1]

    def has(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        file = self.files[name]
        try:
            with safe_open(file, "pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"cannot read {name} from {file}: {exc}") from None

    def rows(self, name: str) -> "FileRows":
        """A reader of row ranges of tensor ``name`` (see :class:`FileRows`)."""
        file = self.files[name]
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            info = json.loads(handle.read(length))[name]
        shape, dtype = self._meta[name]
        return FileRows(file, 8 + length + int(info["data_offsets"][0]), shape, TORCH_DTYPES[dtype])


class TensorRows:
    """Row ranges of an in-memory tensor, the interface of :class:`FileRows`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]


class FileRows:
    """Rows ``start:stop`` (along the first dimension) of one tensor of a safetensors file, read with
    plain reads into a new buffer: no memory map, so only the rows asked for become resident."""

    def __init__(self, file: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.file, self.offset, self.shape, self.dtype = Path(file), offset, tuple(shape), dtype
        self.row_bytes = math.prod(shape[1:]) * element_size(dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        size = (stop - start) * self.row_bytes
        buffer = torch.empty(size, dtype=torch.uint8)
        with open(self.file, "rb") as handle:
            handle.seek(self.offset + start * self.row_bytes)
            got = handle.readinto(buffer.numpy()) if size else 0
        if got != size:
            raise InputError(f"{self.file} ended inside a tensor: download or save the model again")
        return buffer.view(self.dtype).reshape((stop - start, *self.shape[1:]))


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype) from a shard's header, checked against the file size."""
    again = "download or save the model again"
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or length > size - 8:
                raise ValueError("header length is out of range")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            out[name] = (tuple(int(d) for d in info["shape"]), str(info["dtype"]))
            end = max(end, int(info["data_offsets"][1]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"{file} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                         f"{again}") from None
    if 8 + length + end > size:
        raise InputError(f"{file} is truncated ({size} bytes, its header describes {8 + length + end}): {again}")
    return out


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", size.upper())
    if not match:
        raise ConfigError(f"cannot read the shard size {size!r} (e.g. 2GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def parse_count(size: str | int) -> int:
    """mergekit's sizes (``--out-shard-size 1B``): a whole number, or one with K, M or B for a thousand, a
    million, a billion (its shard writer counts them as bytes)."""
    if isinstance(size, int):
        return size
    text = size.strip()
    scale = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise ConfigError(f"cannot read the size {size!r}: a whole number, or one followed by K, M or B "
                          f"(thousand, million, billion), e.g. 5B")
    return int(digits) * scale


class ShardWriter:
    """Streams tensors into safetensors shards as they are produced.

    The plan (names, shapes, dtypes, in order) is known before the merge, so
    each shard's header is written first and every tensor's bytes are appended
    the moment it is ready: memory holds one output tensor, not the output.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE):
        self.out_dir = Path(out_dir)
        max_bytes = parse_size(max_shard_size)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        used = 0
        for entry in plan:
            size = _nbytes(entry[1], entry[2])
            if self.shards[-1] and used + size > max_bytes:
                self.shards.append([])
                used = 0
            self.shards[-1].append(entry)
            used += size
        count = len(self.shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.order = [(name, shape, dtype, i) for i, shard in enumerate(self.shards) for name, shape, dtype in shard]
        self.position = 0
        self.handle = None
        self.current = -1

    def _open(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {}, 0
        for name, shape, dtype in self.shards[index]:
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.handle = open(self.out_dir / self.files[index], "wb")
        self.handle.write(len(encoded).to_bytes(8, "little"))
        self.handle.write(encoded)
        self.current = index

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, dtype, shard = self.order[self.position]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"writer expected {expected} {tuple(shape)} {dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if shard != self.current:
            self._open(shard)
        data = tensor.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            self.handle.write(data.view(torch.uint8).numpy())
        self.position += 1

    def add_chunks(self, name: str, chunks) -> None:
        """Write the next planned tensor from ``chunks``: pieces of it in row-major order (of its
        planned dtype), whose bytes together make the tensor's."""
        expected, shape, dtype, shard = self.order[self.position]
        if name != expected:
            raise ValueError(f"writer expected {expected}, got {name}")
        if shard != self.current:
            self._open(shard)
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"writer expected {dtype} for {name}, got a {chunk.dtype} piece")
            data = chunk.detach().contiguous().cpu().reshape(-1)
            if data.numel():
                self.handle.write(data.view(torch.uint8).numpy())
            written += data.numel()
        if written != math.prod(shape):
            raise ValueError(f"writer got {written} entries for {name}, planned {tuple(shape)}")
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.order):
            raise ValueError(f"writer got {self.position} of {len(self.order)} planned tensors")
        if self.handle is not None:
            self.handle.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[shard] for name, _, _, shard in self.order}
            total = sum(_nbytes(shape, dtype) for _, shape, dtype, _ in self.order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * element_size(dtype)
