"""Interpolating merges: points between (or a mean of) whole tensors on a sphere or a line.

Pure tensor functions with the per-tensor semantics of mergekit 0.1.5's merge methods:

* :func:`slerp` (and :func:`slerp_coefficients`)  ``merge_methods/slerp.py``
* :func:`nuslerp` (and :func:`nuslerp_t`, :func:`nuslerp_interpolate`)  ``merge_methods/nuslerp.py``
* :func:`multislerp`  ``merge_methods/multislerp.py``
* :func:`karcher_mean`  ``merge_methods/karcher.py``
* :func:`nearswap`  ``merge_methods/nearswap.py``

Arithmetic runs in float32 (float64 when any input is float64), in mergekit's
order of operations, so for float32 and float64 inputs the results agree with
mergekit's to the bit. The result has the first input's dtype (the base's when
there is one). mergekit instead computes ``nuslerp``, ``multislerp``,
``nearswap`` and most of ``karcher`` in the inputs' promoted dtype, so for
bfloat16/float16 inputs ours is the float32 result rounded once, mergekit's a
result rounded at every step; and for inputs of mixed dtypes mergekit returns
the promoted dtype. Problems mergekit rejects, or that would give NaN or a
Python exception there, raise :class:`~wandamerge.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError

# mergekit's slerp reduces in chunks of this many elements (merge_methods/slerp.py, _CHUNK_ELEMENTS)
SLERP_CHUNK_ELEMENTS = 1024 * 1024


# ----------------------------------------------------------------------------
# shared checks (also used by .selection_merges)
# ----------------------------------------------------------------------------


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype our arithmetic runs in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_inputs(method: str, tensors: Sequence[torch.Tensor], minimum: int = 1, maximum: int | None = None,
                 base: torch.Tensor | None = None) -> None:
    """ConfigError unless there are ``minimum``..``maximum`` tensors (the base not counted), all
    floating point and of one shape (the base's included)."""
    count = len(tensors)
    if count < minimum or (maximum is not None and count > maximum):
        wanted = (f"exactly {minimum}" if minimum == maximum else
                  f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}")
        other = " other than the base" if base is not None else ""
        raise ConfigError(f"{method} needs {wanted} tensor(s){other}, got {count}")
    every = [*([] if base is None else [base]), *tensors]
    shapes = [tuple(t.shape) for t in every]
    if len(set(shapes)) > 1:
        raise ConfigError(f"{method} needs tensors of one shape, got {shapes}")
    if not all(t.is_floating_point() for t in every):
        raise ConfigError(f"{method} needs floating-point tensors, got {[str(t.dtype) for t in every]}")


def check_finite(method: str, name: str, value: float) -> float:
    """``float(value)``, or ConfigError when it is not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method} needs a number for {name}, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{method} needs a finite {name}, got {value}")
    return value


def check_weights(method: str, weights: Sequence[float], count: int) -> list[float]:
    """The weights as floats, or ConfigError when there is not one finite weight per tensor."""
    values = list(weights)
    if len(values) != count:
        raise ConfigError(f"{method} needs one weight per tensor: {len(values)} weights for {count} tensors")
    return [check_finite(method, "weight", w) for w in values]


# ----------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------


def _chunked(row: torch.Tensor, dtype: torch.dtype):
    """Column slices of a ``(1, n)`` row in mergekit's slerp chunks, each cast to ``dtype``."""
    for start in range(0, row.shape[1], SLERP_CHUNK_ELEMENTS):
        yield row[:, start:start + SLERP_CHUNK_ELEMENTS].to(dtype)


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The two coefficients ``(c_a, c_b)`` of ``slerp = c_a a + c_b b`` for rows ``(1, n)`` and a ``t``
    in the work dtype.

    ``cos = <a/|a|, b/|b|>`` clamped to [-1, 1] (a norm ``<= eps`` counts as 1), summed chunk by chunk
    as mergekit; ``theta = acos(cos)``; ``c_a = sin((1-t) theta) / sin theta``, ``c_b = sin(t theta) /
    sin theta``, or the line ``(1-t, t)`` where ``|cos| > dot_threshold`` (colinear or antiparallel).
    """
    dtype = t.dtype
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x, dim=1, keepdim=True)
                                                   for x in _chunked(a, dtype)]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y, dim=1, keepdim=True)
                                                   for y in _chunked(b, dtype)]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([(x / norm_a * (y / norm_b)).sum(dim=1, keepdim=True)
                       for x, y in zip(_chunked(a, dtype), _chunked(b, dtype))]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def slerp(base: torch.Tensor, other: torch.Tensor, t: float, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """mergekit's ``slerp``: spherical interpolation from ``base`` (t = 0) to ``other`` (t = 1), the
    whole tensor one vector.

    ``c_a base + c_b other`` with :func:`slerp_coefficients`: along the great circle between the
    two directions, with the norms interpolated with them; ``(1-t) base + t other`` where the two are
    colinear or antiparallel (``|cos| > dot_threshold``) or the tensor is empty. ``t`` is rounded to
    the work dtype first, as mergekit's batch parameter is; like mergekit any finite ``t`` is taken
    (outside [0, 1] it extrapolates). The arithmetic is mergekit's, chunks included, so results agree
    to the bit for every dtype; mixed-dtype inputs return ``base``'s dtype, mergekit's the promoted one.
    """
    check_inputs("slerp", [other], 1, 1, base=base)
    dtype = work_dtype(base, other)
    t = torch.tensor(check_finite("slerp", "t", t), dtype=dtype, device=base.device)
    a, b = base.reshape(1, -1), other.reshape(1, -1)
    if a.shape[1] == 0:
        return ((1 - t) * a.to(dtype) + t * b.to(dtype)).reshape(base.shape).to(base.dtype)
    coef_a, coef_b = slerp_coefficients(a, b, t, dot_threshold, eps)
    result = torch.cat([coef_a * x + coef_b * y for x, y in zip(_chunked(a, dtype), _chunked(b, dtype))], dim=1)
    return result.reshape(base.shape).to(base.dtype)


# ----------------------------------------------------------------------------
# nuslerp
# ----------------------------------------------------------------------------


def nuslerp_t(weights: Sequence[float]) -> float:
    """NuSLERP's interpolation point from its two weights: ``w_1 / (w_0 + w_1)``, 0.5 when
    ``|w_0 + w_1| < 1e-6`` (as mergekit)."""
    w0, w1 = check_weights("nuslerp", weights, 2)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp_interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
                        eps: float = 1e-8) -> torch.Tensor:
    """mergekit's ``nuslerp`` function: slerp of the vectors along ``dim`` (the whole tensor when
    ``flatten``), each pair on its own.

    ``u = v / max(|v|, 1e-7)``; ``cos = <u0, u1>`` clamped to [-1, 1]; ``theta = acos(cos)``;
    ``(sin((1-t) theta) v0 + sin(t theta) v1) / sin theta``, or ``(1-t) v0 + t v1`` where
    ``1 - cos^2 <= eps^2`` (colinear or antiparallel). In the work dtype, returned in ``v0``'s.
    """
    out_shape, out_dtype = v0.shape, v0.dtype
    dtype = work_dtype(v0, v1)
    v0, v1 = v0.to(dtype), v1.to(dtype)
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape).to(out_dtype)


def nuslerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None, *,
            row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's ``nuslerp`` method: :func:`nuslerp_interpolate` of two tensors at ``t =``
    :func:`nuslerp_t` ``(weights)``, over the whole tensor (``flatten``, mergekit's default), else row
    by row (vectors along the last dim) or, with ``row_wise``, along dim 0. With a ``base`` the
    slerp is of the task vectors: ``base + nuslerp(t, W_0 - base, W_1 - base)``.

    The result has the base's dtype (else the first tensor's); see the module note on dtypes.
    """
    check_inputs("nuslerp", list(tensors), 2, 2, base=base)
    t = nuslerp_t(weights)
    dtype = work_dtype(*tensors, *([] if base is None else [base]))
    v0, v1 = (x.to(dtype) for x in tensors)
    dim = 0 if row_wise else -1
    if base is None:
        return nuslerp_interpolate(t, v0, v1, dim=dim, flatten=flatten).to(tensors[0].dtype)
    origin = base.to(dtype)
    moved = nuslerp_interpolate(t, v0 - origin, v1 - origin, dim=dim, flatten=flatten)
    return (origin + moved).to(base.dtype)


# ----------------------------------------------------------------------------
# multislerp
# ----------------------------------------------------------------------------


def _barycentric_on_sphere(units: torch.Tensor, weights: torch.Tensor, mean: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """The exponential map at the unit ``mean`` of the weighted sum of the units' tangent vectors."""
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    return mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's ``multislerp``: barycentric interpolation on the hypersphere (of the task vectors
    ``W_i - base`` when there is a base), the whole tensor one vector.

    ``w`` divided by ``sum w`` when ``normalize_weights``; ``u_i = x_i / (|x_i| + eps)``; ``m`` = the
    normalised ``sum_i w_i u_i``; the tangent vectors ``u_i - <u_i, m> m`` are averaged with ``w`` and
    mapped back by ``exp_m``; the result is scaled by ``sum_i w_i |x_i|`` (plus the base). One tensor
    is returned as it is. When ``|sum_i w_i u_i| < eps`` two tensors fall back to ``w_0 x_0 + w_1 x_1``,
    and more raise ConfigError (mergekit: ValueError). Weights that sum to zero with
    ``normalize_weights`` raise ConfigError (mergekit divides by zero and returns NaN/inf).
    """
    check_inputs("multislerp", list(tensors), 1, base=base)
    values = check_weights("multislerp", weights, len(tensors))
    first = tensors[0] if base is None else base
    if len(tensors) == 1:
        return tensors[0].to(first.dtype)
    dtype = work_dtype(*tensors, *([] if base is None else [base]))
    stacked = torch.stack([x.to(dtype) for x in tensors], dim=0)
    if base is not None:
        stacked = stacked - base.to(dtype)
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(values, dtype=dtype, device=flat.device)
    if normalize_weights:
        if w.sum() == 0:
            raise ConfigError(f"multislerp with normalize_weights needs weights that do not sum to zero, got {values}")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ConfigError("multislerp: the weighted directions cancel out (antipodal tensors with balancing "
                              "weights); use other weights")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
    else:
        result = _barycentric_on_sphere(units, w, mean / mean_norm, eps)
        result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    if base is not None:
        result = result + base.to(dtype)
    return result.to(first.dtype)


# ----------------------------------------------------------------------------
# karcher
# ----------------------------------------------------------------------------


def _karcher_iterate(mean: torch.Tensor, units: list, alphas: list, max_iter: int, tol: float) -> torch.Tensor:
    """Riemannian gradient steps ``mean <- exp_mean(sum_i a_i theta_i/sin theta_i (u_i - cos_i mean))``
    until the step's norm is below ``tol`` or after ``max_iter`` steps (mergekit's loop, as written)."""
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return mean


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher``: the weighted Karcher (Frechet) mean of the tensors' directions on the unit
    sphere, times ``sum_i w_i |W_i|``; each tensor is one vector.

    ``weights`` default to ``1/n`` each, the only weights mergekit's method uses (its helper
    ``karcher_merge_tensors`` takes others). Tensors with ``|W_i| <= tol`` drop out of the mean (their
    weights still count in the scale); the mean starts at the normalised weighted sum of the units
    (the first unit if that sum is below ``tol``) and takes :func:`_karcher_iterate`'s steps. One
    tensor is returned as it is; all-zero inputs give zeros. Weights of the kept tensors that sum to
    zero raise ConfigError (mergekit: ZeroDivisionError).
    """
    check_inputs("karcher", list(tensors), 1)
    first = tensors[0]
    if len(tensors) == 1:
        return first
    alphas = [1.0 / len(tensors)] * len(tensors) if weights is None else check_weights("karcher", weights,
                                                                                       len(tensors))
    dtype = work_dtype(*tensors)
    vectors = [x.to(dtype) for x in tensors]
    norms = [torch.linalg.vector_norm(x) for x in vectors]
    kept = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not kept:
        return torch.zeros_like(first)
    total = sum(alphas[i] for i in kept)
    if total == 0:
        raise ConfigError(f"karcher needs weights of the nonzero tensors that do not sum to zero, got {alphas}")
    kept_alphas = [alphas[i] / total for i in kept]
    units = [torch.zeros_like(vectors[i]) if norms[i].item() == 0.0 else vectors[i] / norms[i] for i in kept]
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(kept_alphas, units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    mean = _karcher_iterate(mean, units, kept_alphas, max_iter, tol)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return (scale * mean).to(first.dtype)


# ----------------------------------------------------------------------------
# nearswap
# ----------------------------------------------------------------------------


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's ``nearswap``: take ``other``'s value where it is near ``base``'s, interpolate farther off.

    ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)``; ``w other + (1 - w) base``, entry by entry.
    ``t`` is a distance (not a fraction); like mergekit any finite value is taken (``t <= 0`` keeps the base).
    """
    check_inputs("nearswap", [other], 1, 1, base=base)
    t = check_finite("nearswap", "t", t)
    dtype = work_dtype(base, other)
    a, b = base.to(dtype), other.to(dtype)
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return (weight * b + (1 - weight) * a).to(base.dtype)
