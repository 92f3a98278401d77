"""Merge inputs on disk: a PEFT LoRA adapter seen as deltas on the base's tensor names, or a full checkpoint."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from .safetensors import Checkpoint, read_header, read_json


class LoraAdapter:
    """A PEFT LoRA adapter directory, seen as deltas on the base's tensor names."""

    kind = "lora"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_file = self.path / "adapter_config.json"
        if not config_file.is_file():
            raise InputError(f"{self.path} is not a PEFT adapter (no adapter_config.json)")
        self.config = read_json(config_file)
        if self.config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{self.path}: only LoRA adapters can be merged, not {self.config.get('peft_type')}")
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            raise InputError(f"{self.path} has no adapter_model.safetensors")
        read_header(weights)  # a damaged file is named, not a safetensors traceback
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

    def delta_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the base tensor this adapter was made for, from its weights alone."""
        if name in self.full:
            return tuple(self._tensors[self.full[name]].shape)
        a_key, b_key = self.pairs[name]
        shape = (self._tensors[b_key].shape[0], self._tensors[a_key].shape[-1])
        return shape[::-1] if self.fan_in_fan_out else shape


def open_input(path: str | os.PathLike):
    """A full checkpoint or a LoRA adapter, by what the directory holds."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"merge input {path} does not exist; check the path in the recipe")
    if not path.is_dir():
        raise InputError(f"merge input {path} is not a directory (a transformers checkpoint or a PEFT adapter)")
    if (path / "adapter_config.json").is_file():
        return LoraAdapter(path)
    return Checkpoint(path)


