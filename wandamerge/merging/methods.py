"""Merge methods: combine the (sparsified) task vectors of several fine-tunes of one tensor.

Pure tensor functions, semantics of mergekit 0.1.5
(``merge_methods/generalized_task_arithmetic.py``, ``linear.py``, ``registry.py``):

1. ``delta_i = finetuned_i - base``, sparsified one by one (:mod:`.sparsify`),
   with the method's default sparsifier unless ``score=`` names another;
2. each sparsified delta is multiplied by its weight (after sparsification);
3. combined:
   * linear-style (``task_arithmetic``, ``dare_linear``, ``breadcrumbs``,
     ``della_linear``): ``sum_i w_i delta_i``, divided by ``sum_i w_i`` when
     ``normalize`` (a sum with ``|.| < 1e-8`` divides by 1);
   * TIES-style (``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della``): elect
     the sign of ``sum_i w_i delta_i`` per entry (``>= 0`` elects +), keep the
     weighted deltas of that sign (zeros never agree), sum them, and when
     ``normalize`` divide by the sum of the weights of the kept entries (0 -> 1);
4. times ``lambda_`` and added to the base.

``linear`` is the weighted average of the full fine-tuned weights (the base is
not one of its inputs): ``sum_i w_i W_i`` (``/ sum_i w_i`` when ``normalize``),
in float32 (float64 for float64 inputs).

Arithmetic runs in float32 (float64 when any input is float64); the result has
the base's dtype. mergekit computes in the inputs' promoted dtype, so for
float32 inputs the two agree to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .sparsify import (DEFAULT_EPSILON, DEFAULT_GAMMA, Rescale, check_density, get_sparsifier,
                       resolve_sparsifier, sparsify, unknown_name_error)

# ----------------------------------------------------------------------------
# small pure steps (as PEFT's merge_utils)
# ----------------------------------------------------------------------------


def _per_model(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weights ``(n,)`` shaped to broadcast over a stack ``(n, *shape)``."""
    return weights.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


def weight_deltas(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w_i * delta_i`` for a stack ``(n, *shape)`` and weights ``(n,)``."""
    return deltas * _per_model(weights, deltas)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election, mergekit's "sum" consensus: +1 where the summed
    weighted mass ``sum_i w_i delta_i`` is ``>= 0``, else -1 (dtype of the input)."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """True where a weighted delta has the elected sign (a zero never agrees)."""
    return weighted.sign() == sign


def disjoint_merge(weighted: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalize: bool
                   ) -> torch.Tensor:
    """Sum of the agreeing weighted deltas; with ``normalize``, divided entry by
    entry by the summed weights of the agreeing models (a zero sum divides by 1),
    TIES' disjoint mean."""
    keep = mask.to(weighted.dtype)
    mixed = (weighted * keep).sum(dim=0)
    if normalize:
        divisor = (_per_model(weights, weighted) * keep).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed


def weighted_sum(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum_i w_i delta_i``; with ``normalize`` divided by ``sum_i w_i`` (by 1
    when that sum is below 1e-8 in magnitude, as mergekit)."""
    mixed = weighted.sum(dim=0)
    if normalize:
        divisor = weights.to(weighted.dtype).sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
        mixed = mixed / divisor
    return mixed


def ties_combine(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Elect sign, keep the agreeing entries, disjoint (weighted) mean."""
    return disjoint_merge(weighted, weights, agreement_mask(weighted, elect_sign(weighted)), normalize)


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """mergekit's ``linear``: ``sum_i w_i W_i`` (``/ sum_i w_i`` when normalizing)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = weights.to(dtype)
    if normalize:
        total = weights.sum()
        if total.abs() < 1e-8:
            raise ValueError(f"linear with normalize needs weights that do not sum to zero, got {weights.tolist()}")
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, weights.unbind(0)):
        result.addcmul_(tensor.to(dtype), coefficient.reshape((1,) * first.ndim))
    if normalize:
        result.div_(total)
    return result


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``on="deltas"``: ``fn(weighted, weights, normalize)`` gets the stack of the
    weighted, sparsified deltas ``(n, *shape)`` and the weights ``(n,)`` and
    returns the merged delta. ``on="weights"``: ``fn(tensors, weights,
    normalize)`` gets the full fine-tuned tensors and returns the merged tensor.
    ``score`` is the default sparsifier (``None``: none), ``normalize`` and
    ``rescale`` the defaults, all as in mergekit 0.1.5.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    score: str | None
    normalize: bool
    rescale: bool
    on: Literal["deltas", "weights"] = "deltas"
    reference: str = ""


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, *, score: str | None, normalize: bool, rescale: bool = False,
                    on: Literal["deltas", "weights"] = "deltas", reference: str = ""):
    """Decorator: register a combine function (see :class:`MergeMethod`) under ``name``."""
    if on not in ("deltas", "weights"):
        raise ValueError(f"on={on!r}: expected 'deltas' or 'weights'")

    def decorate(fn):
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        if score is not None:
            get_sparsifier(score)
        MERGE_METHODS[name] = MergeMethod(name, fn, score, normalize, rescale, on, reference)
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        raise unknown_name_error("merge method", name, MERGE_METHODS) from None


@register_method("linear", score=None, normalize=True, on="weights", reference="https://arxiv.org/abs/2203.05482")
def linear(tensors, weights, normalize):
    return weighted_average(tensors, weights, normalize)


@register_method("task_arithmetic", score=None, normalize=False, reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(weighted, weights, normalize):
    return weighted_sum(weighted, weights, normalize)


@register_method("ties", score="magnitude", normalize=True, reference="https://arxiv.org/abs/2306.01708")
def ties(weighted, weights, normalize):
    return ties_combine(weighted, weights, normalize)


@register_method("dare_linear", score="random", normalize=False, rescale=True,
                 reference="https://arxiv.org/abs/2311.03099")
def dare_linear(weighted, weights, normalize):
    return weighted_sum(weighted, weights, normalize)


@register_method("dare_ties", score="random", normalize=False, rescale=True,
                 reference="https://arxiv.org/abs/2311.03099")
def dare_ties(weighted, weights, normalize):
    return ties_combine(weighted, weights, normalize)


@register_method("breadcrumbs", score="breadcrumbs", normalize=False, reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(weighted, weights, normalize):
    return weighted_sum(weighted, weights, normalize)


@register_method("breadcrumbs_ties", score="breadcrumbs", normalize=False,
                 reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(weighted, weights, normalize):
    return ties_combine(weighted, weights, normalize)


@register_method("della", score="della", normalize=True, rescale=True, reference="https://arxiv.org/abs/2406.11617")
def della(weighted, weights, normalize):
    return ties_combine(weighted, weights, normalize)


@register_method("della_linear", score="della", normalize=False, rescale=True,
                 reference="https://arxiv.org/abs/2406.11617")
def della_linear(weighted, weights, normalize):
    return weighted_sum(weighted, weights, normalize)


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeResult:
    tensor: torch.Tensor
    method: str
    sparsifier: str | None            # the sparsifier actually applied (None: none)
    requested_sparsifier: str | None  # the one asked for (or the method's default)
    fallback_reason: str | None       # why the trim differs from the one asked for (None: it does not)
    normalize: bool
    rescale: Rescale
    lambda_: float


def _per_model_values(name: str, value, n: int, default=None) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return [float(value)] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} fine-tuned tensors")
    return [None if v is None else float(v) for v in values]


def _norms_per_model(input_sq_norms, n: int) -> list:
    if input_sq_norms is None or isinstance(input_sq_norms, torch.Tensor):
        return [input_sq_norms] * n
    norms = list(input_sq_norms)
    if len(norms) != n:
        raise ValueError(f"{len(norms)} input norm vectors for {n} fine-tuned tensors")
    if any(v is None for v in norms) and not all(v is None for v in norms):
        raise ValueError("input norms are given for some fine-tuned tensors but not for all")
    return norms


def _per_model_options(spec: MergeMethod, n: int, weights, densities, gamma, epsilon, input_sq_norms, normalize):
    """Weights, densities, gammas, epsilons and input norms, one per fine-tune, checked; and ``normalize``."""
    if isinstance(weights, (int, float)):
        weights = [weights] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} fine-tuned tensors")
    densities = [check_density(d) for d in _per_model_values("densities", densities, n, default=1.0)]
    gammas = _per_model_values("gamma values", gamma, n)
    epsilons = _per_model_values("epsilon values", epsilon, n)
    norms = _norms_per_model(input_sq_norms, n)
    normalize = spec.normalize if normalize is None else bool(normalize)
    return weights, densities, gammas, epsilons, norms, normalize


def _delta_options(spec: MergeMethod, shape: tuple[int, ...], densities, norms, score, lambda_, rescale, group,
                   pattern, gamma, epsilon):
    """``lambda_``, ``rescale``, the sparsifier asked for and the one used (with why they differ) of a
    method on deltas."""
    lambda_ = 1.0 if lambda_ is None else float(lambda_)
    rescale = spec.rescale if rescale is None else rescale
    requested = spec.score if score is None else score
    if requested is None:
        unused = [k for k, v in {"group": group, "pattern": pattern, "gamma": gamma, "epsilon": epsilon}.items()
                  if v is not None] + (["densities < 1"] if min(densities) < 1 else [])
        if unused:
            raise ValueError(f"{spec.name} sparsifies nothing unless score= names a sparsifier; "
                             f"got {', '.join(unused)}")
        return lambda_, rescale, requested, None, None
    chosen, reason = resolve_sparsifier(requested, shape, norms[0])
    return lambda_, rescale, requested, chosen.name, reason


def merge_tensor_detailed(method: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                          weights: Sequence[float] | float, densities: Sequence[float] | float | None = None, *,
                          score: str | None = None, lambda_: float | None = None, normalize: bool | None = None,
                          rescale: Rescale | None = None, gamma: Sequence[float] | float | None = None,
                          epsilon: Sequence[float] | float | None = None,
                          input_sq_norms: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                          group: str | None = None, pattern: str | None = None,
                          generator: torch.Generator | None = None) -> MergeResult:
    """:func:`merge_tensor`, returning the tensor with what was applied."""
    spec = get_method(method)
    if not isinstance(base, torch.Tensor):
        raise TypeError("base must be a tensor")
    finetuned = list(finetuned)
    n = len(finetuned)
    if n == 0:
        raise ValueError("merging needs at least one fine-tuned tensor")
    for i, t in enumerate(finetuned):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"finetuned[{i}] is not a tensor")
        if t.shape != base.shape:
            raise ValueError(f"shape mismatch: base {tuple(base.shape)}, finetuned[{i}] {tuple(t.shape)}")
    if not all(t.is_floating_point() for t in [base, *finetuned]):
        raise TypeError("merging needs floating-point tensors")
    weights, densities, gammas, epsilons, norms, normalize = _per_model_options(
        spec, n, weights, densities, gamma, epsilon, input_sq_norms, normalize)
    work = torch.float64 if any(t.dtype == torch.float64 for t in [base, *finetuned]) else torch.float32

    if spec.on == "weights":
        extras = {"score": score, "lambda_": lambda_, "rescale": rescale, "gamma": gamma, "epsilon": epsilon,
                  "group": group, "pattern": pattern}
        given = [k for k, v in extras.items() if v is not None] + (["densities"] if min(densities) < 1 else [])
        if given:
            raise ValueError(f"{spec.name} averages full weights and takes no {', '.join(given)}")
        tensors = [t.to(device=base.device, dtype=work) for t in finetuned]
        merged = spec.fn(tensors, torch.tensor(weights, dtype=work), normalize)
        return MergeResult(merged.to(base.dtype), spec.name, None, None, None, normalize, False, 1.0)

    lambda_, rescale, requested, used, reason = _delta_options(spec, tuple(base.shape), densities, norms, score,
                                                               lambda_, rescale, group, pattern, gamma, epsilon)

    base_w = base.to(work)
    weight_t = torch.tensor(weights, dtype=work, device=base.device)

    def sparsified(i: int) -> torch.Tensor:
        nonlocal reason
        delta = finetuned[i].to(device=base.device, dtype=work) - base_w
        if used is None:
            return delta
        done = sparsify(requested, delta, density=densities[i], rescale=rescale, generator=generator,
                        input_sq_norms=norms[i], group=group, pattern=pattern, gamma=gammas[i], epsilon=epsilons[i])
        reason = done.fallback_reason
        return done.delta

    merged = combine_deltas(spec, base_w, (sparsified(i) for i in range(n)), weight_t, normalize, lambda_)
    return MergeResult(merged.to(base.dtype), spec.name, used, requested, reason, normalize, rescale, lambda_)


def combine_deltas(spec: MergeMethod, base_w: torch.Tensor, deltas, weights: torch.Tensor, normalize: bool,
                   lambda_: float) -> torch.Tensor:
    """``base_w + lambda_ * combine(w_i * delta_i)`` for the sparsified ``deltas`` (an iterable, one
    per weight, consumed in order) in ``base_w``'s dtype. One ``(n, *shape)`` stack is filled in place:
    each delta is written, weighted, and dropped."""
    weighted = torch.empty((len(weights), *base_w.shape), dtype=base_w.dtype, device=base_w.device)
    for i, delta in enumerate(deltas):
        torch.mul(delta, weights[i], out=weighted[i])
        del delta
    mixed = _combine_in_chunks(spec, weighted, weights, normalize)
    del weighted
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base_w)


_COMBINE_CHUNK = 1 << 20  # entries per model combined at a time


def _combine_in_chunks(spec: "MergeMethod", weighted: torch.Tensor, weights: torch.Tensor,
                       normalize: bool) -> torch.Tensor:
    """The combine step is entry-wise across models, so large tensors are combined in row chunks
    to keep its temporaries small; the result is the same as one call on the whole stack."""
    if weighted.ndim < 3 or weighted[0].numel() <= _COMBINE_CHUNK:
        return spec.fn(weighted, weights, normalize)
    rows = weighted.shape[1]
    step = max(1, _COMBINE_CHUNK // max(1, weighted[0, 0].numel()))
    out = torch.empty(weighted.shape[1:], dtype=weighted.dtype, device=weighted.device)
    for start in range(0, rows, step):
        out[start:start + step] = spec.fn(weighted[:, start:start + step], weights, normalize)
    return out


def merge_tensor(method: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                 weights: Sequence[float] | float, densities: Sequence[float] | float | None = None, *,
                 score: str | None = None, lambda_: float | None = None, normalize: bool | None = None,
                 rescale: Rescale | None = None, gamma: Sequence[float] | float | None = None,
                 epsilon: Sequence[float] | float | None = None,
                 input_sq_norms: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                 group: str | None = None, pattern: str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge the fine-tuned versions of one tensor into ``base``; returns a
    tensor of ``base``'s shape and dtype. Inputs are not modified.

    ``method``: a name in :data:`MERGE_METHODS`. ``weights``: one per
    fine-tune (or one number for all). ``densities``: kept fraction per
    fine-tune in ``(0, 1]`` (default 1: nothing dropped, as mergekit).
    ``score``: the sparsifier (a name in ``SPARSIFIERS``), default the method's;
    ``"wanda"`` needs ``input_sq_norms`` (one vector ``(in,)`` for all fine-tunes,
    or one per fine-tune) and falls back to ``"magnitude"`` for a vector or
    without norms -- :func:`merge_tensor_detailed` says which one applied.
    ``lambda_`` (default 1) scales the merged delta; ``normalize``/``rescale``
    default to the method's (mergekit's) defaults; ``gamma`` (breadcrumbs,
    default 0.01) and ``epsilon`` (della, default 0.15) are per fine-tune or one
    number; ``group``/``pattern`` go to magnitude/wanda. ``generator`` drives the
    random sparsifiers (the global RNG when ``None``), used by the fine-tunes in
    order. Options that the chosen method or sparsifier does not use raise
    ``ValueError`` rather than being ignored.
    """
    return merge_tensor_detailed(method, base, finetuned, weights, densities, score=score, lambda_=lambda_,
                                 normalize=normalize, rescale=rescale, gamma=gamma, epsilon=epsilon,
                                 input_sq_norms=input_sq_norms, group=group, pattern=pattern,
                                 generator=generator).tensor


__all__ = [
    "DEFAULT_EPSILON", "DEFAULT_GAMMA", "MERGE_METHODS", "MergeMethod", "MergeResult", "agreement_mask",
    "disjoint_merge", "elect_sign", "get_method", "merge_tensor", "merge_tensor_detailed", "register_method",
    "ties_combine", "weight_deltas", "weighted_average", "weighted_sum",
]
