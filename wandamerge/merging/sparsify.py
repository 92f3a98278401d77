"""Sparsifiers for ONE task vector: a delta ``finetuned - base`` in, the sparsified delta out.

Every function is pure: the input is never modified (at ``density == 1`` it is
returned as is, like mergekit does). A delta is a matrix ``(out, in)`` or a
vector; a tensor of more dimensions is treated as ``(shape[0], -1)`` where rows
matter.

Conventions, chosen to reproduce mergekit 0.1.5 (``mergekit/sparsify.py``):

* ``density`` is the fraction of entries kept, in ``(0, 1]``.
* The kept count of a comparison group of ``n`` entries is
  ``max(1, int(density * n))`` -- mergekit's count for its magnitude trim
  (the same Python float expression, so ``0.29 * 100`` keeps 28 as it does).
  Breadcrumbs keeps exactly ``int(density * n)`` (no minimum of one), as mergekit.
* **Ties.** Entries are ranked by score, highest first; among equal scores the
  entry with the LOWER flat index (lower column within a row) ranks higher. So
  at a magnitude cut-off the lower indices are kept, breadcrumbs' outlier cut
  removes the lower indices first, and DELLA gives the lower index the higher
  rank. mergekit uses a non-stable ``argsort`` there, so its choice among ties is
  arbitrary; on tensors without ties both give the same entries.
* **Rescale** (``rescale=``): ``False``/``None`` keeps the surviving entries as
  they are. ``True`` means mergekit 0.1.5's rescale, ``"l1"``: the survivors are
  scaled so the delta keeps its L1 norm (skipped when either norm is below
  1e-7). ``"l2"`` and ``"linf"`` match those norms instead. ``"density"`` divides
  by ``density`` (the DARE paper, PEFT and mergekit before 0.1: unbiased in
  expectation for the random drop).

The registry at the bottom gives every sparsifier one call signature, see
:func:`register_sparsifier` and :func:`sparsify`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch

from ..pruning.masks import parse_pattern
from ..pruning.scores import wanda_score

Rescale = Union[bool, None, Literal["l1", "l2", "linf", "density"]]
RESCALE_MODES = ("l1", "l2", "linf", "density")
GROUPS = ("tensor", "row")
RESCALE_EPS = 1e-7  # mergekit's tolerance for a norm too small to rescale


# ----------------------------------------------------------------------------
# checks and small helpers
# ----------------------------------------------------------------------------

def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density {density} is outside (0, 1]")
    return density


def keep_count(density: float, n: int) -> int:
    """mergekit's kept count for a group of ``n`` entries: ``max(1, int(density * n))``."""
    return min(n, max(1, int(density * n))) if n else 0


def _rescale_mode(rescale: Rescale) -> str | None:
    if rescale is None or rescale is False:
        return None
    if rescale is True:
        return "l1"
    if rescale in RESCALE_MODES:
        return rescale
    raise ValueError(f"rescale {rescale!r} is not one of False, True, {', '.join(map(repr, RESCALE_MODES))}")


def apply_mask(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: Rescale = False) -> torch.Tensor:
    """``delta * keep``, then rescaled as ``rescale`` says (see the module doc)."""
    mode = _rescale_mode(rescale)
    masked = delta * keep.to(delta.dtype)
    if mode is None:
        return masked
    if mode == "density":
        return masked / density
    if mode == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif mode == "l2":
        before, after = delta.norm(), masked.norm()
    else:
        before, after = delta.abs().max(), masked.abs().max()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A view with rows: a vector is one row, more than two dims are ``(shape[0], -1)``."""
    if t.ndim == 0:
        return t.reshape(1, 1)
    if t.ndim == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1)


def _rank_key(t: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype selection works in (halves are compared as float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


LEAN_MIN_NUMEL = 1 << 24  # rows at least this long are selected by histograms (the same mask, bounded memory)
SELECT_CHUNK = 1 << 22  # entries a histogram or mask pass handles at a time (few, large steps: fewer thread barriers)


def selects_lean(numel: int) -> bool:
    """Whether a selection over ``numel`` entries is large enough for :class:`TopCut`
    (and a merge of a tensor that large goes block by block, :mod:`.chunked`)."""
    return numel >= LEAN_MIN_NUMEL


def top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest scores in every row of a 2-D ``score``.

    Uses a selection (``kthvalue``), not a sort. Equal scores at the cut-off go
    to the lower column index first, so the result is the same every call and
    equals "the first k of a stable descending sort". A float row of at least
    :data:`LEAN_MIN_NUMEL` entries is selected by :class:`TopCut` instead
    (kthvalue copies its input and allocates int64 indices: ~4.5 times the score).
    """
    rows, n = score.shape
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    score = _rank_key(score)
    if selects_lean(n) and score.dtype == torch.float32:
        out = torch.empty(score.shape, dtype=torch.bool, device=score.device)
        for row, out_row in zip(score, out):
            (cut,) = TopCut.find(lambda: _chunks(row), n, [k])
            for chunk, out_chunk in zip(_chunks(row), _chunks(out_row)):
                out_chunk.copy_(cut.mask(chunk))
        return out
    threshold = score.kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest of each row
    greater = score > threshold
    equal = score == threshold
    need = k - greater.sum(dim=1, keepdim=True)
    if bool((equal.sum(dim=1, keepdim=True) == need).all()):  # no tie at the cut-off: the usual case
        return greater | equal
    return greater | (equal & (equal.cumsum(dim=1) <= need))


def _order_keys(score: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 ``score`` (NaN-free), ``-0.0`` equal to ``0.0``: the bit
    pattern's magnitude, negated for a negative number (``(bits ^ 0x7FFFFFFF) + 1`` there)."""
    bits = score.reshape(-1).view(torch.int32)
    negative = bits >> 31  # -1 for a negative number, else 0
    return (bits ^ (negative & 0x7FFFFFFF)) - negative


_HALF = 1 << 15  # the top 16 bits of a key, shifted to a bin index in [0, 2**16)


def _chunks(row: torch.Tensor):
    for start in range(0, row.numel(), SELECT_CHUNK):
        yield row[start:start + SELECT_CHUNK]


class TopCut:
    """The ``k`` highest of ``n`` float32 scores, found in two histogram passes over chunks.

    ``chunks()`` yields the scores in flat order (each call a new pass; float16 and
    bfloat16 chunks are compared as float32). Pass 1 counts the top 16 bits of
    the order keys (:func:`_order_keys`), pass 2 the low 16 bits inside the bin
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
            high += torch.bincount((_order_keys(_rank_key(chunk)) >> 16) + _HALF, minlength=1 << 16)
        above_high = high.flip(0).cumsum(0).flip(0)  # entries in this bin or a higher one
        bins = {}
        for cut in todo:
            b = int((above_high >= cut.k).nonzero().max())
            cut.key, cut.left = b, cut.k - int(above_high[b] - high[b])  # rank inside bin b
            bins.setdefault(b, torch.zeros(1 << 16, dtype=torch.int64))
        for chunk in chunks():
            keys = _order_keys(_rank_key(chunk))
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
        keys = _order_keys(_rank_key(chunk))
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


def _group_keep(score: torch.Tensor, density: float, group: str, pattern: str | None) -> torch.Tensor:
    """Bool keep-mask of ``score``'s shape for a comparison group or an N:M pattern."""
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if score.ndim != 2:
            raise ValueError(f"an N:M pattern needs a matrix, got shape {tuple(score.shape)}")
        rows, cols = score.shape
        if cols % m:
            raise ValueError(f"N:M pattern {pattern} needs in_features divisible by {m}, got {cols}")
        return top_mask(score.reshape(-1, m), m - n).view_as(score)
    if group == "tensor":
        flat = score.reshape(1, -1)
        return top_mask(flat, keep_count(density, flat.shape[1])).view_as(score)
    if group == "row":
        rows = _as_rows(score)
        return top_mask(rows, keep_count(density, rows.shape[1])).view_as(score)
    raise ValueError(f"group {group!r} is not one of {GROUPS}")


# ----------------------------------------------------------------------------
# sparsifiers
# ----------------------------------------------------------------------------

def score_trim(delta: torch.Tensor, score: torch.Tensor, density: float, group: str = "row",
               pattern: str | None = None, rescale: Rescale = False) -> torch.Tensor:
    """Keep the entries of ``delta`` with the highest ``score`` (same shape).

    ``group="row"`` keeps ``max(1, int(density * in))`` per output row (a vector
    is one row); ``group="tensor"`` keeps ``max(1, int(density * numel))`` of the
    whole tensor. ``pattern="N:M"`` (matrices only) instead keeps the ``M - N``
    highest of every ``M`` consecutive inputs of a row, and ignores ``density``
    and ``group``. Ties: see the module doc.
    """
    density = check_density(density)
    if score.shape != delta.shape:
        raise ValueError(f"score has shape {tuple(score.shape)}, delta {tuple(delta.shape)}")
    if density >= 1.0 and pattern is None:
        return delta
    return apply_mask(delta, _group_keep(score, density, group, pattern), density, rescale)


def magnitude_trim(delta: torch.Tensor, density: float, group: str = "tensor", pattern: str | None = None,
                   rescale: Rescale = False) -> torch.Tensor:
    """TIES' trim: keep the top ``density`` fraction by ``|delta|``.

    ``group="tensor"`` is mergekit's ``magnitude``: exactly
    ``max(1, int(density * numel))`` entries survive. ``group`` and ``pattern``
    as in :func:`score_trim`.
    """
    return score_trim(delta, delta.abs(), density, group=group, pattern=pattern, rescale=rescale)


def wanda_delta_score(delta: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance of a delta: ``|delta_ij| * ||X_j||_2`` with
    ``input_sq_norms[j] = sum over calibration tokens of x_j ** 2`` (float32)."""
    if delta.ndim != 2:
        raise ValueError(f"a Wanda score needs a matrix (out, in), got shape {tuple(delta.shape)}")
    return wanda_score(delta, input_sq_norms)


def wanda_trim(delta: torch.Tensor, input_sq_norms: torch.Tensor, density: float, group: str = "row",
               pattern: str | None = None, rescale: Rescale = False) -> torch.Tensor:
    """:func:`score_trim` with the Wanda score of the delta."""
    return score_trim(delta, wanda_delta_score(delta, input_sq_norms), density, group=group, pattern=pattern,
                      rescale=rescale)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator | None = None,
              rescale: Rescale = True) -> torch.Tensor:
    """DARE: keep every entry independently with probability ``density``.

    mergekit's ``bernoulli``: one ``torch.bernoulli`` draw over a float32 tensor
    filled with ``density`` (so with the same seed the mask equals mergekit's
    under ``torch.manual_seed``), then ``rescale`` -- ``True`` is mergekit 0.1.5's
    L1-norm match; ``"density"`` divides by ``density``, whose expectation is
    exactly ``delta``.
    """
    density = check_density(density)
    if density >= 1.0:
        return delta
    probs = torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    keep = torch.bernoulli(probs, generator=generator)
    return apply_mask(delta, keep, density, rescale)


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: Rescale = False) -> torch.Tensor:
    """Model Breadcrumbs (mergekit's ``magnitude_outliers``), over the whole tensor.

    Remove the ``int(gamma * numel)`` largest ``|delta|`` (outliers), then the
    smallest, keeping exactly ``int(density * numel)``; when those two do not fit
    together, fewer outliers are removed so the kept count holds.
    """
    density = check_density(density)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma {gamma} is outside [0, 1)")
    if density >= 1.0:
        return delta
    score = delta.abs().reshape(1, -1)
    numel = score.shape[1]
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bottom = max(0, numel - target - n_top)
    n_top = numel - n_bottom - target  # the outliers actually removed
    keep = top_mask(score, n_top + target) & ~top_mask(score, n_top)
    return apply_mask(delta, keep.view_as(delta), density, rescale)


def della(delta: torch.Tensor, density: float, epsilon: float = 0.15, generator: torch.Generator | None = None,
          rescale: Rescale = True) -> torch.Tensor:
    """DELLA's MAGPRUNE (mergekit's ``della_magprune``), row by row.

    In each row, entries are ranked by ``|delta|`` (rank 0 the smallest,
    ``in - 1`` the largest; ties as in the module doc) and kept with probability
    ``density - epsilon + 2 * epsilon * rank / (in - 1)``, then rescaled
    (``True``: mergekit 0.1.5's L1-norm match). A vector is one row; a row of
    one entry is kept with probability ``density`` (mergekit divides by zero
    there). Needs ``density +- epsilon`` inside ``(0, 1)`` unless ``density == 1``.
    """
    density = check_density(density)
    if density >= 1.0:
        return delta
    if epsilon < 0 or density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della needs epsilon >= 0 with density +- epsilon inside (0, 1); "
                         f"got density {density}, epsilon {epsilon}")
    rows = _rank_key(_as_rows(delta).abs())
    n = rows.shape[1]
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices  # largest first, lower index first
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if n > 1:
        rank_norm = (n - 1 - position).to(work) / (n - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5, dtype=work, device=delta.device)
    probs = (density - epsilon) + rank_norm * 2 * epsilon  # mergekit's order of operations
    keep = torch.bernoulli(probs, generator=generator)
    return apply_mask(delta, keep.view_as(delta), density, rescale)


# ----------------------------------------------------------------------------
# registry: one call signature for every sparsifier
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sparsifier:
    """A registered sparsifier.

    ``fn(delta, *, density, rescale, generator, input_sq_norms, group, pattern,
    gamma, epsilon)`` receives every option (unused ones as given, usually
    ``None``) and returns the sparsified delta. ``options`` names the optional
    knobs it honours among ``group``, ``pattern``, ``gamma``, ``epsilon``;
    :func:`sparsify` refuses the others instead of ignoring them silently.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    options: frozenset[str] = frozenset()
    needs_input_norms: bool = False
    stochastic: bool = False
    doc: str = ""


SPARSIFIERS: dict[str, Sparsifier] = {}
OPTION_NAMES = ("group", "pattern", "gamma", "epsilon")
DEFAULT_GAMMA = 0.01    # mergekit's default for breadcrumbs
DEFAULT_EPSILON = 0.15  # mergekit's default for della


def register_sparsifier(name: str, *, options: tuple[str, ...] = (), needs_input_norms: bool = False,
                        stochastic: bool = False):
    """Decorator: register ``fn`` (see :class:`Sparsifier`) under ``name``."""
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown sparsifier option(s) {sorted(unknown)}; known: {OPTION_NAMES}")

    def decorate(fn):
        if name in SPARSIFIERS:
            raise ValueError(f"sparsifier {name!r} is already registered")
        SPARSIFIERS[name] = Sparsifier(name, fn, frozenset(options), needs_input_norms, stochastic,
                                       (fn.__doc__ or "").strip())
        return fn

    return decorate


def unknown_name_error(kind: str, name: str, known) -> ValueError:
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")


def get_sparsifier(name: str) -> Sparsifier:
    try:
        return SPARSIFIERS[name]
    except (KeyError, TypeError):
        raise unknown_name_error("sparsifier", name, SPARSIFIERS) from None


def resolve_sparsifier(name: str, delta_shape: tuple[int, ...], input_sq_norms: torch.Tensor | None
                       ) -> tuple[Sparsifier, str | None]:
    """The sparsifier that really applies to a delta of this shape, and why it
    differs from ``name`` (``None`` when it does not).

    A sparsifier that needs input norms falls back to ``magnitude`` for a tensor
    that is not a matrix or when no norms are given.
    """
    chosen = get_sparsifier(name)
    if chosen.needs_input_norms:
        if len(delta_shape) != 2:
            return SPARSIFIERS["magnitude"], f"{name} needs a matrix, got shape {tuple(delta_shape)}"
        if input_sq_norms is None:
            return SPARSIFIERS["magnitude"], f"{name} needs input norms and none were given"
    return chosen, None


@dataclass(frozen=True)
class Sparsified:
    delta: torch.Tensor
    sparsifier: str               # the one actually applied
    fallback_reason: str | None   # why it is not the one asked for


def sparsify(name: str, delta: torch.Tensor, *, density: float, rescale: Rescale = False,
             generator: torch.Generator | None = None, input_sq_norms: torch.Tensor | None = None,
             group: str | None = None, pattern: str | None = None, gamma: float | None = None,
             epsilon: float | None = None) -> Sparsified:
    """Apply the registered sparsifier ``name`` to one delta, with fallback.

    ``None`` options take the sparsifier's default. An option the sparsifier
    does not honour raises ``ValueError``, except ``group``/``pattern`` on a
    tensor that is not a matrix: it has no N:M groups, so its trim is
    tensor-wise, and ``fallback_reason`` says so (as it says why a sparsifier
    needing input norms fell back to ``magnitude``).
    """
    chosen, reason, group, pattern = plan_sparsify(name, tuple(delta.shape), density=density, rescale=rescale,
                                                   input_sq_norms=input_sq_norms, group=group, pattern=pattern,
                                                   gamma=gamma, epsilon=epsilon)
    out = chosen.fn(delta, density=density, rescale=rescale, generator=generator, input_sq_norms=input_sq_norms,
                    group=group, pattern=pattern, gamma=gamma, epsilon=epsilon)
    return Sparsified(out, chosen.name, reason)


def plan_sparsify(name: str, shape: tuple[int, ...], *, density: float, rescale: Rescale,
                  input_sq_norms: torch.Tensor | None, group: str | None, pattern: str | None,
                  gamma: float | None, epsilon: float | None) -> tuple[Sparsifier, str | None, str | None, str | None]:
    """:func:`sparsify`'s checks for a delta of ``shape``: the sparsifier that applies, why it differs
    from ``name`` (or ``None``), and the ``group`` and ``pattern`` it gets."""
    check_density(density)
    _rescale_mode(rescale)
    if group is not None and group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    if pattern is not None:
        parse_pattern(pattern)
    chosen, reason = resolve_sparsifier(name, shape, input_sq_norms)
    given = {"group": group, "pattern": pattern, "gamma": gamma, "epsilon": epsilon}
    refused = [key for key, value in given.items() if value is not None and key not in chosen.options]
    if refused:
        raise ValueError(f"sparsifier {chosen.name!r} takes no {', '.join(refused)} "
                         f"(it takes: {', '.join(sorted(chosen.options)) or 'none of ' + ', '.join(OPTION_NAMES)})")
    if reason is not None and len(shape) != 2:
        group, pattern = None, None
    elif pattern is not None and len(shape) != 2:
        reason = f"pattern {pattern} needs a matrix, got shape {tuple(shape)}: trimmed without it"
        group, pattern = None, None
    return chosen, reason, group, pattern


@register_sparsifier("magnitude", options=("group", "pattern"))
def _magnitude(delta, *, density, rescale, group, pattern, **_):
    """Top |delta| (TIES trim); group "tensor" by default, as mergekit."""
    return magnitude_trim(delta, density, group=group or "tensor", pattern=pattern, rescale=rescale)


@register_sparsifier("random", stochastic=True)
def _random(delta, *, density, rescale, generator, **_):
    """DARE's random drop."""
    return dare_drop(delta, density, generator=generator, rescale=rescale)


@register_sparsifier("wanda", options=("group", "pattern"), needs_input_norms=True)
def _wanda(delta, *, density, rescale, input_sq_norms, group, pattern, **_):
    """Top |delta_ij| * ||X_j||_2; group "row" by default, as Wanda."""
    return wanda_trim(delta, input_sq_norms, density, group=group or "row", pattern=pattern, rescale=rescale)


@register_sparsifier("breadcrumbs", options=("gamma",))
def _breadcrumbs(delta, *, density, rescale, gamma, **_):
    """Drop the gamma largest and the smallest |delta|, tensor-wise."""
    return breadcrumbs(delta, density, DEFAULT_GAMMA if gamma is None else gamma, rescale=rescale)


@register_sparsifier("della", options=("epsilon",), stochastic=True)
def _della(delta, *, density, rescale, generator, epsilon, **_):
    """Random drop with keep probability rising with the |delta| rank in the row."""
    return della(delta, density, DEFAULT_EPSILON if epsilon is None else epsilon, generator=generator,
                 rescale=rescale)
