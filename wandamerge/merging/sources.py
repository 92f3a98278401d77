"""Lazy access to the tensors of merge inputs, and a streaming shard writer.

A full checkpoint is read tensor by tensor from its safetensors shards
(``safe_open``), so a merge holds one tensor per input at a time. A PEFT LoRA
adapter is seen as the checkpoint it would give when merged into the base:
its delta for an adapted matrix is ``scaling * B @ A``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A merge input that cannot be used, with a message saying why."""


def _shard_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path} holds no safetensors weights (convert .bin checkpoints with save_pretrained)")
    mapping = {}
    for file in files:
        try:
            with safe_open(file, "pt") as handle:
                mapping.update({name: file for name in handle.keys()})
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{file} is not a readable safetensors file: {exc}") from None
    return mapping


class Checkpoint:
    """A full transformers checkpoint directory, read lazily."""

    kind = "checkpoint"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise InputError(f"{self.path} is not a transformers model directory (no config.json)")
        self.config = json.loads((self.path / "config.json").read_text())
        self.files = _shard_files(self.path)
        self._handles: dict[Path, object] = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, "pt")
            except Exception as exc:
                raise InputError(f"{file} is not a readable safetensors file: {exc}") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def has(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.files[name]).get_tensor(name)
        except KeyError:
            raise
        except Exception as exc:
            raise InputError(f"cannot read {name} from {self.files[name]}: {exc}") from None

    def close(self) -> None:
        self._handles.clear()


class LoraAdapter:
    """A PEFT LoRA adapter directory, seen as deltas on the base's tensor names."""

    kind = "lora"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_file = self.path / "adapter_config.json"
        if not config_file.is_file():
            raise InputError(f"{self.path} is not a PEFT adapter (no adapter_config.json)")
        self.config = json.loads(config_file.read_text())
        if self.config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{self.path}: only LoRA adapters can be merged, not {self.config.get('peft_type')}")
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            raise InputError(f"{self.path} has no adapter_model.safetensors")
        with safe_open(weights, "pt") as handle:
            self._tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        self.rank = int(self.config.get("r", 8))
        self.alpha = float(self.config.get("lora_alpha", self.rank))
        self.rslora = bool(self.config.get("use_rslora", False))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.base_model_name = self.config.get("base_model_name_or_path")
        self.pairs: dict[str, tuple[str, str]] = {}  # base tensor name -> (A key, B key)
        self.full: dict[str, str] = {}  # base tensor name -> key of a fully saved module
        for key in self._tensors:
            match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight$", key)
            if match:
                module = match.group(1)
                b_key = key.replace(".lora_A", ".lora_B")
                if b_key not in self._tensors:
                    raise InputError(f"{self.path}: {key} has no matching lora_B")
                self.pairs[f"{module}.weight"] = (key, b_key)
            elif ".lora_" not in key and ".lora_magnitude_vector" not in key:
                name = re.sub(r"^base_model\.model\.", "", key)
                name = name.replace(".modules_to_save.default", "").replace(".original_module", "")
                self.full[name] = key
        if not self.pairs and not self.full:
            raise InputError(f"{self.path}: the adapter holds no LoRA weights")

    def scaling(self, name: str) -> float:
        module = name.removesuffix(".weight")
        rank = self.rank
        alpha = self.alpha
        for pattern, value in (self.config.get("rank_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
                rank = int(value)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
                alpha = float(value)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def adapts(self, name: str) -> bool:
        return name in self.pairs or name in self.full

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """The change this adapter makes to the base tensor ``name`` (None: untouched)."""
        if name in self.full:
            return self._tensors[self.full[name]].float() - base.float()
        if name not in self.pairs:
            return None
        a_key, b_key = self.pairs[name]
        a = self._tensors[a_key].float()
        b = self._tensors[b_key].float()
        delta = (b @ a) * self.scaling(name)
        if self.fan_in_fan_out:
            delta = delta.T
        if delta.shape != base.shape:
            raise InputError(f"{self.path}: LoRA delta for {name} has shape {tuple(delta.shape)} but the base "
                             f"tensor has {tuple(base.shape)}; the adapter was made for another base model")
        return delta

    def names(self) -> list[str]:
        return list(self.pairs) + list(self.full)


def open_input(path: str | os.PathLike):
    """A full checkpoint or a LoRA adapter, by what the directory holds."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"merge input {path} does not exist")
    if not path.is_dir():
        raise InputError(f"merge input {path} is not a directory (a transformers checkpoint or a PEFT adapter)")
    if (path / "adapter_config.json").is_file():
        return LoraAdapter(path)
    return Checkpoint(path)


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read the shard size {size!r} (e.g. 2GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


class ShardWriter:
    """Writes tensors to safetensors shards as they come, plus the index."""

    def __init__(self, out_dir: Path, max_shard_size: str | int = "2GB"):
        self.out_dir = Path(out_dir)
        self.max_bytes = _parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / file), metadata={"format": "pt"})
        self.shards.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            (self.out_dir / self.shards[0][0]).rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (file, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / file).rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
