"""Pruning methods, registered by name.

A method turns one weight ``(out, in)`` and the statistics of its inputs into
a pruned weight and its mask. Adding a method is one decorated function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..runner import GRAM, NORMS, InputStats
from .masks import check_sparsity, cumulative_alpha_mask, nm_mask, parse_pattern, row_mask, tensor_mask
from .scores import magnitude_score, wanda_score
from .sparsegpt import sparsegpt_prune

GROUPS = ("row", "tensor")


@dataclass(frozen=True)
class PruneTarget:
    """How much to prune and in what shape."""

    sparsity: float = 0.5
    pattern: str | None = None  # "N:M"; when set, sparsity is N/M
    group: str = "row"  # comparison group for unstructured masks
    variant: bool = False  # Wanda's cumulative-score alpha search
    update: bool = False  # least-squares update of the kept weights
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        if self.pattern is not None:
            parse_pattern(self.pattern)
        else:
            check_sparsity(self.sparsity)
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")
        if self.variant and (self.pattern or self.group != "row"):
            raise ValueError("the cumulative-score variant applies to unstructured per-row pruning only")
        if self.blocksize <= 0:
            raise ValueError("blocksize must be positive")
        if self.percdamp < 0:
            raise ValueError("percdamp must be non-negative")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def expected_sparsity(self) -> float:
        if self.pattern:
            n, m = self.nm
            return n / m
        return self.sparsity


def mask_from_score(score: torch.Tensor, target: PruneTarget) -> torch.Tensor:
    """The mask a score gives under a target: N:M, per-row, per-tensor or the alpha variant."""
    if target.nm:
        return nm_mask(score, *target.nm)
    if target.variant:
        return cumulative_alpha_mask(score, target.sparsity)[0]
    if target.group == "row":
        return row_mask(score, target.sparsity)
    return tensor_mask(score, target.sparsity)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor, stats: InputStats | None,
               target: PruneTarget) -> torch.Tensor:
    """Zero the masked weights, or (``target.update``) also refit the kept ones by least squares."""
    if target.update:
        return sparsegpt_prune(weight, stats.gram, mask=mask, blocksize=target.blocksize,
                               percdamp=target.percdamp)[0]
    return weight.masked_fill(mask, 0)


PruneFn = Callable[[torch.Tensor, "InputStats | None", PruneTarget], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class PruneMethod:
    name: str
    needs: frozenset[str]  # statistics of the inputs the method uses
    fn: PruneFn
    doc: str

    def needs_for(self, target: PruneTarget) -> frozenset[str]:
        return self.needs | ({GRAM} if target.update else set())


PRUNE_METHODS: dict[str, PruneMethod] = {}


def register_prune_method(name: str, needs: tuple[str, ...] = ()):
    def decorate(fn: PruneFn) -> PruneFn:
        PRUNE_METHODS[name] = PruneMethod(name, frozenset(needs), fn, (fn.__doc__ or "").strip())
        return fn
    return decorate


def get_prune_method(name: str) -> PruneMethod:
    if name not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(PRUNE_METHODS))}")
    return PRUNE_METHODS[name]


@register_prune_method("magnitude")
def magnitude(weight, stats, target):
    """|W|, compared per row or per tensor (the classic baseline)."""
    mask = mask_from_score(magnitude_score(weight), target)
    return apply_mask(weight, mask, stats, target), mask


@register_prune_method("wanda", needs=(NORMS,))
def wanda(weight, stats, target):
    """|W_ij| * ||X_j||_2 (Sun et al., 2023), compared per output row by default."""
    mask = mask_from_score(wanda_score(weight, stats.sq_norms), target)
    return apply_mask(weight, mask, stats, target), mask


@register_prune_method("sparsegpt", needs=(GRAM,))
def sparsegpt(weight, stats, target):
    """OBS reconstruction with lazy block updates (Frantar & Alistarh, 2023)."""
    n, m = target.nm or (0, 0)
    sparsity = 0.0 if target.nm else target.sparsity
    return sparsegpt_prune(weight, stats.gram, sparsity=sparsity, n=n, m=m,
                           blocksize=target.blocksize, percdamp=target.percdamp)
