"""Merge inputs opened from their model arguments, and checked to fit the base before any heavy work."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError
from ..io.adapters import LoraAdapter, open_input
from ..io.safetensors import Checkpoint
from ..models import indexes_tokens, local_model_dir

log = logging.getLogger(__name__)

# Config keys that must agree between the base and a fine-tune.
SHAPE_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
              "n_head", "num_key_value_heads", "intermediate_size")


def check_compatible(base: Checkpoint, inputs: dict[str, Checkpoint | LoraAdapter],
                     own_vocabularies: bool = False) -> list[str]:
    """Raise on any fine-tune that does not fit the base; return warnings worth recording. With
    ``own_vocabularies`` (an output vocabulary is built) a fine-tune's embeddings and LM head may have rows
    of their own: they are moved into the output vocabulary."""
    notes = []
    base_shapes = {name: base.shape(name) for name in base.names()}
    for spec, source in inputs.items():
        if isinstance(source, LoraAdapter):
            _check_adapted_parameters(spec, source, base.config.get("model_type"))
            named = source.base_model_name
            made_for = "it was made for another base model" + (f" ({named})" if named else "")
            for name in source.names():
                if name not in base_shapes:
                    raise InputError(f"LoRA adapter {spec} adapts {name!r}, which the base model does not have; "
                                     f"{made_for}: merge it onto that base")
                shape = source.delta_shape(name)
                if shape != base_shapes[name]:
                    raise InputError(f"LoRA adapter {spec} changes {name} by a {shape} delta but the base tensor "
                                     f"is {base_shapes[name]}; {made_for}: merge it onto that base")
            if named and Path(str(named)).name != base.path.name and named != str(base.path):
                notes.append(f"{spec}: adapter names base {named!r}, merging onto {base.path}")
            continue
        for key in SHAPE_KEYS:
            if key in base.config and source.config.get(key) != base.config.get(key):
                raise InputError(f"{spec} does not fit the base: {key} is {source.config.get(key)!r}, "
                                 f"base has {base.config.get(key)!r}; merge fine-tunes of the same base model")
        missing = [n for n in base_shapes if not source.has(n)]
        tied = [n for n in missing if n.endswith("lm_head.weight")]
        if [n for n in missing if n not in tied]:
            raise InputError(f"{spec} lacks tensors of the base, e.g. {missing[:3]}")
        for name, shape in base_shapes.items():
            if not source.has(name):
                continue
            other = source.shape(name)
            if other != shape:
                if indexes_tokens(name) and other[1:] == shape[1:]:
                    if own_vocabularies:
                        continue
                    raise InputError(
                        f"{spec} has a resized vocabulary ({other[0]} rows in {name}, base has {shape[0]}); "
                        f"set tokenizer_source: union (or a tokenizer: section) to merge in a common vocabulary")
                raise InputError(f"{spec} does not fit the base: {name} has shape {other}, base has {shape}; "
                                 f"merge fine-tunes of the same base model")
        extra = [n for n in source.names() if n not in base_shapes]
        if extra:
            notes.append(f"{spec}: {len(extra)} tensors not in the base are ignored (e.g. {extra[0]})")
    return notes


def _check_adapted_parameters(spec: str, adapter: LoraAdapter, model_type: str | None) -> None:
    """Refuse an adapter on parameters rather than modules (PEFT's ``target_parameters``: the fused experts of
    an MoE model): its file nests one LoRA pair per targeted parameter under the experts module's name
    (``experts.lora_A``, ``experts.base_layer.lora_A``), and does not say which pair changes which parameter."""
    targets = adapter.config.get("target_parameters")
    if targets:
        raise InputError(f"LoRA adapter {spec} adapts parameters of a {model_type} model ({', '.join(targets)}), "
                         f"which wandamerge cannot merge (PEFT's file does not say which of its nested pairs "
                         f"changes which); merge it with PEFT's merge_and_unload and give the full checkpoint")


def open_inputs(specs: list[str]) -> dict[str, Checkpoint | LoraAdapter]:
    return {spec: open_input(local_model_dir(spec)) for spec in specs}


__all__ = ["check_compatible", "open_inputs"]
