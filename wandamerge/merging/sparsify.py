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
* **Ties** follow :mod:`wandamerge.core.selection`, as pruning does: entries are
  ranked by score, highest first; among equal scores the entry with the LOWER
  flat index (lower column within a row) ranks higher. So at a magnitude
  cut-off the lower indices are kept, breadcrumbs' outlier cut removes the lower
  indices first, and DELLA gives the lower index the higher rank. mergekit uses a
  non-stable ``argsort`` there, so its choice among ties is arbitrary; on
  tensors without ties both give the same entries.
* **Rescale** (``rescale=``): ``False``/``None`` keeps the surviving entries as
  they are. ``True`` means mergekit 0.1.5's rescale, ``"l1"``: the survivors are
  scaled so the delta keeps its L1 norm (skipped when either norm is below
  1e-7). ``"l2"`` and ``"linf"`` match those norms instead. ``"density"`` divides
  by ``density`` (the DARE paper, PEFT and mergekit before 0.1: unbiased in
  expectation for the random drop). ``"none"`` is ``False``. ``"gram"`` is the
  least-squares scale of the kept entries for the tensor's input Gram ``G``
  (what the change of the map's outputs over the calibration tokens is closest
  to): ``c = <(M o delta) G, delta> / <(M o delta) G, M o delta>``. Under Wanda's
  diagonal assumption it is 1; a tensor without a Gram (embeddings, norms) is
  kept as it is.

The registry at the bottom holds two kinds of rows. A *selection* sparsifier
(magnitude, wanda, breadcrumbs) is a score and a :class:`Selection` (how many
entries of which group it keeps); the whole-tensor path (:func:`sparsify`) and
the block-by-block path (:mod:`.chunked`) both apply that same row. Any other
sparsifier is a function of the whole delta (the random drops of DARE and
DELLA). See :func:`register_selection`, :func:`register_sparsifier` and
:func:`sparsify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch

from ..core.scores import wanda_score
from ..core.sparsegpt import sparsegpt_prune
from ..core.selection import (GROUPS, as_rows, check_density, check_group, keep_count, keep_n_of_m, keep_per_row,
                              keep_per_tensor, order_most_first, parse_pattern, rank_key)
from ..errors import ConfigError, lookup

Rescale = Union[bool, None, Literal["none", "l1", "l2", "linf", "density", "gram"]]
RESCALE_MODES = ("none", "l1", "l2", "linf", "density", "gram")
RESCALE_EPS = 1e-7  # mergekit's tolerance for a norm too small to rescale
DEFAULT_GAMMA = 0.01    # mergekit's default for breadcrumbs
DEFAULT_EPSILON = 0.15  # mergekit's default for della
OPTION_NAMES = ("group", "pattern", "gamma", "epsilon")


# ----------------------------------------------------------------------------- rescale


def rescale_mode(rescale: Rescale) -> str | None:
    """``rescale`` as one of :data:`RESCALE_MODES`, or None for no rescale (``True`` is ``"l1"``)."""
    if rescale is None or rescale is False or rescale == "none":
        return None
    if rescale is True:
        return "l1"
    if rescale in RESCALE_MODES:
        return rescale
    raise ConfigError(f"rescale {rescale!r} is not one of False, True, {', '.join(map(repr, RESCALE_MODES))}")


def _gram_fits(delta: torch.Tensor, gram: torch.Tensor | None) -> bool:
    """A Gram ``(in, in)`` for a matrix delta ``(out, in)``."""
    return gram is not None and delta.ndim == 2 and tuple(gram.shape) == (delta.shape[1],) * 2


def gram_scale(delta: torch.Tensor, masked: torch.Tensor, gram: torch.Tensor) -> float:
    """The ``c`` that makes ``c * masked`` the least-squares fit of ``delta``'s outputs for inputs of Gram
    ``gram``: ``<masked G, delta> / <masked G, masked>`` (1 when ``masked`` changes no output)."""
    product = masked.to(torch.float64) @ gram.to(device=masked.device, dtype=torch.float64)
    denominator = float((product * masked.to(torch.float64)).sum())
    if denominator <= 0:
        return 1.0
    return float((product * delta.to(torch.float64)).sum()) / denominator


def mask_and_rescale(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: Rescale = False,
                     gram: torch.Tensor | None = None) -> torch.Tensor:
    """``delta * keep`` (True = kept), then rescaled as ``rescale`` says (see the module doc); ``gram``:
    the ``(in, in)`` input Gram a ``"gram"`` rescale fits the outputs for."""
    mode = rescale_mode(rescale)
    masked = delta * keep.to(delta.dtype)
    if mode is None:
        return masked
    if mode == "density":
        return masked / density
    if mode == "gram":
        return masked * gram_scale(delta, masked, gram) if _gram_fits(delta, gram) else masked
    if mode == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif mode == "l2":
        before, after = delta.norm(), masked.norm()
    else:
        before, after = delta.abs().max(), masked.abs().max()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


# ----------------------------------------------------------------------------- deterministic selections


@dataclass(frozen=True)
class Selection:
    """Which entries of one delta a deterministic sparsifier keeps, given its scores.

    ``group="row"``: the ``keep`` highest of every row; ``"tensor"``: the ``keep``
    highest of the whole tensor after removing its ``drop_top`` highest
    (breadcrumbs' outliers); ``"nm"``: all but the ``n`` lowest of every ``m``
    consecutive entries of a row. A row or N:M selection can be applied to any
    block of whole rows; a tensor selection needs its cut-offs found over the
    whole tensor first (:meth:`tensor_cuts`, :class:`~wandamerge.core.selection.TopCut`).
    """

    group: Literal["row", "tensor", "nm"]
    keep: int = 0
    drop_top: int = 0
    n: int = 0
    m: int = 0

    @staticmethod
    def of(shape: tuple[int, ...], density: float, group: str, pattern: str | None) -> "Selection | None":
        """A magnitude-style selection (``max(1, int(density * n))`` per group); None keeps everything."""
        if pattern is not None:
            n, m = parse_pattern(pattern)
            return Selection("nm", n=n, m=m)
        if density >= 1.0:
            return None
        numel = 1
        for d in shape:
            numel *= d
        if check_group(group) == "row" and len(shape) >= 2:
            return Selection("row", keep=keep_count(density, numel // shape[0]))
        return Selection("tensor", keep=keep_count(density, numel))  # a vector is one row: the tensor

    def tensor_cuts(self) -> list[int]:
        """The top-k counts whose masks make a tensor selection: ``top(keep + drop_top) & ~top(drop_top)``."""
        return [self.keep + self.drop_top] + ([self.drop_top] if self.drop_top else [])

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        """Keep-mask of ``score``, a whole tensor (or, for row and N:M selections, a block of whole rows)."""
        if self.group == "nm":
            return keep_n_of_m(score, self.n, self.m)
        if self.group == "row":
            return keep_per_row(score, self.keep)
        keep = keep_per_tensor(score, self.keep + self.drop_top)
        if self.drop_top:
            keep &= ~keep_per_tensor(score, self.drop_top)
        return keep


def breadcrumbs_selection(numel: int, density: float, gamma: float) -> Selection | None:
    """Model Breadcrumbs' counts: remove the ``int(gamma * numel)`` largest, then the smallest, keeping
    exactly ``int(density * numel)``; when the two do not fit together, fewer outliers are removed."""
    if not 0.0 <= gamma < 1.0:
        raise ConfigError(f"gamma {gamma} is outside [0, 1)")
    if density >= 1.0:
        return None
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bottom = max(0, numel - target - n_top)
    return Selection("tensor", keep=target, drop_top=numel - n_bottom - target)


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
        raise ConfigError(f"score has shape {tuple(score.shape)}, delta {tuple(delta.shape)}")
    selection = Selection.of(tuple(delta.shape), density, group, pattern)
    if selection is None:
        return delta
    return mask_and_rescale(delta, selection.mask(score), density, rescale)


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
        raise ConfigError(f"a Wanda score needs a matrix (out, in), got shape {tuple(delta.shape)}")
    return wanda_score(delta, input_sq_norms)


def wanda_trim(delta: torch.Tensor, input_sq_norms: torch.Tensor, density: float, group: str = "row",
               pattern: str | None = None, rescale: Rescale = False) -> torch.Tensor:
    """:func:`score_trim` with the Wanda score of the delta."""
    return score_trim(delta, wanda_delta_score(delta, input_sq_norms), density, group=group, pattern=pattern,
                      rescale=rescale)


def breadcrumbs_trim(delta: torch.Tensor, density: float, gamma: float = DEFAULT_GAMMA,
                     rescale: Rescale = False) -> torch.Tensor:
    """Model Breadcrumbs (mergekit's ``magnitude_outliers``), over the whole tensor: see
    :func:`breadcrumbs_selection`."""
    density = check_density(density)
    selection = breadcrumbs_selection(delta.numel(), density, gamma)
    if selection is None:
        return delta
    return mask_and_rescale(delta, selection.mask(delta.abs()), density, rescale)


# ----------------------------------------------------------------------------- random drops


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
    return mask_and_rescale(delta, keep, density, rescale)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float = DEFAULT_EPSILON,
                   generator: torch.Generator | None = None, rescale: Rescale = True) -> torch.Tensor:
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
        raise ConfigError(f"della needs epsilon >= 0 with density +- epsilon inside (0, 1); "
                          f"got density {density}, epsilon {epsilon}")
    rows = rank_key(as_rows(delta).abs())
    n = rows.shape[1]
    order = order_most_first(rows, dim=1)  # largest first, lower index first
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if n > 1:
        rank_norm = (n - 1 - position).to(work) / (n - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5, dtype=work, device=delta.device)
    probs = (density - epsilon) + rank_norm * 2 * epsilon  # mergekit's order of operations
    keep = torch.bernoulli(probs, generator=generator)
    return mask_and_rescale(delta, keep.view_as(delta), density, rescale)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Sparsifier:
    """A registered sparsifier: a row of data the merge asks instead of comparing names.

    A selection row has ``score(delta, input_sq_norms)`` and ``select(shape,
    density, **options) -> Selection | None`` (None keeps everything); any other
    row has ``fn(delta, *, density, rescale, generator, input_sq_norms, group,
    pattern, gamma, epsilon)``, which gets every option (unused ones as None).
    ``options`` names the optional knobs it honours among ``group``,
    ``pattern``, ``gamma``, ``epsilon``; :func:`sparsify` refuses the others
    instead of ignoring them.
    """

    name: str
    options: frozenset[str] = frozenset()
    needs_input_norms: bool = False
    stochastic: bool = False
    needs_grams: bool = False  # an ``fn`` row that takes ``gram=``, the input Gram of the tensor's map
    score: Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor] | None = None
    select: Callable[..., "Selection | None"] | None = None
    fn: Callable[..., torch.Tensor] | None = None
    doc: str = ""


SPARSIFIERS: dict[str, Sparsifier] = {}


def _register(row: Sparsifier) -> None:
    unknown = set(row.options) - set(OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown sparsifier option(s) {sorted(unknown)}; known: {OPTION_NAMES}")
    if row.name in SPARSIFIERS:
        raise ConfigError(f"sparsifier {row.name!r} is already registered")
    SPARSIFIERS[row.name] = row


def register_selection(name: str, *, score, options: tuple[str, ...] = (), needs_input_norms: bool = False):
    """Decorator: register a deterministic sparsifier from its score and its selection function."""
    def decorate(select):
        _register(Sparsifier(name, frozenset(options), needs_input_norms, score=score, select=select,
                             doc=(select.__doc__ or "").strip()))
        return select
    return decorate


def register_sparsifier(name: str, *, options: tuple[str, ...] = (), needs_input_norms: bool = False,
                        stochastic: bool = False, needs_grams: bool = False):
    """Decorator: register a sparsifier that is a function of the whole delta (see :class:`Sparsifier`)."""
    def decorate(fn):
        _register(Sparsifier(name, frozenset(options), needs_input_norms, stochastic, needs_grams, fn=fn,
                             doc=(fn.__doc__ or "").strip()))
        return fn
    return decorate


def get_sparsifier(name: str) -> Sparsifier:
    return lookup(SPARSIFIERS, "sparsifier", name)


def resolve_sparsifier(name: str, delta_shape: tuple[int, ...], input_sq_norms: torch.Tensor | None,
                       has_gram: bool = False) -> tuple[Sparsifier, str | None]:
    """The sparsifier that really applies to a delta of this shape, and why it
    differs from ``name`` (``None`` when it does not).

    A sparsifier that needs input norms (or an input Gram) falls back to
    ``magnitude`` for a tensor that is not a matrix or when none are given.
    """
    chosen = get_sparsifier(name)
    if chosen.needs_grams:
        if len(delta_shape) != 2:
            return SPARSIFIERS["magnitude"], f"{name} needs a matrix, got shape {tuple(delta_shape)}"
        if not has_gram:
            return SPARSIFIERS["magnitude"], f"{name} needs the input Gram of a linear map and none was given"
    if chosen.needs_input_norms:
        if len(delta_shape) != 2:
            return SPARSIFIERS["magnitude"], f"{name} needs a matrix, got shape {tuple(delta_shape)}"
        if input_sq_norms is None:
            return SPARSIFIERS["magnitude"], f"{name} needs input norms and none were given"
    return chosen, None


@dataclass(frozen=True)
class SparsifyPlan:
    """What :func:`sparsify` does to one delta: the sparsifier that applies, why it is not the one asked
    for (or None), and its options as it takes them (``group``/``pattern`` dropped off a non-matrix)."""

    sparsifier: Sparsifier
    fallback_reason: str | None
    options: dict

    def selection(self, shape: tuple[int, ...], density: float) -> Selection | None:
        """The keep rule of a selection sparsifier for a delta of ``shape`` (None: keep everything)."""
        return self.sparsifier.select(shape, density, **self.options)

    def apply(self, delta: torch.Tensor, density: float, rescale: Rescale,
              generator: torch.Generator | None = None, input_sq_norms: torch.Tensor | None = None,
              gram: torch.Tensor | None = None) -> torch.Tensor:
        """The sparsified delta (``delta`` itself where nothing is dropped); ``gram``: the input Gram a
        ``"gram"`` rescale fits (any sparsifier: its kept entries, then the least-squares scale)."""
        if rescale_mode(rescale) == "gram":
            kept = self.apply(delta, density, False, generator, input_sq_norms, gram)
            return kept * gram_scale(delta, kept, gram) if kept is not delta and _gram_fits(delta, gram) else kept
        row = self.sparsifier
        if row.fn is not None:
            options = {k: self.options.get(k) for k in OPTION_NAMES}
            extra = {"gram": gram} if row.needs_grams else {}
            return row.fn(delta, density=density, rescale=rescale, generator=generator,
                          input_sq_norms=input_sq_norms, **options, **extra)
        selection = self.selection(tuple(delta.shape), density)
        if selection is None:
            return delta
        return mask_and_rescale(delta, selection.mask(row.score(delta, input_sq_norms)), density, rescale)


def plan_sparsify(name: str, shape: tuple[int, ...], *, density: float, rescale: Rescale,
                  input_sq_norms: torch.Tensor | None, group: str | None = None, pattern: str | None = None,
                  gamma: float | None = None, epsilon: float | None = None, has_gram: bool = False) -> SparsifyPlan:
    """:func:`sparsify`'s checks and choices for a delta of ``shape``, before any tensor is touched."""
    check_density(density)
    rescale_mode(rescale)
    if group is not None and group not in GROUPS:
        raise ConfigError(f"group {group!r} is not one of {GROUPS}")
    if pattern is not None:
        parse_pattern(pattern)
    chosen, reason = resolve_sparsifier(name, shape, input_sq_norms, has_gram)
    given = {"group": group, "pattern": pattern, "gamma": gamma, "epsilon": epsilon}
    refused = [key for key, value in given.items() if value is not None and key not in chosen.options]
    if refused:
        raise ConfigError(f"sparsifier {chosen.name!r} takes no {', '.join(refused)} "
                          f"(it takes: {', '.join(sorted(chosen.options)) or 'none of ' + ', '.join(OPTION_NAMES)})")
    if reason is not None and len(shape) != 2:
        group, pattern = None, None
    elif pattern is not None and len(shape) != 2:
        reason = f"pattern {pattern} needs a matrix, got shape {tuple(shape)}: trimmed without it"
        group, pattern = None, None
    options = {k: v for k, v in {"group": group, "pattern": pattern, "gamma": gamma, "epsilon": epsilon}.items()
               if k in chosen.options}  # an option the row does not take was refused above, so it is None
    return SparsifyPlan(chosen, reason, options)


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
    does not honour raises :class:`~wandamerge.errors.ConfigError`, except
    ``group``/``pattern`` on a tensor that is not a matrix: it has no N:M groups,
    so its trim is tensor-wise, and ``fallback_reason`` says so (as it says why a
    sparsifier needing input norms fell back to ``magnitude``).
    """
    plan = plan_sparsify(name, tuple(delta.shape), density=density, rescale=rescale, input_sq_norms=input_sq_norms,
                         group=group, pattern=pattern, gamma=gamma, epsilon=epsilon)
    out = plan.apply(delta, density, rescale, generator, input_sq_norms)
    return Sparsified(out, plan.sparsifier.name, plan.fallback_reason)


def _abs(delta: torch.Tensor, input_sq_norms=None) -> torch.Tensor:
    return delta.abs()


@register_selection("magnitude", score=_abs, options=("group", "pattern"))
def _magnitude(shape, density, group=None, pattern=None):
    """Top |delta| (TIES trim); group "tensor" by default, as mergekit."""
    return Selection.of(shape, density, group or "tensor", pattern)


@register_selection("wanda", score=wanda_delta_score, options=("group", "pattern"), needs_input_norms=True)
def _wanda(shape, density, group=None, pattern=None):
    """Top |delta_ij| * ||X_j||_2; group "row" by default, as Wanda."""
    return Selection.of(shape, density, group or "row", pattern)


@register_selection("breadcrumbs", score=_abs, options=("gamma",))
def _breadcrumbs(shape, density, gamma=None):
    """Drop the gamma largest and the smallest |delta|, tensor-wise."""
    numel = 1
    for d in shape:
        numel *= d
    return breadcrumbs_selection(numel, density, DEFAULT_GAMMA if gamma is None else gamma)


@register_sparsifier("random", stochastic=True)
def _random(delta, *, density, rescale, generator, **_):
    """DARE's random drop."""
    return dare_drop(delta, density, generator=generator, rescale=rescale)


@register_sparsifier("della", options=("epsilon",), stochastic=True)
def _della(delta, *, density, rescale, generator, epsilon, **_):
    """Random drop with keep probability rising with the |delta| rank in the row."""
    return della_magprune(delta, density, DEFAULT_EPSILON if epsilon is None else epsilon, generator=generator,
                          rescale=rescale)


@register_sparsifier("sparsegpt", options=("pattern",), needs_grams=True)
def _sparsegpt(delta, *, density, rescale, gram, pattern=None, **_):
    """SparseGPT's OBS sweep on the delta against the task's input Gram: dropped entries' output error is
    moved onto the kept ones, so ``delta X`` is kept as well as the density allows (DeltaZip's idea).
    The sweep refits the kept entries itself: of the rescales only ``gram`` applies (``l1``, ``density``
    and the others are for masks that keep entries as they were)."""
    if density >= 1.0 and pattern is None:
        return delta
    n, m = parse_pattern(pattern) if pattern is not None else (0, 0)
    return sparsegpt_prune(delta, gram, sparsity=0.0 if n else 1.0 - density, n=n, m=m)[0]
