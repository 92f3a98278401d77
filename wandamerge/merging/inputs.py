"""Resolve merge inputs to local directories and check they fit the base before any heavy work."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..models import ModelError, default_cache_dir, load_model, save_model
from .sources import Checkpoint, InputError, LoraAdapter, open_input

log = logging.getLogger(__name__)

# Config keys that must agree between the base and a fine-tune.
SHAPE_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
              "n_head", "num_key_value_heads", "intermediate_size")


def local_model_dir(spec: str) -> Path:
    """A directory for ``spec``: local dirs as they are, ``.gguf`` converted once into the cache,
    ``smollm2`` the embedded default, hub ids downloaded (for users online)."""
    from ..pipeline import EMBEDDED_MODELS

    if spec in EMBEDDED_MODELS:
        return Path(EMBEDDED_MODELS[spec]())
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"GGUF file {spec} does not exist; check the path in the recipe")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = default_cache_dir() / "gguf" / f"{path.stem}-{key}"
        if not (target / "config.json").is_file():
            model, tokenizer = load_model(path)
            save_model(model, tokenizer, target, overwrite=True)
        return target
    if path.exists():
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise InputError(f"merge input {spec} does not exist; check the path in the recipe")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, ...
        raise InputError(f"{spec} is not a local path and could not be fetched from the hub: "
                         f"{str(exc).splitlines()[0]}") from None


def check_compatible(base: Checkpoint, inputs: dict[str, Checkpoint | LoraAdapter]) -> list[str]:
    """Raise on any fine-tune that does not fit the base; return warnings worth recording."""
    notes = []
    base_shapes = {name: base.shape(name) for name in base.names()}
    for spec, source in inputs.items():
        if isinstance(source, LoraAdapter):
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
                if name.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight", "embed_in.weight",
                                  "embed_out.weight")) and other[1:] == shape[1:]:
                    raise InputError(
                        f"{spec} has a resized vocabulary ({other[0]} rows in {name}, base has {shape[0]}); "
                        f"merging models with different vocabularies is not supported: resize the fine-tune's "
                        f"embeddings back to the base vocabulary or merge a fine-tune of the same vocabulary")
                raise InputError(f"{spec} does not fit the base: {name} has shape {other}, base has {shape}; "
                                 f"merge fine-tunes of the same base model")
        extra = [n for n in source.names() if n not in base_shapes]
        if extra:
            notes.append(f"{spec}: {len(extra)} tensors not in the base are ignored (e.g. {extra[0]})")
    return notes


def open_inputs(specs: list[str]) -> dict[str, Checkpoint | LoraAdapter]:
    return {spec: open_input(local_model_dir(spec)) for spec in specs}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (for the run record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_digests(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return {p.name: file_digest(p) for p in files}


__all__ = ["InputError", "ModelError", "check_compatible", "input_digests", "local_model_dir", "open_inputs"]
