"""Reordering the input channels of a matrix so that an N:M mask keeps more of its score (RIA's channel
permutation, Zhang et al., ICLR 2024, Section 3.2). Tensors in, tensors out.

An order is a permutation of column indices: the reordered matrix's column ``k`` is the old column
``order[k]`` (``score[:, order]``). An N:M mask drops the ``n`` lowest of every ``m`` consecutive entries of a
row, so which channels share a group of ``m`` decides how much score it can keep. As the official code
(github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning, ``lib/prune.py``, ``prune_ria``
with ``--reallocation --lsa``, its default importance ``sum`` and one block):

1. heuristic channel reallocation (:func:`reallocated_order`): the channels sorted by their summed score, cut
   into ``m`` ranges, the ``i``-th channel of every group taken from the ``i``-th range, every other range
   walked backwards;
2. one linear-sum-assignment round per position ``s`` of a group (:func:`reassign_position`): every group
   keeps its other ``m - 1`` channels, and the channels in position ``s`` are dealt out again among the groups
   so that the total kept score is the largest possible (``scipy.optimize.linear_sum_assignment``).

Unlike the official code, the start is the identity where the reallocation keeps less than no reordering,
and a round is kept only where it keeps at least as much as before: the order found never keeps less score
than the matrix as it is (:func:`nm_permutation`).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def permute_inputs(weight: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) with its columns reordered: column ``k`` is the old column ``order[k]``."""
    return weight.index_select(1, order.to(weight.device))


def permute_outputs(weight: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, ...) or a bias (out,) with its rows reordered: row ``k`` is the old row ``order[k]``."""
    return weight.index_select(0, order.to(weight.device))


def _check_nm(score: torch.Tensor, n: int, m: int) -> None:
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern {n}:{m}: need 0 < N < M")
    if score.ndim != 2 or score.shape[1] % m:
        raise ConfigError(f"an N:M reordering needs a matrix with a width divisible by {m}, got shape "
                          f"{tuple(score.shape)}")


def nm_kept_score(score: torch.Tensor, n: int, m: int) -> float:
    """The total score an N:M mask keeps: the ``m - n`` highest of every ``m`` consecutive entries of each row,
    summed in float64 (which entries are kept among equal scores does not change the total)."""
    _check_nm(score, n, m)
    return float(score.reshape(-1, m).topk(m - n, dim=1).values.double().sum())


def reallocated_order(score: torch.Tensor, m: int) -> torch.Tensor:
    """The official heuristic channel reallocation: channels sorted by their score summed over the rows
    (ascending, stable), cut into ``m`` equal ranges; position ``i`` of group ``g`` takes the ``g``-th channel
    of range ``i`` (range ``i`` walked backwards for odd ``i``)."""
    width = score.shape[1]
    groups = width // m
    ranked = torch.sort(score.double().sum(dim=0), stable=True).indices
    order = torch.empty_like(ranked)
    for i in range(m):
        part = ranked[i * groups:(i + 1) * groups]
        order[i::m] = part.flip(0) if i % 2 else part
    return order


def reassign_position(score: torch.Tensor, n: int, m: int, position: int) -> torch.Tensor:
    """Which group's channel in ``position`` every group should take (a permutation of the groups) so that the
    N:M mask of ``score`` keeps the most, every group's other ``m - 1`` channels staying where they are.

    With ``k = m - n`` kept of a group, adding a channel ``v`` to the other channels ``f_1 >= ... >= f_{m-1}``
    keeps ``f_1 + ... + f_{k-1} + max(v, f_k)`` in each row; the first part does not depend on the assignment,
    and the summed maxima over the rows are ``(sum f_k + sum v + sum |v - f_k|) / 2``, an L1 distance
    (``torch.cdist``). The official code sorts every candidate group instead: the same gains up to a term per
    group, which leaves the assignment alone.
    """
    from scipy.optimize import linear_sum_assignment

    rows, width = score.shape
    grouped = score.float().reshape(rows, width // m, m)
    moving = grouped[:, :, position]  # (rows, groups): the candidates
    others = torch.cat([grouped[:, :, :position], grouped[:, :, position + 1:]], dim=2)
    kth = others.topk(m - n, dim=2).values[:, :, -1]  # (rows, groups): f_k of every group
    gain = (kth.sum(0).unsqueeze(1) + moving.sum(0).unsqueeze(0)
            + torch.cdist(kth.T.unsqueeze(0), moving.T.unsqueeze(0), p=1)[0]) / 2
    _, taken = linear_sum_assignment(gain.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(taken, dtype=torch.long)


def nm_permutation(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """An order of the columns of ``score`` (see the module's text) whose N:M mask keeps at least as much
    score as the columns in their own order, and usually more: reallocation, then one assignment round per
    position of a group."""
    _check_nm(score, n, m)
    score = score.detach().float()
    width = score.shape[1]
    order = torch.arange(width, device=score.device)
    best = nm_kept_score(score, n, m)
    start = reallocated_order(score, m).to(score.device)
    if (kept := nm_kept_score(score[:, start], n, m)) >= best:
        order, best = start, kept
    for position in range(m):
        taken = reassign_position(score[:, order], n, m, position).to(score.device)
        candidate = order.clone()
        candidate[position::m] = order[position::m][taken]
        if (kept := nm_kept_score(score[:, candidate], n, m)) >= best:
            order, best = candidate, kept
    return order
