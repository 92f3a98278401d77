"""Expert pruning: drop whole experts of every mixture-of-experts layer, so the model gets smaller.

Score every expert of every layer on calibration windows run through the model
with its own routing (block by block, :func:`wandamerge.runner.multistream_pass`),
keep the ``keep`` best experts of each layer and rebuild each MoE module from
the rewritten config with the kept experts' slices of its per-expert tensors.

How an expert's outputs are seen, whatever the family: a forward pre-hook on
the fused experts module catches its call ``(hidden_states, top_k_index,
top_k_weights)``; the experts module is then called again on the tokens routed
to each expert ``e``, with every index ``e`` and weight 1, which gives
``f_e(x)``. The scores are registered by name (:data:`EXPERT_SCORES`): a new
score is one decorated function of a layer's :class:`ExpertStats`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.experts import ExpertStats, expert_sums, frequency_score, kept_experts, reap_score
from ..errors import ConfigError, ModelError, lookup
from ..loaders import BlockLoader, is_dispatched
from ..models import MoeLayer, block_moe, decoder_blocks, expert_count_key
from ..runner import BlockInputs, experts_call, multistream_pass, run_block

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scores, registered by name


@dataclass(frozen=True)
class ExpertScore:
    name: str
    fn: Callable[[ExpertStats], torch.Tensor]  # one layer's sums -> (E,) scores, higher kept first
    doc: str


EXPERT_SCORES: dict[str, ExpertScore] = {}


def register_expert_score(name: str):
    def decorate(fn: Callable[[ExpertStats], torch.Tensor]):
        EXPERT_SCORES[name] = ExpertScore(name, fn, (fn.__doc__ or "").strip())
        return fn
    return decorate


def get_expert_score(name: str) -> ExpertScore:
    return lookup(EXPERT_SCORES, "expert score", name)


@register_expert_score("reap")
def reap(stats: ExpertStats) -> torch.Tensor:
    """Mean over an expert's tokens of routing weight times output norm (REAP, Lasby et al. 2025)."""
    return reap_score(stats.tokens, stats.weighted_norm_sums)


@register_expert_score("frequency")
def frequency(stats: ExpertStats) -> torch.Tensor:
    """Tokens routed to an expert times the mean norm of its outputs."""
    return frequency_score(stats.tokens, stats.norm_sums)


# ----------------------------------------------------------------------------- the calibration pass


def routed_output_norms(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """``||f_e(x_t)||_2`` for every slot ``(t, j)`` of ``top_k_index`` (``e = top_k_index[t, j]``): the experts
    module itself run on the tokens routed to each expert, with that expert only and weight 1. It is called
    through ``forward``, not ``__call__``, so the pre-hook that catches the model's own call does not fire."""
    norms = torch.zeros(top_k_index.shape, dtype=torch.float32, device=hidden.device)
    for expert in top_k_index.unique().tolist():
        tokens, slots = (top_k_index == expert).nonzero(as_tuple=True)
        only = torch.full((tokens.numel(), 1), expert, dtype=top_k_index.dtype, device=top_k_index.device)
        ones = torch.ones((tokens.numel(), 1), dtype=hidden.dtype, device=hidden.device)
        out = experts.forward(hidden[tokens], only, ones)
        norms[tokens, slots] = torch.linalg.vector_norm(out.float(), dim=-1)
    return norms


def layer_expert_stats(block: nn.Module, moe: MoeLayer, inputs: list[BlockInputs]) -> ExpertStats:
    """The per-expert sums of one MoE layer while ``inputs`` run through its (unchanged) block."""
    experts = moe.experts
    stats = ExpertStats.zeros(experts.num_experts)

    def hook(module, args, kwargs):
        hidden, index, weights = experts_call(module, args, kwargs)
        stats.add(expert_sums(index, weights, routed_output_norms(module, hidden, index), experts.num_experts))

    handle = experts.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in inputs:
            run_block(block, batch)
    finally:
        handle.remove()
    return stats


def expert_statistics(model: nn.Module, windows: torch.Tensor, layers: dict[int, MoeLayer], *,
                      device: str | torch.device = "cpu", batch_size: int | None = None, progress: bool = True,
                      loader: BlockLoader | None = None) -> dict[int, ExpertStats]:
    """Every MoE layer's per-expert sums over the calibration ``windows``, block by block."""
    found: dict[int, ExpertStats] = {}

    def step(index: int, block: nn.Module, inputs: list[list[BlockInputs]]) -> None:
        if index in layers:
            found[index] = layer_expert_stats(block, layers[index], inputs[0])

    multistream_pass(model, [windows], step, device=device, batch_size=batch_size, progress=progress,
                     desc="expert scores", loader=loader)
    return found


# ----------------------------------------------------------------------------- dropping experts


def moe_layers(model: nn.Module) -> dict[int, MoeLayer]:
    """Block index -> its mixture of experts, for every block that has one; a model with none is refused."""
    layers = {index: moe for index, block in enumerate(decoder_blocks(model))
              if (moe := block_moe(block)) is not None}
    if not layers:
        raise ModelError(f"{type(model).__name__} has no fused experts (a dense model, or experts stored another "
                         f"way): expert pruning needs a mixture-of-experts model")
    return layers


def check_keep(model: nn.Module, layers: dict[int, MoeLayer], keep: int) -> None:
    """Refuse a number of kept experts the model cannot run with: fewer than the experts each token is routed to
    (``num_experts_per_tok``), or more than it has."""
    total = next(iter(layers.values())).experts.num_experts
    per_token = int(getattr(model.config, "num_experts_per_tok", 1))
    if keep < per_token:
        raise ConfigError(f"too few experts kept per layer ({keep}): every token is routed to {per_token} "
                          f"(num_experts_per_tok); keep at least {per_token}")
    if keep > total:
        raise ConfigError(f"too many experts kept per layer ({keep}): the model has {total}")


def sliced_state(state: dict[str, torch.Tensor], per_expert: list[str], kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with the tensors named in ``per_expert`` cut to the ``kept`` experts along dim 0."""
    names = set(per_expert)
    return {name: t.index_select(0, kept.to(t.device)) if name in names else t for name, t in state.items()}


def rebuilt_moe(moe: MoeLayer, config, kept: torch.Tensor) -> nn.Module:
    """A new module of ``moe``'s class built from ``config`` (already counting ``len(kept)`` experts), holding
    the kept experts' slices: built on the meta device and filled by a strict load, so every tensor must
    match the new shapes and none is left unfilled."""
    with torch.device("meta"):
        new = type(moe.module)(config)
    new.load_state_dict(sliced_state(moe.module.state_dict(), moe.per_expert_tensors(), kept), strict=True,
                        assign=True)
    left = [name for name, t in [*new.named_parameters(), *new.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelError(f"{type(new).__name__} rebuilt with fewer experts leaves {left[:3]} unset")
    return new.train(moe.module.training)


def drop_experts(model: nn.Module, layers: dict[int, MoeLayer], kept: dict[int, torch.Tensor]) -> None:
    """Keep only ``kept[index]`` (the same number in every layer) of each MoE layer's experts, in place: the
    config's expert count rewritten (:func:`~wandamerge.models.expert_count_key`; the rebuilt modules share the
    model's config, as the ones they replace), every MoE module rebuilt first, then all swapped in."""
    counts = {len(k) for k in kept.values()}
    if len(counts) != 1 or set(kept) != set(layers):
        raise ConfigError("expert pruning keeps the same number of experts in every MoE layer")
    key = expert_count_key(model.config)
    before = getattr(model.config, key)
    setattr(model.config, key, counts.pop())
    try:
        new = {index: rebuilt_moe(layers[index], model.config, kept[index]) for index in layers}
    except BaseException:
        setattr(model.config, key, before)
        raise
    blocks = decoder_blocks(model)
    for index, module in new.items():
        blocks[index].set_submodule(layers[index].name, module)


# ----------------------------------------------------------------------------- the whole step


@dataclass
class ExpertPruneReport:
    """What expert pruning kept and why: for every MoE layer the kept experts and, for all its experts, their
    scores and the calibration tokens routed to them."""

    score: str
    keep: int
    num_experts: int  # before pruning
    nsamples: int
    seqlen: int
    layers: list[dict] = field(default_factory=list)  # {"block", "kept", "scores", "tokens"}
    parameters: dict[str, int] = field(default_factory=dict)  # {"before", "after"}
    seconds: dict[str, float] = field(default_factory=dict)


def parameter_count(model: nn.Module) -> int:
    """The number of parameters of ``model``, tied ones once."""
    return sum(p.numel() for p in model.parameters())


def check_in_memory(model: nn.Module) -> None:
    """Refuse a model whose modules expert pruning cannot replace: one placed by accelerate, or streamed."""
    if is_dispatched(model) or any(p.device.type == "meta" for p in model.parameters()):
        raise ModelError("expert pruning rebuilds the MoE modules of a model held in memory: load it without a "
                         "device map and without low-memory streaming")


def prunable_moe_layers(model: nn.Module, keep: int) -> dict[int, MoeLayer]:
    """The MoE layers of ``model`` (block index -> layer), once it is checked that they can be cut to ``keep``
    experts each; every refusal is one line (a job calls this before it loads any calibration data)."""
    check_in_memory(model)
    layers = moe_layers(model)
    check_keep(model, layers, keep)
    return layers


def prune_experts(model: nn.Module, windows: torch.Tensor, *, keep: int, score: str = "reap",
                  device: str | torch.device = "cpu", batch_size: int | None = None,
                  progress: bool = True) -> ExpertPruneReport:
    """Keep the ``keep`` highest-scoring experts of every MoE layer of ``model`` (in place) and drop the rest.

    ``windows`` are calibration token windows ``(nsamples, seqlen)``, run through the model with its own
    routing; ``score`` names a registered expert score (:data:`EXPERT_SCORES`). The same ``keep`` in every
    layer keeps the config standard; it must be at least ``num_experts_per_tok`` and at most the number of
    experts. Refusals come before any calibration.
    """
    scorer = get_expert_score(score)
    layers = prunable_moe_layers(model, keep)
    total, before = next(iter(layers.values())).experts.num_experts, parameter_count(model)
    t0 = time.perf_counter()
    stats = expert_statistics(model, windows, layers, device=device, batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    scores = {index: scorer.fn(stats[index]) for index in layers}
    kept = {index: kept_experts(scores[index], keep) for index in layers}
    drop_experts(model, layers, kept)
    report = ExpertPruneReport(
        score=score, keep=keep, num_experts=total,
        nsamples=int(windows.shape[0]), seqlen=int(windows.shape[1]),
        layers=[{"block": index, "kept": kept[index].tolist(), "scores": scores[index].tolist(),
                 "tokens": stats[index].tokens.tolist()} for index in sorted(layers)],
        parameters={"before": before, "after": parameter_count(model)},
        seconds={"calibration": t1 - t0, "drop": time.perf_counter() - t1})
    log.info("kept %d of %d experts in %d layers by %s: %d -> %d parameters", keep, total,
             len(layers), score, before, report.parameters["after"])
    return report
