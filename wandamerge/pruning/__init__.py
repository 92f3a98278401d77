"""Pruning a model in place: every linear map of its decoder blocks, by a registered method, through the runner;
or whole experts of a mixture-of-experts model (:func:`prune_experts`, :mod:`.experts`); or whole attention
heads and MLP channels (:func:`prune_width`, :mod:`.width`); or whole decoder blocks (:func:`prune_depth`,
:mod:`.depth`)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..loaders import BlockLoader
from ..models import (ExpertMap, LinearMap, block_experts, block_linears, block_prefix, decoder_blocks,
                      permutable_inputs)
from ..runner import InputStats, blockwise_pass
from .allocation import (SPARSITY_PROFILES, Allocation, DenseModelScores, SparsityMap, get_sparsity_profile,
                         register_sparsity_profile)
from .depth import DEPTH_SCORES, DepthPruneReport, depth_setup, get_depth_score, prune_depth, register_depth_score
from .experts import (EXPERT_SCORES, ExpertPruneReport, get_expert_score, prunable_moe_layers, prune_experts,
                      register_expert_score)
from .methods import (PRUNE_METHODS, PruneMethod, PruneTarget, get_prune_method, keep_mask, prune_weight,
                      register_prune_method, register_score_method)
from .permutation import check_permutable, reorder_for_nm
from .width import WIDTH_SCORES, WidthPruneReport, get_width_score, prune_width, register_width_score, width_setup

log = logging.getLogger(__name__)

__all__ = ["check_permutable", "DEPTH_SCORES", "depth_setup", "DepthPruneReport", "EXPERT_SCORES",
           "ExpertPruneReport", "get_depth_score", "get_expert_score", "get_prune_method", "get_sparsity_profile",
           "get_width_score", "keep_mask", "prunable_moe_layers", "prune", "prune_depth", "prune_experts",
           "PRUNE_METHODS", "prune_weight", "prune_width", "PruneReport", "PruneTarget", "register_depth_score",
           "register_expert_score", "register_prune_method", "register_score_method", "register_sparsity_profile",
           "register_width_score", "SPARSITY_PROFILES", "SparsityMap", "WIDTH_SCORES", "width_setup",
           "WidthPruneReport"]


@dataclass
class PruneReport:
    method: str
    target: dict
    within_block: str
    nsamples: int
    seqlen: int
    matrix_sparsity: dict[str, float] = field(default_factory=dict)  # full parameter name -> zeros fraction
    block_sparsity: list[float] = field(default_factory=list)
    overall_sparsity: float = 0.0  # over all pruned linear maps
    sparsity_profile: str = "uniform"
    # each block's target: its maps' common sparsity target, or their mean weighted by entries
    block_targets: list[float] = field(default_factory=list)
    matrix_targets: dict[str, float] = field(default_factory=dict)  # full parameter name -> sparsity target
    # what decided the targets: the profile's options and findings (OWL: outlier_ratios), or the sparsity map
    allocation: dict = field(default_factory=dict)
    # MoE: full expert name (e.g. model.layers.0.mlp.experts.3) -> calibration tokens it saw / zeros fraction
    expert_tokens: dict[str, int] = field(default_factory=dict)
    expert_sparsity: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None  # calibration windows per forward (None: no calibration pass)


def prune(model: nn.Module, calibration: torch.Tensor | None = None, *, method: str = "wanda",
          sparsity: float = 0.5, pattern: str | None = None, group: str | None = None, variant: bool = False,
          update: bool = False, permute: bool = False, device: str | torch.device = "cpu",
          batch_size: int | None = None, within_block: str = "auto", blocksize: int = 128,
          percdamp: float = 0.01, progress: bool = True, loader: BlockLoader | None = None, all_experts: bool = False,
          sparsity_profile: str = "uniform", sparsity_map: dict[str, float] | None = None,
          **profile_options: float) -> PruneReport:
    """Prune every linear map in the decoder blocks of ``model`` in place.

    ``calibration`` is an integer tensor of token windows ``(nsamples, seqlen)``;
    methods that need no activations (magnitude without ``update``) ignore it.
    Embeddings and the LM head are never pruned. ``loader`` says where blocks
    come from and go to (see :func:`wandamerge.runner.blockwise_pass`; a
    :class:`wandamerge.loaders.StreamedModel` gives one that reads one block at
    a time and hands it to the job's ``after_block`` when done).

    Unstructured targets may give each block its own sparsity: ``sparsity_profile``
    (``uniform``, or ``owl`` with ``owl_m`` and ``owl_lambda``: :mod:`.allocation`),
    or a ``sparsity_map`` of module-name patterns -> sparsity (the first match wins;
    unmatched maps get ``sparsity``).

    ``group`` defaults to the method's own (:attr:`PruneMethod.group`). With an
    N:M ``pattern``, ``permute`` reorders the input channels of the maps that allow
    it before their masks are decided, folded into the maps making those channels
    (:mod:`.permutation`); the model computes what it did before pruning.

    Fused MoE experts are pruned expert by expert, each on the tokens the
    router sends it (every token with ``all_experts``); routers are never pruned.
    """
    prune_method = get_prune_method(method)
    target = PruneTarget(sparsity=sparsity, pattern=pattern, group=group or prune_method.group, variant=variant,
                         update=update, blocksize=blocksize, percdamp=percdamp, permute=permute)
    allocation = Allocation.of(target, sparsity_profile, profile_options, sparsity_map)
    needs = _check_method(prune_method, target, allocation, calibration)
    blocks = decoder_blocks(model)
    prefix = block_prefix(model)
    movable = _check_model(model, blocks, target, allocation)

    t0 = time.perf_counter()
    planned = allocation.per_block(target.sparsity, DenseModelScores(
        model, calibration, device, batch_size, loader, all_experts, progress))
    t_planned = time.perf_counter()
    tally = _Tally(prefix)
    visit = _PruneVisit(model, blocks, prefix, prune_method, target, allocation, planned.sparsities, movable, tally)
    timings = blockwise_pass(model, calibration if needs else None, visit, needs=needs, device=device,
                             batch_size=batch_size, within_block=within_block, progress=progress,
                             desc=f"{method} pruning", loader=loader, all_experts=all_experts)
    report = PruneReport(
        method=method, target=asdict(target), within_block=timings.within_block or "none",
        batch_size=timings.batch_size or None, nsamples=int(calibration.shape[0]) if needs else 0,
        seqlen=int(calibration.shape[1]) if needs else 0, sparsity_profile=allocation.profile.name,
        allocation=allocation.record(planned), seconds={"allocation": t_planned - t0, **timings.seconds(t0)})
    tally.fill(report, len(blocks), needs)
    log.info("%s: %.4f of the decoder linear weights are zero", method, report.overall_sparsity)
    return report


@dataclass
class _PruneVisit:
    """The pass's visitor: each map pruned to its own target (reordered first where its inputs may be)."""

    model: nn.Module
    blocks: nn.ModuleList
    prefix: str
    prune_method: PruneMethod
    target: PruneTarget
    allocation: Allocation
    sparsities: list[float]  # per block
    movable: dict
    tally: "_Tally"

    def __call__(self, index: int, linear: LinearMap | ExpertMap, stats: InputStats | None) -> torch.Tensor | None:
        own = self.allocation.target_of(self.target, self.sparsities[index], f"{self.prefix}.{index}.{linear.name}")
        order = None
        if linear.name in self.movable:  # reordered first: the mask is decided in the new order
            block = self.blocks[index]
            groups = permutable_inputs(block, self.model.config)[linear.name]
            order = reorder_for_nm(block, linear, groups, self.prune_method.score(linear.weight, stats), *own.nm)
            stats = stats.reordered(order) if stats is not None else None
        new_weight, _ = self.prune_method.fn(linear.weight.contiguous(), stats, own)
        linear.set_weight(new_weight.to(linear.weight.dtype))
        self.tally.add(index, linear, stats, own.expected_sparsity)
        return order


def _check_method(prune_method, target: PruneTarget, allocation: Allocation,
                  calibration: torch.Tensor | None) -> frozenset[str]:
    """Refuse a target the method cannot reach, or a pass without the windows it needs; returns what it needs."""
    prune_method.check(target)
    needs = prune_method.needs_for(target)
    if (needs or allocation.needs) and calibration is None:
        raise ConfigError(f"method {prune_method.name!r} with sparsity profile {allocation.profile.name!r} needs "
                          "calibration windows")
    return needs


def _check_model(model: nn.Module, blocks, target: PruneTarget, allocation: Allocation) -> dict:
    """Refuse what cannot be pruned as asked, before any pass; returns the maps whose inputs get reordered."""
    if target.nm:
        _check_widths(blocks, target.nm[1])
    movable = check_permutable(blocks[0], model.config, target.nm[1]) if target.permute else {}
    _check_finite_weights(model)
    _warn_unmatched(allocation, model)
    return movable


@dataclass
class _Tally:
    """Zeros, entries and sparsity targets of the pruned maps, by full parameter name (and per expert)."""

    prefix: str
    zeros: dict[str, tuple[int, int]] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    experts: dict[str, list[int]] = field(default_factory=dict)  # expert -> [tokens, zeros, entries]

    def add(self, index: int, linear: LinearMap | ExpertMap, stats: InputStats | None, target: float) -> None:
        counts = (int((linear.weight == 0).sum()), linear.weight.numel())
        if isinstance(linear, ExpertMap):
            name = f"{self.prefix}.{index}.{linear.name}"
            seen = self.experts.setdefault(f"{self.prefix}.{index}.{linear.experts.name}.{linear.expert}", [0, 0, 0])
            seen[0] = max(seen[0], stats.tokens if stats is not None else 0)
            seen[1], seen[2] = seen[1] + counts[0], seen[2] + counts[1]
        else:
            name = f"{self.prefix}.{index}.{linear.name}.weight"
        self.zeros[name], self.targets[name] = counts, target

    def fill(self, report: PruneReport, blocks: int, needs) -> None:
        """The report's per-matrix, per-block, overall and per-expert numbers."""
        report.matrix_sparsity = {k: z / n for k, (z, n) in self.zeros.items()}
        report.matrix_targets = dict(self.targets)
        for index in range(blocks):
            names = [k for k in self.zeros if k.startswith(f"{self.prefix}.{index}.")]
            entries = sum(self.zeros[k][1] for k in names)
            report.block_sparsity.append(sum(self.zeros[k][0] for k in names) / max(1, entries))
            block_targets = {self.targets[k] for k in names}
            report.block_targets.append(block_targets.pop() if len(block_targets) == 1 else
                                        sum(self.targets[k] * self.zeros[k][1] for k in names) / max(1, entries))
        report.overall_sparsity = (sum(z for z, _ in self.zeros.values())
                                   / max(1, sum(n for _, n in self.zeros.values())))
        report.expert_tokens = {k: v[0] for k, v in self.experts.items()} if needs else {}
        report.expert_sparsity = {k: v[1] / max(1, v[2]) for k, v in self.experts.items()}


def _warn_unmatched(allocation: Allocation, model: nn.Module) -> None:
    """A pattern of the sparsity map that matches no map of the model is most likely misspelt."""
    if allocation.sparsity_map is None:
        return
    prefix = block_prefix(model)
    names = [f"{prefix}.{index}.{m.name}" for index, block in enumerate(decoder_blocks(model))
             for m in block_linears(block) + [e for experts in block_experts(block) for e in experts.all_maps()]]
    if unmatched := allocation.sparsity_map.unmatched(names):
        log.warning("sparsity map: %s match no linear map of the model (e.g. %s)", ", ".join(map(repr, unmatched)),
                    names[0] if names else "none")


def _check_finite_weights(model: nn.Module) -> None:
    """Refuse NaN or Inf weights before anything is pruned (blocks not loaded yet, on meta, are skipped)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta" or not param.is_floating_point():
                continue
            if not all(torch.isfinite(chunk).all() for chunk in param.detach().reshape(-1).split(1 << 24)):
                raise ModelError(f"{name} holds NaN or Inf values: the checkpoint is damaged; download or convert "
                                 f"it again (pruning it would spread them)")


def _check_widths(blocks: nn.ModuleList, m: int) -> None:
    expert_maps = [expert_map for experts in block_experts(blocks[0]) for expert_map in experts.maps(0)]
    for linear in block_linears(blocks[0]) + expert_maps:
        if linear.in_features % m:
            raise ConfigError(f"N:M pattern needs every input width divisible by {m}; "
                             f"{linear.name} has {linear.in_features} inputs")
