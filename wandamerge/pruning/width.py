"""Structured width pruning: whole attention heads (in GQA groups) and MLP channels go, the same number in every
decoder block, so the model gets smaller and its config stays standard.

Scores come from the inputs of each block's two output maps on the calibration windows, taken block by block
through the dense model (:func:`wandamerge.runner.multistream_pass`; as FLAP's code, no block sees a pruned
one): ``o_proj``'s input channels, summed per query head and per GQA group, and ``down_proj``'s, one per MLP
channel. A score is one registered function of an output map's weight and its input statistics
(:data:`WIDTH_SCORES`). How many groups and channels go is :func:`wandamerge.core.width.width_plan`. Every block
is then rebuilt from the rewritten config (fewer heads and key/value heads, a smaller ``intermediate_size``,
``head_dim`` kept) and filled by a strict load of its sliced tensors, with FLAP's bias compensation on the
output maps where the family's config can carry their bias (:data:`wandamerge.models.WIDTH_LAYOUTS`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.width import (UnitCost, WidthPlan, channel_variance, compensation_bias, fluctuation_score, group_heads,
                          group_scores, head_rows, kept_units, wanda_sp_score, width_plan)
from ..errors import ConfigError, ModelError, lookup
from ..loaders import is_dispatched
from ..models import LinearMap, WidthLayout, config_head_dim, decoder_blocks, replace_blocks, width_layout
from ..runner import MOMENTS, NORMS, InputStats, block_input_stats, check_finite, multistream_pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scores, registered by name


@dataclass(frozen=True)
class WidthScore:
    name: str
    fn: Callable[[torch.Tensor, InputStats], torch.Tensor]  # output map's weight (out, in), its inputs -> (in,)
    needs: frozenset[str]  # the input statistics it reads (:mod:`wandamerge.runner`)
    doc: str


WIDTH_SCORES: dict[str, WidthScore] = {}


def register_width_score(name: str, needs: tuple[str, ...]):
    def decorate(fn: Callable[[torch.Tensor, InputStats], torch.Tensor]):
        WIDTH_SCORES[name] = WidthScore(name, fn, frozenset(needs), (fn.__doc__ or "").strip())
        return fn
    return decorate


def get_width_score(name: str) -> WidthScore:
    return lookup(WIDTH_SCORES, "width score", name)


@register_width_score("flap", needs=(MOMENTS,))
def flap(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """FLAP's fluctuation: the variance of channel j's input over the calibration tokens times ||W_:,j||^2."""
    return fluctuation_score(weight, channel_variance(stats.m2, stats.tokens))


@register_width_score("wanda_sp", needs=(NORMS,))
def wanda_sp(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Wanda-sp: the Wanda scores |W_ij| * ||X_j|| of channel j's column of the output map, summed."""
    return wanda_sp_score(weight, stats.sq_norms)


# ----------------------------------------------------------------------------- what goes, before any calibration


@dataclass(frozen=True)
class WidthSetup:
    """What width pruning does to a model, decided from its config and shapes alone."""

    layout: WidthLayout
    head_dim: int
    heads_per_group: int
    plan: WidthPlan
    compensate: tuple[bool, bool]  # bias compensation (attention, MLP) where the part loses something
    notes: tuple[str, ...]


def _numel(block: nn.Module, name: str, weight_only: bool = False) -> int:
    module = block.get_submodule(name)
    return sum(p.numel() for key, p in module.named_parameters(recurse=False) if key == "weight" or not weight_only)


def _has_bias(block: nn.Module, name: str) -> bool:
    return getattr(block.get_submodule(name), "bias", None) is not None


def _check_shapes(block: nn.Module, layout: WidthLayout, config, head_dim: int) -> None:
    """Refuse a block whose maps do not have the widths its config gives (another attention layout)."""
    attention, mlp = layout.attention_maps(), layout.mlp_maps()
    expected = {attention["queries"]: (config.num_attention_heads * head_dim, config.hidden_size),
                attention["keys"]: (config.num_key_value_heads * head_dim, config.hidden_size),
                attention["values"]: (config.num_key_value_heads * head_dim, config.hidden_size),
                attention["output"]: (config.hidden_size, config.num_attention_heads * head_dim),
                mlp["gate"]: (config.intermediate_size, config.hidden_size),
                mlp["up"]: (config.intermediate_size, config.hidden_size),
                mlp["down"]: (config.hidden_size, config.intermediate_size)}
    for name, shape in expected.items():
        try:
            found = tuple(block.get_submodule(name).weight.shape)
        except AttributeError:
            raise ModelError(f"{type(block).__name__} has no linear map {name}: not the layout width pruning "
                             f"cuts") from None
        if found != shape:
            raise ModelError(f"{type(block).__name__}.{name} is {found}, not {shape} as its config says: not the "
                             f"layout width pruning cuts")


def block_costs(block: nn.Module, layout: WidthLayout, config, head_dim: int) -> tuple[UnitCost, UnitCost, int]:
    """(GQA groups, MLP channels, parameters no cut changes) of one block, counted from its tensors; the
    compensation's new biases are those its maps do not have yet."""
    attention, mlp = layout.attention_maps(), layout.mlp_maps()
    groups, per_group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    heads_of = {"queries": per_group, "keys": 1, "values": 1}
    attention_sliced = sum(_numel(block, attention[role]) for role in heads_of) + \
        _numel(block, attention["output"], weight_only=True)
    mlp_sliced = sum(_numel(block, mlp[role]) for role in ("gate", "up")) + _numel(block, mlp["down"], weight_only=True)
    hidden = config.hidden_size
    heads = UnitCost(groups, attention_sliced // groups,
                     sum(n * head_dim for role, n in heads_of.items() if not _has_bias(block, attention[role])),
                     0 if _has_bias(block, attention["output"]) else hidden)
    channels = UnitCost(config.intermediate_size, mlp_sliced // config.intermediate_size,
                        sum(1 for role in ("gate", "up") if not _has_bias(block, mlp[role])),
                        0 if _has_bias(block, mlp["down"]) else hidden)
    fixed = sum(p.numel() for p in block.parameters()) - attention_sliced - mlp_sliced
    return heads, channels, fixed


def _compensation(layout: WidthLayout, model_type: str, asked: bool | None) -> tuple[tuple[bool, bool], list[str]]:
    """Which parts get the bias compensation: asked (None: wherever the family's config can carry it)."""
    supported = (layout.attention_bias is not None, layout.mlp_bias is not None)
    if asked is False:
        return (False, False), []
    if asked and not any(supported):
        raise ConfigError(f"{model_type} models have no config flag that gives o_proj or down_proj a bias, so the "
                          f"bias compensation cannot be saved as a standard model: turn it off")
    missing = [name for name, ok in zip((layout.output, layout.down), supported) if not ok]
    notes = [f"no bias compensation on {' and '.join(missing)}: {model_type}'s config has no flag that gives "
             f"{'them' if len(missing) > 1 else 'it'} a bias"] if missing else []
    return supported, notes


def check_in_memory(model: nn.Module) -> None:
    if is_dispatched(model) or any(p.device.type == "meta" for p in model.parameters()):
        raise ModelError("width pruning rebuilds the decoder blocks of a model held in memory: load it without a "
                         "device map and without low-memory streaming")


def width_setup(model: nn.Module, sparsity: float, bias_compensation: bool | None = None) -> WidthSetup:
    """How many GQA groups and MLP channels every block of ``model`` keeps to lose ``sparsity`` of the decoder
    blocks' parameters, and where the bias compensation goes; every refusal is one line (a job calls this
    before it loads any calibration data)."""
    layout = width_layout(model)
    check_in_memory(model)
    config, blocks = model.config, decoder_blocks(model)
    head_dim = config_head_dim(config)
    for block in blocks:
        _check_shapes(block, layout, config, head_dim)
    costs = {block_costs(block, layout, config, head_dim) for block in blocks}
    if len(costs) != 1:
        raise ModelError("width pruning needs decoder blocks that all have the same maps and biases")
    compensate, notes = _compensation(layout, config.model_type, bias_compensation)
    heads, channels, fixed = costs.pop()
    plan = width_plan(heads, channels, fixed, sparsity, compensate)
    if heads.units == 1 and sparsity > 0:
        notes.append("one key/value head: no attention head can go, the MLP channels carry the whole ratio")
    biased = (compensate[0] and plan.groups_kept < heads.units, compensate[1] and plan.channels_kept < channels.units)
    return WidthSetup(layout, head_dim, config.num_attention_heads // config.num_key_value_heads, plan, biased,
                      tuple(notes))


# ----------------------------------------------------------------------------- the calibration pass and the choice


def output_maps(block: nn.Module, layout: WidthLayout) -> list[LinearMap]:
    """The two maps whose inputs are scored: the attention's output map, then the MLP's."""
    return [LinearMap(name, block.get_submodule(name))
            for name in (layout.attention_maps()["output"], layout.mlp_maps()["down"])]


def width_statistics(model: nn.Module, windows: torch.Tensor, layout: WidthLayout, needs: set[str], *,
                     device: str | torch.device = "cpu", batch_size: int | None = None,
                     progress: bool = True) -> dict[int, dict[str, InputStats]]:
    """Block index -> output map's name -> the statistics of its inputs over the calibration ``windows``, every
    block run as it is (the dense model)."""
    found: dict[int, dict[str, InputStats]] = {}

    def step(index: int, block: nn.Module, inputs) -> None:
        maps = output_maps(block, layout)
        found[index] = block_input_stats(block, maps, inputs[0], needs)
        for linear in maps:
            check_finite(index, linear, found[index][linear.name])

    multistream_pass(model, [windows], step, device=device, batch_size=batch_size, progress=progress,
                     desc="width scores", loader=None)
    return found


@dataclass
class LayerCut:
    """What one block keeps: GQA groups and MLP channels (ascending), with the scores that chose them."""

    groups: torch.Tensor
    channels: torch.Tensor
    group_scores: torch.Tensor
    channel_scores: torch.Tensor


def layer_cut(block: nn.Module, setup: WidthSetup, stats: dict[str, InputStats], score: WidthScore) -> LayerCut:
    attention, mlp = output_maps(block, setup.layout)
    per_group = group_scores(score.fn(attention.weight, stats[attention.name]), setup.head_dim, setup.heads_per_group)
    per_channel = score.fn(mlp.weight, stats[mlp.name])
    return LayerCut(kept_units(per_group, setup.plan.groups_kept), kept_units(per_channel, setup.plan.channels_kept),
                    per_group, per_channel)


# ----------------------------------------------------------------------------- the cut


def _biases(block: nn.Module, output: str, inputs: list[str], rows: dict[str, torch.Tensor], kept: torch.Tensor,
            means: torch.Tensor) -> dict[str, torch.Tensor]:
    """The part's biases after the cut with compensation: the output map's (its own, or zeros) plus
    :func:`compensation_bias`, and zeros for the input maps that had none (the config flag gives them one)."""
    out = block.get_submodule(output)
    own = out.bias if out.bias is not None else torch.zeros(out.weight.shape[0], device=out.weight.device)
    found = {f"{output}.bias": (own.float() + compensation_bias(out.weight, means, kept)).to(out.weight.dtype)}
    for name in inputs:
        weight = block.get_submodule(name).weight
        if not _has_bias(block, name):
            found[f"{name}.bias"] = torch.zeros(len(rows[name]), dtype=weight.dtype, device=weight.device)
    return found


def sliced_block_state(block: nn.Module, setup: WidthSetup, cut: LayerCut,
                       means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``block``'s tensors cut to the kept groups and channels: rows of q/k/v (weights and biases) by heads,
    columns of ``o_proj`` by head channels, rows of gate/up and columns of down by MLP channels; then the
    compensation's biases (``means``: output map's name -> the mean of its inputs)."""
    attention, mlp = setup.layout.attention_maps(), setup.layout.mlp_maps()
    q_rows = head_rows(group_heads(cut.groups, setup.heads_per_group), setup.head_dim)
    kv_rows = head_rows(cut.groups, setup.head_dim)
    rows = {attention["queries"]: q_rows, attention["keys"]: kv_rows, attention["values"]: kv_rows,
            mlp["gate"]: cut.channels, mlp["up"]: cut.channels}
    columns = {attention["output"]: q_rows, mlp["down"]: cut.channels}
    state = {}
    for name, tensor in block.state_dict().items():
        module, _, param = name.rpartition(".")
        if module in rows:
            tensor = tensor.index_select(0, rows[module].to(tensor.device))
        elif module in columns and param == "weight":
            tensor = tensor.index_select(1, columns[module].to(tensor.device))
        state[name] = tensor
    parts = [(attention["output"], [attention[r] for r in ("queries", "keys", "values")], q_rows),
             (mlp["down"], [mlp["gate"], mlp["up"]], cut.channels)]
    for (output, inputs, kept), on in zip(parts, setup.compensate):
        if on:
            state.update(_biases(block, output, inputs, rows, kept, means[output]))
    return state


def narrowed_config_values(config, setup: WidthSetup) -> dict:
    """The config keys width pruning rewrites, with their new values (``head_dim`` written out, so that it
    is not recomputed from fewer heads)."""
    values = {"head_dim": setup.head_dim, "num_attention_heads": setup.plan.groups_kept * setup.heads_per_group,
              "num_key_value_heads": setup.plan.groups_kept, "intermediate_size": setup.plan.channels_kept}
    for flag, on in zip((setup.layout.attention_bias, setup.layout.mlp_bias), setup.compensate):
        if on:
            values[flag] = True
    return values


def narrow(model: nn.Module, setup: WidthSetup, cuts: dict[int, LayerCut], means: dict[int, dict]) -> None:
    """Rewrite ``model``'s config and replace every block by its narrowed rebuild, in place
    (:func:`wandamerge.models.replace_blocks`)."""
    blocks = decoder_blocks(model)
    replace_blocks(model, narrowed_config_values(model.config, setup),
                   ((block, sliced_block_state(block, setup, cuts[index], means[index]))
                    for index, block in enumerate(blocks)))


# ----------------------------------------------------------------------------- the whole step


@dataclass
class WidthPruneReport:
    """What width pruning kept: the counts, and for every block its kept heads and channels and its size."""

    score: str
    sparsity: float  # asked: the share of the decoder blocks' parameters removed
    achieved: float  # reached, counting the compensation's new biases
    fraction: float  # the share of heads and channels that removes ``sparsity`` before rounding
    heads: dict  # {"before", "after", "key_value_before", "key_value_after", "head_dim"}
    channels: dict  # {"before", "after"}
    bias_compensation: dict  # {"o_proj": bool, "down_proj": bool}
    nsamples: int
    seqlen: int
    layers: list[dict] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # {"before", "after", "blocks_before", "blocks_after"}
    bytes: dict = field(default_factory=dict)  # {"before", "after"}
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def size(module: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of ``module``, tied parameters once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _layer_record(index: int, cut: LayerCut, setup: WidthSetup, before: tuple[int, int], block: nn.Module) -> dict:
    after = size(block)
    return {"block": index, "kept_heads": group_heads(cut.groups, setup.heads_per_group).tolist(),
            "kept_key_value_heads": cut.groups.tolist(), "kept_channels": cut.channels.tolist(),
            "group_scores": cut.group_scores.tolist(), "parameters": {"before": before[0], "after": after[0]},
            "bytes": {"before": before[1], "after": after[1]}}


def prune_width(model: nn.Module, windows: torch.Tensor, *, sparsity: float, score: str = "flap",
                bias_compensation: bool | None = None, device: str | torch.device = "cpu",
                batch_size: int | None = None, progress: bool = True) -> WidthPruneReport:
    """Remove ``sparsity`` of the decoder blocks' parameters of ``model`` (in place) as whole GQA groups of
    heads and MLP channels, the same numbers in every block, chosen by ``score`` (:data:`WIDTH_SCORES`) on the
    calibration ``windows`` ``(nsamples, seqlen)``. ``bias_compensation``: FLAP's baseline bias on ``o_proj``
    and ``down_proj`` (None: wherever the family's config can carry it). Refusals come before calibration."""
    scorer = get_width_score(score)
    setup = width_setup(model, sparsity, bias_compensation)
    config, blocks = model.config, decoder_blocks(model)
    counts = {"heads": config.num_attention_heads, "kv": config.num_key_value_heads,
              "channels": config.intermediate_size}
    model_before, block_sizes = size(model), [size(block) for block in blocks]
    t0 = time.perf_counter()
    needs = set(scorer.needs) | ({MOMENTS} if any(setup.compensate) else set())
    stats = width_statistics(model, windows, setup.layout, needs, device=device, batch_size=batch_size,
                             progress=progress)
    t1 = time.perf_counter()
    cuts = {index: layer_cut(block, setup, stats[index], scorer) for index, block in enumerate(blocks)}
    means = {index: {name: s.means for name, s in found.items()} for index, found in stats.items()}
    narrow(model, setup, cuts, means)
    model_after, blocks_before, blocks_after = size(model), sum(s[0] for s in block_sizes), size(blocks)[0]
    report = WidthPruneReport(
        score=score, sparsity=sparsity, achieved=1 - blocks_after / blocks_before, fraction=setup.plan.fraction,
        heads={"before": counts["heads"], "after": config.num_attention_heads, "key_value_before": counts["kv"],
               "key_value_after": config.num_key_value_heads, "head_dim": setup.head_dim},
        channels={"before": counts["channels"], "after": config.intermediate_size},
        bias_compensation=dict(zip((setup.layout.output, setup.layout.down), setup.compensate)),
        nsamples=int(windows.shape[0]), seqlen=int(windows.shape[1]),
        layers=[_layer_record(i, cuts[i], setup, block_sizes[i], block) for i, block in enumerate(blocks)],
        parameters={"before": model_before[0], "after": model_after[0],
                    "blocks_before": blocks_before, "blocks_after": blocks_after},
        bytes={"before": model_before[1], "after": model_after[1]}, notes=list(setup.notes),
        seconds={"calibration": t1 - t0, "cut": time.perf_counter() - t1})
    for note in setup.notes:
        log.info(note)
    log.info("width pruning by %s: heads %d -> %d, channels %d -> %d, %d -> %d parameters", score, counts["heads"],
             config.num_attention_heads, counts["channels"], config.intermediate_size, model_before[0],
             model_after[0])
    return report
