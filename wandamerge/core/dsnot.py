"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): refine a pruning mask by swaps, no training.

A row ``i`` of a pruned weight changes the map's output by ``e_i = sum_{j pruned} W_ij * mean(x_j)`` on
average over the calibration tokens (the paper's reconstruction error). DSnoT shrinks ``|e_i|`` by swapping,
one pair per cycle and row: it regrows the pruned weight whose ``W_ij * mean(x_j) / var(x_j) ** p`` pulls
``e_i`` hardest towards zero, and prunes, among the weights kept at the start, the one of least score whose
``W_ij * mean(x_j)`` has the other sign (with an N:M pattern: the kept weight of least score in the regrown
weight's group of M, so every group still keeps M - N). A row stops at its first swap that would flip the
sign of ``e_i``, once ``|e_i|`` is at most the threshold, or after the last cycle (the paper's rules, as its
official code, github.com/zyxxmu/DSnoT, ``lib/prune.py``).

Two rules are added here so that no swap makes the row worse:

* a swap must make ``|e_i|`` smaller (the paper only forbids a sign flip; a regrown weight of the wrong sign
  can otherwise grow ``|e_i|`` when the candidates run out);
* with ``guard``, a swap must not raise ``e_i ** 2 + sum_{j pruned} W_ij ** 2 var(x_j)``, the
  mean squared output error of the row when the input channels are uncorrelated (exactly so for inputs
  whose channels have zero covariance). Without it a swap that centres the mean error may add variance.

Rows are independent; they are refined a block of rows at a time to bound the memory of the sorts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

DSNOT_CYCLES = 50  # the paper's max_cycle_time
DSNOT_THRESHOLD = 0.1 / 2048  # the paper's update_threshold 0.1 on sums over its 2048-token windows, per token
DSNOT_VAR_POWER = 1.0  # the paper's pow_of_var_regrowing
_ROWS_AT_ONCE = 1024
VAR_FLOOR = 1e-30  # a channel of constant input divides by this, not by 0: regrown first, as it adds no variance


@dataclass(frozen=True)
class DsnotSettings:
    cycles: int = DSNOT_CYCLES
    threshold: float = DSNOT_THRESHOLD
    var_power: float = DSNOT_VAR_POWER
    guard: bool = False

    def __post_init__(self):
        if self.cycles < 0 or self.threshold < 0:
            raise ConfigError("DSnoT needs cycles >= 0 and a threshold >= 0")


def dsnot_refine(weight: torch.Tensor, keep: torch.Tensor, score: torch.Tensor, means: torch.Tensor,
                 variances: torch.Tensor, nm: tuple[int, int] | None = None,
                 settings: DsnotSettings = DsnotSettings()) -> torch.Tensor:
    """The keep-mask ``keep`` of ``weight`` (out, in) refined by DSnoT's swaps (a new mask; every row keeps as
    many weights as before, and with ``nm`` every group of M as many). ``score`` (out, in) ranks the weights
    to prune (least first: the score the mask came from); ``means`` and ``variances`` (in,) are the
    per-channel mean and variance of the inputs over the calibration tokens."""
    if keep.shape != weight.shape or score.shape != weight.shape:
        raise ConfigError(f"DSnoT: mask {tuple(keep.shape)} and score {tuple(score.shape)} must have the "
                          f"weight's shape {tuple(weight.shape)}")
    if means.shape != (weight.shape[1],) or variances.shape != (weight.shape[1],):
        raise ConfigError(f"DSnoT: input means and variances must have shape ({weight.shape[1]},)")
    refined = keep.clone()
    mean = means.to(weight.device, torch.float64)
    var = variances.to(weight.device, torch.float64).clamp_min(0)
    for start in range(0, weight.shape[0], _ROWS_AT_ONCE):
        rows = slice(start, start + _ROWS_AT_ONCE)
        refined[rows] = _refine_rows(weight[rows].detach().double(), keep[rows], score[rows].float(), mean, var,
                                     nm, settings)
    return refined


def _refine_rows(w, keep, score, mean, var, nm, settings: DsnotSettings) -> torch.Tensor:
    keep = keep.clone()
    kept_at_start = keep.clone()
    effect = w * mean  # W_ij * mean(x_j): what weight ij adds to row i's mean output
    error = (effect * ~keep).sum(1)  # e_i
    sign = error.sign()
    variance_cost = w ** 2 * var  # what pruning weight ij adds to row i's output variance
    variance_error = (variance_cost * ~keep).sum(1)
    grow = _GrowQueue(effect, var, keep, sign, settings.var_power)
    cut = None if nm else _CutQueue(effect, score, keep, sign)
    active = sign != 0
    for _ in range(settings.cycles):
        active &= error.abs() > settings.threshold
        if not active.any():
            break
        g, g_ok = grow.next()
        p, p_ok = _cut_in_group(keep & kept_at_start, score, g, nm[1]) if nm else cut.next()
        after = error - _at(effect, g) + _at(effect, p)
        ok = active & g_ok & p_ok & (after.sign() == sign) & (after.abs() < error.abs())
        after_variance = variance_error - _at(variance_cost, g) + _at(variance_cost, p)
        if settings.guard:
            ok &= after ** 2 + after_variance <= error ** 2 + variance_error
        swapped = ok.nonzero().squeeze(1)
        keep[swapped, g[swapped]] = True
        keep[swapped, p[swapped]] = False
        error = torch.where(ok, after, error)
        variance_error = torch.where(ok, after_variance, variance_error)
        grow.advance(ok)
        if cut is not None:
            cut.advance(ok)
        active = ok
    return keep


def _at(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``values[i, columns[i]]`` for every row i."""
    return values.gather(1, columns.unsqueeze(1)).squeeze(1)


class _Queue:
    """Per row, candidate columns in order (``order``, the first ``count`` of each row are candidates) and how
    many of them are used."""

    def __init__(self, key: torch.Tensor, candidate: torch.Tensor):
        self.order = key.masked_fill(~candidate, float("inf")).argsort(dim=1, stable=True)
        self.count = candidate.sum(1)
        self.used = torch.zeros_like(self.count)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next candidate column and whether it has one."""
        position = self.used.clamp_max(self.order.shape[1] - 1)
        return _at(self.order, position), self.used < self.count

    def advance(self, taken: torch.Tensor) -> None:
        self.used += taken.long()


class _GrowQueue(_Queue):
    """Pruned weights to regrow, the one pulling ``e_i`` hardest towards zero per unit of input variance
    first (the paper's ``W_ij * mean(x_j) / var(x_j) ** p``)."""

    def __init__(self, effect, var, keep, sign, var_power: float):
        pull = sign.unsqueeze(1) * effect / var.clamp_min(VAR_FLOOR) ** var_power
        super().__init__(-pull, ~keep)


class _CutQueue(_Queue):
    """Unstructured: weights kept at the start whose effect has the sign opposite to ``e_i`` (pruning one pulls
    ``e_i`` towards zero), least score first."""

    def __init__(self, effect, score, keep, sign):
        super().__init__(score.double(), keep & (sign.unsqueeze(1) * effect < 0))


def _cut_in_group(candidates: torch.Tensor, score: torch.Tensor, grown: torch.Tensor,
                  m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M: the weight of least score among ``candidates`` in the group of M holding column ``grown[i]``, per
    row, and whether the group has one."""
    columns = (grown - grown % m).unsqueeze(1) + torch.arange(m, device=grown.device)
    key = score.gather(1, columns).double().masked_fill(~candidates.gather(1, columns), float("inf"))
    least = key.argmin(dim=1)
    return columns.gather(1, least.unsqueeze(1)).squeeze(1), key.gather(1, least.unsqueeze(1)).squeeze(1).isfinite()
