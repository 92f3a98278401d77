"""Choosing entries by score, with one polarity and one tie rule for every selection in the project.

A mask is ``True`` where an entry is KEPT. Higher scores are kept first; among
equal scores the entry with the lower index (the lower column within a row, or
the lower flat index of a tensor) is kept first. Pruning masks, N:M groups,
merge trims and the large-tensor path (:class:`TopCut`) all select here, so the
same scores give the same mask everywhere. Every function is pure.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

GROUPS = ("row", "tensor")  # comparison groups of an unstructured selection


# ----------------------------------------------------------------------------- checks


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N of every M consecutive input weights are dropped (M - N kept)."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except (ValueError, AttributeError):
        raise ConfigError(f"pattern {pattern!r} is not of the form N:M (for example 2:4)") from None
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def check_sparsity(sparsity: float) -> float:
    """A pruned fraction in ``[0, 1)``."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity {sparsity} is outside [0, 1)")
    return float(sparsity)


def check_density(density: float) -> float:
    """A kept fraction in ``(0, 1]``."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density {density} is outside (0, 1]")
    return density


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise ConfigError(f"group {group!r} is not one of {GROUPS}")
    return group


def keep_count(density: float, n: int) -> int:
    """mergekit's kept count for a group of ``n`` entries: ``max(1, int(density * n))``."""
    return min(n, max(1, int(density * n))) if n else 0


# ----------------------------------------------------------------------------- top-k under the tie rule


def rank_key(t: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype selection works in (halves are compared as float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A view with rows: a vector is one row, more than two dims are ``(shape[0], -1)``."""
    if t.ndim == 0:
        return t.reshape(1, 1)
    if t.ndim == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1)


def order_most_first(score: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices along ``dim`` from the entry kept first to the entry dropped first (the tie rule)."""
    return torch.sort(rank_key(score), dim=dim, descending=True, stable=True).indices


def order_least_first(score: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices along ``dim`` from the entry dropped first to the entry kept first."""
    return order_most_first(score, dim).flip(dim)


LEAN_MIN_NUMEL = 1 << 24  # rows at least this long are selected by histograms (the same mask, bounded memory)
SELECT_CHUNK = 1 << 22  # entries a histogram or mask pass handles at a time (few, large steps: fewer thread barriers)


def selects_lean(numel: int) -> bool:
    """Whether a selection over ``numel`` entries is large enough for :class:`TopCut` (and a merge of a
    tensor that large goes block by block)."""
    return numel >= LEAN_MIN_NUMEL


def top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` highest scores in every row of a 2-D ``score``.

    Uses a selection (``kthvalue``), not a sort; equals "the first k of a stable
    descending sort". A float row of at least :data:`LEAN_MIN_NUMEL` entries is
    selected by :class:`TopCut` instead (kthvalue copies its input and allocates
    int64 indices: ~4.5 times the score).
    """
    rows, n = score.shape
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    score = rank_key(score)
    if selects_lean(n) and score.dtype == torch.float32:
        return _top_mask_lean(score, k)
    threshold = score.kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest of each row
    greater = score > threshold
    equal = score == threshold
    need = k - greater.sum(dim=1, keepdim=True)
    if bool((equal.sum(dim=1, keepdim=True) == need).all()):  # no tie at the cut-off: the usual case
        return greater | equal
    return greater | (equal & (equal.cumsum(dim=1) <= need))


def _top_mask_lean(score: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(score.shape, dtype=torch.bool, device=score.device)
    for row, out_row in zip(score, out):
        (cut,) = TopCut.find(lambda: chunks(row), row.numel(), [k])
        for chunk, out_chunk in zip(chunks(row), chunks(out_row)):
            out_chunk.copy_(cut.mask(chunk))
    return out


def keep_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` highest scores of every row (a vector is one row; see :func:`as_rows`)."""
    return top_mask(as_rows(score), k).view_as(score)


def keep_per_tensor(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` highest scores of the whole tensor."""
    return top_mask(score.reshape(1, -1), k).view_as(score)


def keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask that drops the ``n`` lowest of every ``m`` consecutive entries of each row of a matrix."""
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern {n}:{m}: need 0 < N < M")
    if score.ndim != 2:
        raise ConfigError(f"an N:M pattern needs a matrix, got shape {tuple(score.shape)}")
    if score.shape[1] % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {score.shape[1]}")
    return top_mask(score.reshape(-1, m), m - n).view_as(score)


def keep_in_group(score: torch.Tensor, k: int, group: str) -> torch.Tensor:
    """Keep-mask of the ``k`` highest scores per row or per tensor."""
    return keep_per_row(score, k) if check_group(group) == "row" else keep_per_tensor(score, k)


def keep_after_pruning(score: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep-mask that drops ``floor(sparsity * n)`` of each group of ``n`` (a row of a matrix, or the tensor)."""
    check_sparsity(sparsity)
    n = score.shape[1] if check_group(group) == "row" else score.numel()
    return keep_in_group(score, n - int(n * sparsity), group)


def cumulative_alpha_keep(score: torch.Tensor, sparsity: float, tolerance: float = 1e-3,
                          max_steps: int = 50) -> tuple[torch.Tensor, float]:
    """The Wanda paper's variant: per row, drop the lowest scores whose running sum stays within
    ``alpha`` times the row's total, with ``alpha`` found by bisection so the tensor reaches ``sparsity``.

    Returns the keep-mask and the alpha found. The running sum follows :func:`order_least_first`.
    """
    check_sparsity(sparsity)
    order = order_least_first(score, dim=1)
    cumulative = rank_key(score).gather(1, order).cumsum(dim=1)
    totals = cumulative[:, -1:]
    ranks = torch.arange(score.shape[1], device=score.device).expand_as(score)

    def keep_for(alpha: float) -> torch.Tensor:
        dropped_per_row = (cumulative <= alpha * totals).sum(dim=1, keepdim=True)
        keep = torch.empty_like(score, dtype=torch.bool)
        keep.scatter_(1, order, ranks >= dropped_per_row)
        return keep

    low, high, alpha = 0.0, 1.0, 0.5
    keep = keep_for(alpha)
    for _ in range(max_steps):
        achieved = (~keep).float().mean().item()
        if abs(achieved - sparsity) <= tolerance:
            break
        if achieved > sparsity:
            high = alpha
        else:
            low = alpha
        alpha = (low + high) / 2
        keep = keep_for(alpha)
    return keep, alpha


# ----------------------------------------------------------------------------- the large-tensor path


def order_keys(score: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 ``score`` (NaN-free), ``-0.0`` equal to ``0.0``: the bit
    pattern's magnitude, negated for a negative number (``(bits ^ 0x7FFFFFFF) + 1`` there)."""
    bits = score.reshape(-1).view(torch.int32)
    negative = bits >> 31  # -1 for a negative number, else 0
    return (bits ^ (negative & 0x7FFFFFFF)) - negative


_HALF = 1 << 15  # the top 16 bits of a key, shifted to a bin index in [0, 2**16)


def chunks(row: torch.Tensor):
    """``row`` in flat pieces of :data:`SELECT_CHUNK` entries."""
    for start in range(0, row.numel(), SELECT_CHUNK):
        yield row[start:start + SELECT_CHUNK]


class TopCut:
    """The ``k`` highest of ``n`` float32 scores, found in two histogram passes over chunks.

    ``chunks()`` yields the scores in flat order (each call a new pass; float16 and
    bfloat16 chunks are compared as float32). Pass 1 counts the top 16 bits of
    the order keys (:func:`order_keys`), pass 2 the low 16 bits inside the bin
    holding the k-th highest: that gives its exact key and how many of the keys
    equal to it are kept. :meth:`mask` then gives the keep-mask of each chunk
    in turn, in flat order, keeping equal scores at the cut-off from the lowest
    flat index on -- the mask :func:`top_mask` gives, without a full-size copy.
    Several cuts of the same scores share their passes (:meth:`find`).
    """

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        self.key = None
        self.left = 0  # entries equal to the cut-off still to keep

    @property
    def trivial(self) -> bool:
        return self.k <= 0 or self.k >= self.n

    @staticmethod
    def find(chunks, n: int, ks) -> list["TopCut"]:
        cuts = [TopCut(n, k) for k in ks]
        todo = [cut for cut in cuts if not cut.trivial]
        if not todo:
            return cuts
        high = torch.zeros(1 << 16, dtype=torch.int64)
        for chunk in chunks():
            high += torch.bincount((order_keys(rank_key(chunk)) >> 16) + _HALF, minlength=1 << 16)
        above_high = high.flip(0).cumsum(0).flip(0)  # entries in this bin or a higher one
        bins = {}
        for cut in todo:
            b = int((above_high >= cut.k).nonzero().max())
            cut.key, cut.left = b, cut.k - int(above_high[b] - high[b])  # rank inside bin b
            bins.setdefault(b, torch.zeros(1 << 16, dtype=torch.int64))
        for chunk in chunks():
            keys = order_keys(rank_key(chunk))
            high_bits = keys >> 16
            for b, low in bins.items():
                low += torch.bincount(keys[high_bits == b - _HALF] & 0xFFFF, minlength=1 << 16)
        for cut in todo:
            low = bins[cut.key]
            above_low = low.flip(0).cumsum(0).flip(0)
            lo = int((above_low >= cut.left).nonzero().max())
            cut.left -= int(above_low[lo] - low[lo])  # equal keys to keep after the greater ones
            cut.key = (cut.key - _HALF) * (1 << 16) + lo
        return cuts

    def mask(self, chunk: torch.Tensor) -> torch.Tensor:
        """Keep-mask of the next chunk (flat, in order)."""
        if self.trivial:
            return torch.full((chunk.numel(),), self.k > 0, dtype=torch.bool)
        keys = order_keys(rank_key(chunk))
        greater = keys > self.key
        equal = keys == self.key
        if self.left <= 0:
            return greater
        ties = int(equal.sum())
        if ties > self.left:
            equal &= equal.cumsum(0) <= self.left
            ties = self.left
        self.left -= ties
        return greater | equal
