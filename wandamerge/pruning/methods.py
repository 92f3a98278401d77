"""Pruning methods, registered by name: one weight and the statistics of its inputs in, the pruned weight out.

A method turns one weight ``(out, in)`` into a pruned weight and its keep-mask
(True = kept, :mod:`wandamerge.core.selection`). Adding a method is one
decorated function: a score (:func:`register_score_method`: the mask keeps the
highest scores) or a whole solver (:func:`register_prune_method`);
:meth:`PruneMethod.needs_for` tells the runner which input statistics to collect.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..core.dsnot import DsnotSettings, dsnot_refine
from ..core.scores import magnitude_score, ria_score, wanda_score
from ..core.selection import (check_group, check_sparsity, cumulative_alpha_keep, keep_after_pruning, keep_n_of_m,
                              parse_pattern)
from ..core.sparsegpt import sparsegpt_prune
from ..errors import ConfigError, lookup
from ..runner import GRAM, MOMENTS, NORMS, InputStats


@dataclass(frozen=True)
class PruneTarget:
    """How much to prune and in what shape."""

    sparsity: float = 0.5
    pattern: str | None = None  # "N:M"; when set, sparsity is N/M
    group: str = "row"  # comparison group for unstructured masks
    variant: bool = False  # Wanda's cumulative-score alpha search
    update: bool = False  # least-squares update of the kept weights
    blocksize: int = 128  # SparseGPT's lazy-update block of columns
    percdamp: float = 0.01  # SparseGPT's dampening, a fraction of the mean diagonal of X^T X
    permute: bool = False  # reorder input channels before an N:M mask (RIA's channel permutation)

    def __post_init__(self):
        if self.pattern is not None:
            parse_pattern(self.pattern)
        else:
            check_sparsity(self.sparsity)
        if self.permute and self.pattern is None:
            raise ConfigError("--permute reorders input channels for an N:M pattern; give --pattern (e.g. 2:4)")
        check_group(self.group)
        if self.variant and (self.pattern or self.group != "row"):
            raise ConfigError("the cumulative-score variant applies to unstructured per-row pruning only")
        if self.blocksize <= 0:
            raise ConfigError("blocksize must be positive")
        if self.percdamp < 0:
            raise ConfigError("percdamp must be non-negative")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    def with_sparsity(self, sparsity: float) -> "PruneTarget":
        """The same target at another unstructured ``sparsity`` (one map's share of a layer-wise allocation)."""
        return self if sparsity == self.sparsity else replace(self, sparsity=sparsity)

    @property
    def expected_sparsity(self) -> float:
        if self.pattern:
            n, m = self.nm
            return n / m
        return self.sparsity


def keep_mask(score: torch.Tensor, target: PruneTarget) -> torch.Tensor:
    """The keep-mask a score gives under a target: N:M, per row, per tensor or the alpha variant."""
    if target.nm:
        return keep_n_of_m(score, *target.nm)
    if target.variant:
        return cumulative_alpha_keep(score, target.sparsity)[0]
    return keep_after_pruning(score, target.sparsity, target.group)


def prune_weight(weight: torch.Tensor, keep: torch.Tensor, stats: InputStats | None,
                 target: PruneTarget) -> torch.Tensor:
    """Zero the weights not kept, or (``target.update``) also refit the kept ones by least squares."""
    if target.update:
        return sparsegpt_prune(weight, stats.gram, keep=keep, blocksize=target.blocksize,
                               percdamp=target.percdamp)[0]
    return weight.masked_fill(~keep, 0)


PruneFn = Callable[[torch.Tensor, "InputStats | None", PruneTarget], "tuple[torch.Tensor, torch.Tensor]"]
ScoreFn = Callable[[torch.Tensor, "InputStats | None"], torch.Tensor]


@dataclass(frozen=True)
class PruneMethod:
    name: str
    needs: frozenset[str]  # statistics of the inputs the method uses
    fn: PruneFn
    doc: str
    score: ScoreFn | None = None  # the score its masks keep the highest of; None: a solver that decides its own
    group: str = "row"  # the comparison group of its unstructured masks when none is asked for

    def needs_for(self, target: PruneTarget) -> frozenset[str]:
        return self.needs | ({GRAM} if target.update else set())

    def check(self, target: PruneTarget) -> None:
        """Refuse a target this method cannot serve: a channel permutation needs a score to reorder by."""
        if target.permute and self.score is None:
            scored = ", ".join(sorted(name for name, method in PRUNE_METHODS.items() if method.score))
            raise ConfigError(f"--permute reorders channels by a score; {self.name} decides its mask while it "
                              f"updates the weights: use {scored} (with --update for a least-squares refit)")


PRUNE_METHODS: dict[str, PruneMethod] = {}


def register_prune_method(name: str, needs: tuple[str, ...] = ()):
    """Decorator: a method that decides its mask and weights itself, ``fn(weight, stats, target)``."""
    def decorate(fn: PruneFn) -> PruneFn:
        PRUNE_METHODS[name] = PruneMethod(name, frozenset(needs), fn, (fn.__doc__ or "").strip())
        return fn
    return decorate


def register_score_method(name: str, needs: tuple[str, ...] = (), group: str = "row"):
    """Decorator: a method made of a score, ``score(weight, stats)``: its mask keeps the highest scores under
    the target (:func:`keep_mask`), in ``group`` unless the target names one, and the weights are pruned by
    :func:`prune_weight`."""
    check_group(group)

    def decorate(score: ScoreFn) -> ScoreFn:
        def fn(weight, stats, target):
            keep = keep_mask(score(weight, stats), target)
            return prune_weight(weight, keep, stats, target), keep
        PRUNE_METHODS[name] = PruneMethod(name, frozenset(needs), fn, (score.__doc__ or "").strip(), score, group)
        return score
    return decorate


def get_prune_method(name: str) -> PruneMethod:
    return lookup(PRUNE_METHODS, "pruning method", name)


@register_score_method("magnitude")
def magnitude(weight, stats):
    """|W|, compared per row or per tensor (the classic baseline)."""
    return magnitude_score(weight)


@register_score_method("wanda", needs=(NORMS,))
def wanda(weight, stats):
    """|W_ij| * ||X_j||_2 (Sun et al., 2023), compared per output row by default."""
    return wanda_score(weight, stats.sq_norms)


@register_score_method("ria", needs=(NORMS,), group="tensor")
def ria(weight, stats):
    """(|W_ij| / sum_row |W| + |W_ij| / sum_col |W|) * ||X_j||_2 ** 0.5 (Zhang et al., 2024), compared per
    tensor by default (its official code; --group row is its per-output variant)."""
    return ria_score(weight, stats.sq_norms)


@register_prune_method("sparsegpt", needs=(GRAM,))
def sparsegpt(weight, stats, target):
    """OBS reconstruction with lazy block updates (Frantar & Alistarh, 2023)."""
    n, m = target.nm or (0, 0)
    sparsity = 0.0 if target.nm else target.sparsity
    return sparsegpt_prune(weight, stats.gram, sparsity=sparsity, n=n, m=m,
                           blocksize=target.blocksize, percdamp=target.percdamp)


def _register_dsnot(name: str, settings: DsnotSettings, doc: str) -> None:
    """A DSnoT method: Wanda's mask refined by :func:`~wandamerge.core.dsnot.dsnot_refine` under ``settings``,
    on any pattern; --update refits the kept weights after, --permute reorders by Wanda's score first."""
    def fn(weight, stats, target):
        score = wanda(weight, stats)
        keep = keep_mask(score, target)
        if stats.tokens and stats.means is not None:
            keep = dsnot_refine(weight, keep, score, stats.means, stats.m2 / stats.tokens, target.nm, settings)
        return prune_weight(weight, keep, stats, target), keep
    PRUNE_METHODS[name] = PruneMethod(name, frozenset({NORMS, MOMENTS}), fn, doc, score=wanda)


_register_dsnot("dsnot", DsnotSettings(), "Wanda's mask refined by DSnoT's swaps (Zhang et al., ICLR 2024): pruned "
                "weights that pull a row's mean output error towards zero regrown, kept weights of least Wanda "
                "score on the other side pruned, while the row's mean error shrinks without changing sign.")
_register_dsnot("dsnot-guarded", DsnotSettings(guard=True), "DSnoT whose swaps also may not raise the row's mean "
                "squared output error estimated with uncorrelated input channels (mean error squared plus the "
                "pruned weights' variance).")
