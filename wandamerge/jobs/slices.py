"""The layout of a slices recipe: which tensor of which source every output tensor is merged from.

mergekit 0.1.5's ``plan.py`` (``MergePlanner.plan_module``, ``plan_slice``, ``plan_layer``) step by step:

* the output's decoder blocks are the slices' layers, in order: output block ``k``, the ``j``-th layer of
  slice ``i``, is merged from block ``start_s + j`` of each source ``s`` of the slice, at layer position
  ``t = j / (n_i - 1)`` (1 for a slice of one layer), by the slice's group (its base, inputs and
  parameter scopes, :meth:`~wandamerge.recipe.SlicesRecipe.source_groups`);
* the tensors before the blocks (the embeddings, :func:`~wandamerge.models.before_blocks`) are merged from
  the first slice's sources by that slice's group, at ``t = 0``; those after the blocks (final norm, LM
  head) from the last slice's first sources (as many as the first slice has) by the last slice's group,
  at ``t = 0``: none of them comes from a base model as such. A passthrough frankenmerge takes its
  embeddings from the first slice's model and its final norm and LM head from the last slice's;
* a tensor outside the blocks that a group's first source lacks (a tied LM head) is not written, as
  mergekit skips an optional weight no input has;
* the config is the base_model's (else the first slice's first source's; mergekit takes an arbitrary
  model then), its layer count and per-layer lists rewritten (:func:`~wandamerge.models.stacked_config`).

The names inside a block are those of the first source's block; every source of the group must hold each
of them with the same shape. Only configs and tensor headers are read here: nothing is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from ..errors import InputError
from ..io.adapters import open_input
from ..io.safetensors import Checkpoint
from ..models import (BLOCK_PATHS, NUM_LAYERS_KEYS, before_blocks, block_of, config_num_layers, indexes_tokens,
                      local_model_dir, stacked_config, supported_architectures)
from ..recipe import SlicesRecipe, SourceGroup, check_slice_lengths
from .merge_inputs import SHAPE_KEYS


@dataclass(frozen=True)
class StackedTensor:
    """One output tensor: its name, the group it is merged by, its name in each of the group's sources (in
    source order) and its layer position ``t``."""

    name: str
    group: SourceGroup
    sources: tuple[str, ...]
    t: float

    def input_name(self, model: str) -> str:
        return self.sources[self.group.models.index(model)]


@dataclass
class StackedLayout:
    tensors: list[StackedTensor]
    checkpoints: dict[str, Checkpoint]  # model argument -> the opened checkpoint
    donor: Checkpoint  # the model the config and tokenizer come from
    config: dict  # the output's config.json
    layers: list[dict]  # per output block: its slice's number and the block of each source it comes from


def stacked_layout(recipe: SlicesRecipe, own_vocabularies: bool = False) -> StackedLayout:
    """Open every source lazily, check the slices against the models, and lay out the output's tensors. With
    ``own_vocabularies`` (an output vocabulary is built) the sources' embeddings and LM heads may have rows of
    their own."""
    checkpoints = {spec: _checkpoint(spec) for spec in recipe.referenced_models()}
    slices = recipe.output_slices(lambda spec: config_num_layers(checkpoints[spec].config))
    donor = checkpoints[recipe.base_model or slices[0].sources[0].model]
    prefix = _check_family(donor, checkpoints)
    groups = recipe.source_groups(slices)
    tensors = _outside(groups[0], checkpoints, prefix, before=True, own_vocabularies=own_vocabularies)
    blocks = {spec: _blocks(c, prefix) for spec, c in checkpoints.items()}
    layers, origins = [], []
    for number, (piece, group) in enumerate(zip(slices, groups)):
        name = group.where
        try:
            check_slice_lengths(piece.sources)
        except ValueError as exc:
            raise InputError(f"{name}: {exc}") from None
        for source in piece.sources:
            count = config_num_layers(checkpoints[source.model].config)
            if source.layer_range[1] > count:
                raise InputError(f"{name}: layer_range [{source.layer_range[0]}, {source.layer_range[1]}] of "
                                 f"{source.model} is outside its {count} layers (0 to {count - 1})")
        length = piece.sources[0].num_layers
        for j in range(length):
            index = {s.model: s.layer_range[0] + j for s in piece.sources}
            out = len(layers)
            for inner, _ in blocks[group.models[0]][index[group.models[0]]]:
                names = tuple(f"{prefix}.{index[m]}.{inner}" for m in group.models)
                _check_held(group, checkpoints, names)
                tensors.append(StackedTensor(f"{prefix}.{out}.{inner}", group, names,
                                             j / (length - 1) if length > 1 else 1.0))
            layers.append({"slice": number, "from": index})
            origins.append((checkpoints[group.models[0]].config, index[group.models[0]]))
    tensors += _outside(groups[-1], checkpoints, prefix, before=False, own_vocabularies=own_vocabularies)
    return StackedLayout(tensors, checkpoints, donor, stacked_config(donor.config, origins), layers)


def _checkpoint(spec: str) -> Checkpoint:
    opened = open_input(local_model_dir(spec))
    if not isinstance(opened, Checkpoint):
        raise InputError(f"{spec} is a LoRA adapter; a slices recipe stacks layers of full checkpoints: merge the "
                         f"adapter into its base model first")
    return opened


def _check_family(donor: Checkpoint, checkpoints: dict[str, Checkpoint]) -> str:
    """The blocks' prefix of the donor's architecture, after checking every model is of its shape (the
    number of layers may differ)."""
    model_type = donor.config.get("model_type")
    if model_type not in BLOCK_PATHS:
        raise InputError(f"unsupported architecture {model_type!r}; supported: {supported_architectures()}")
    for spec, checkpoint in checkpoints.items():
        for key in SHAPE_KEYS:
            if key not in NUM_LAYERS_KEYS and key in donor.config and checkpoint.config.get(key) != donor.config[key]:
                raise InputError(f"{spec} does not fit {donor.path}: {key} is {checkpoint.config.get(key)!r}, not "
                                 f"{donor.config[key]!r}; a slices recipe stacks layers of one architecture")
    return BLOCK_PATHS[model_type]


def _blocks(checkpoint: Checkpoint, prefix: str) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
    """Block index -> (name inside the block, shape) of each of its tensors, in the checkpoint's order."""
    blocks: dict[int, list] = {}
    for name in checkpoint.names():
        found = block_of(name, prefix)
        if found is not None:
            blocks.setdefault(found[0], []).append((found[1], checkpoint.shape(name)))
    return blocks


def _outside(group: SourceGroup, checkpoints: dict[str, Checkpoint], prefix: str, before: bool,
             own_vocabularies: bool = False) -> list[StackedTensor]:
    """The tensors outside the blocks, before them or after them, of the group's first source, at t = 0."""
    first = checkpoints[group.models[0]]
    tensors = []
    for name in first.names():
        if block_of(name, prefix) is None and before_blocks(name) == before:
            names = (name,) * len(group.models)
            _check_held(group, checkpoints, names, own_rows=own_vocabularies and indexes_tokens(name))
            tensors.append(StackedTensor(name, group, names, 0.0))
    return tensors


def _check_held(group: SourceGroup, checkpoints: dict[str, Checkpoint], names: tuple[str, ...],
                own_rows: bool = False) -> None:
    """Every source of the group holds its tensor, of the first source's shape (``own_rows``: but for the
    number of rows)."""
    first = checkpoints[group.models[0]]
    shape = first.shape(names[0])
    for model, name in zip(group.models[1:], names[1:]):
        checkpoint = checkpoints[model]
        if not checkpoint.has(name):
            raise InputError(f"{group.where}: {model} has no {name}, which {group.models[0]} has "
                             f"({names[0]}); merge models of the same architecture")
        skip = 1 if own_rows else 0
        if checkpoint.shape(name)[skip:] != shape[skip:]:
            raise InputError(f"{group.where}: {name} of {model} has shape {checkpoint.shape(name)}, and "
                             f"{names[0]} of {group.models[0]} {shape}; merge models of the same architecture")


__all__ = ["StackedLayout", "StackedTensor", "stacked_layout"]
