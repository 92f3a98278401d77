"""Masks from scores: ``True`` marks a weight to prune (to set to zero).

Every function is pure. Equal scores are broken deterministically: a stable
sort ranks the lower column index as less important, so the same scores always
give the same mask.
"""

from __future__ import annotations

import torch


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: prune N of every M consecutive input weights."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not of the form N:M (for example 2:4)") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    return float(sparsity)


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest entries along the last dim (stable: lower index first)."""
    return torch.sort(score, dim=-1, stable=True).indices[..., :k]


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune ``floor(in_features * sparsity)`` lowest scores in every output row."""
    k = int(score.shape[1] * check_sparsity(sparsity))
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, _lowest(score, k), True)
    return mask


def tensor_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune ``floor(numel * sparsity)`` lowest scores of the whole tensor."""
    k = int(score.numel() * check_sparsity(sparsity))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[_lowest(score.flatten(), k)] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores in every group of ``m`` consecutive inputs of a row."""
    rows, cols = score.shape
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {n}:{m}: need 0 < N < M")
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, _lowest(groups, n), True)
    return mask.view(rows, cols)


def cumulative_alpha_mask(score: torch.Tensor, sparsity: float, tolerance: float = 1e-3,
                          max_steps: int = 50) -> tuple[torch.Tensor, float]:
    """The Wanda paper's variant: per row, prune the lowest scores whose running
    sum stays within ``alpha`` times the row's total score, with ``alpha`` found
    by bisection so that the whole tensor reaches ``sparsity``.

    Returns the mask and the alpha found.
    """
    check_sparsity(sparsity)
    ordered = torch.sort(score, dim=1, stable=True)
    cumulative = ordered.values.cumsum(dim=1)
    totals = cumulative[:, -1:]

    def mask_for(alpha: float) -> torch.Tensor:
        pruned_per_row = (cumulative <= alpha * totals).sum(dim=1, keepdim=True)
        ranks = torch.arange(score.shape[1], device=score.device).expand_as(score)
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask.scatter_(1, ordered.indices, ranks < pruned_per_row)
        return mask

    low, high = 0.0, 1.0
    alpha = 0.5
    mask = mask_for(alpha)
    for _ in range(max_steps):
        achieved = mask.float().mean().item()
        if abs(achieved - sparsity) <= tolerance:
            break
        if achieved > sparsity:
            high = alpha
        else:
            low = alpha
        alpha = (low + high) / 2
        mask = mask_for(alpha)
    return mask, alpha


def mask_sparsity(mask: torch.Tensor) -> float:
    return mask.float().mean().item()
