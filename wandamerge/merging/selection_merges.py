"""Merges that choose, per entry or per filter, how much of each task vector to keep.

Pure tensor functions with the per-tensor semantics of mergekit 0.1.5's merge methods:

* :func:`model_stock` (and :func:`model_stock_ratio`)  ``merge_methods/model_stock.py``
* :func:`sce` (and :func:`sce_select_mask`, :func:`sce_model_weights`)  ``merge_methods/sce.py``
  (its sign consensus is ``get_mask(method="sum")`` of ``merge_methods/generalized_task_arithmetic.py``)
* :func:`arcee_fusion` (and :func:`fusion_importance`, :func:`fusion_threshold`)  ``merge_methods/arcee_fusion.py``
* :func:`ram`, :func:`ramplus_tl` (and :func:`ram_contributions`)  ``merge_methods/ram.py``
* :func:`passthrough`  ``merge_methods/passthrough.py``

Arithmetic runs in float32 (float64 when any input is float64), in mergekit's
order of operations, so for float32 and float64 inputs the results agree with
mergekit's to the bit (top-k and quantile cut-offs included: the same values
are sorted the same way). The result has the base's dtype. mergekit computes in
the inputs' promoted dtype, so for bfloat16/float16 inputs ours is the float32
result rounded once and mergekit's a result rounded at every step (which can
also move an entry across a cut-off); for mixed dtypes mergekit returns the
promoted dtype. Structural problems raise :class:`~wandamerge.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .interpolation import check_finite, check_inputs, work_dtype

# arcee_fusion estimates its quantiles from this many values drawn with replacement (mergekit's _QUANTILE_SAMPLE_SIZE)
FUSION_SAMPLE_SIZE = 1_000_000


def _task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the base in the work dtype, the stack ``(n, *shape)`` of ``W_i - base``)."""
    dtype = work_dtype(base, *tensors)
    origin = base.to(dtype)
    return origin, torch.stack([t.to(dtype) - origin for t in tensors], dim=0)


# ----------------------------------------------------------------------------
# model stock
# ----------------------------------------------------------------------------


def model_stock_ratio(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock's interpolation ratio ``t = k cos / (1 + (k-1) cos)`` per vector along the last dim,
    ``cos`` the mean pairwise cosine of the ``k`` offsets ``W_i - W_0`` (norm products clamped to
    1e-6, each cosine to [-1, 1]); 0 (keep the base) where ``|1 + (k-1) cos| < 1e-6``. Shape ``(..., 1)``."""
    cosines = []
    for idx, offset_a in enumerate(offsets):
        for offset_b in offsets[idx + 1:]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cosines.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(offsets)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """mergekit's ``model_stock``: ``t * mean_i W_i + (1 - t) * W_0`` with ``t =`` :func:`model_stock_ratio`,
    one ratio for the whole tensor, or with ``filter_wise`` one per vector along the last dim (a 1-D
    tensor is one vector). Needs a base and at least two other tensors."""
    check_inputs("model_stock", list(tensors), 2, base=base)
    dtype = work_dtype(base, *tensors)
    w_0, ws = base.to(dtype), [t.to(dtype) for t in tensors]
    if not filter_wise:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    elif w_0.dim() == 1:
        w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    t = model_stock_ratio([w - w_0 for w in ws])
    average = sum(ws) / len(ws)
    return (t * average + (1 - t) * w_0).reshape(base.shape).to(base.dtype)


# ----------------------------------------------------------------------------
# sce
# ----------------------------------------------------------------------------


def sce_select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE's "select": 1 at the ``int(count_nonzero(var) * select_topk)`` entries whose variance across the
    task vectors ``(n, *shape)`` is largest, else 0 (all 0 for ``select_topk <= 0``, all 1 for ``>= 1``).

    Equal variances at the cut-off are chosen by ``torch.topk``, as in mergekit, so the two agree there too.
    """
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_model_weights(deltas: torch.Tensor) -> torch.Tensor:
    """SCE's "calculate": each task vector's mean square over the sum of them (``1/n`` each when that
    sum is below 1e-6), shape ``(n,)``."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's ``sce``: select (:func:`sce_select_mask`), calculate (:func:`sce_model_weights`),
    erase (TIES' sign election on the summed selected deltas; zeros never agree), merge:
    ``base + sum_i m_i c_i d_i / max(sum_i m_i c_i, 1e-6)``, ``m_i`` the agreement mask.

    mergekit's ``int8_mask`` only changes the dtype masks are stored in, never a value, so it has no
    counterpart here. No tensor besides the base returns the base, as mergekit.
    """
    check_inputs("sce", list(tensors), 0, base=base)
    select_topk = check_finite("sce", "select_topk", select_topk)
    if not tensors:
        return base
    origin, deltas = _task_vectors(base, tensors)
    if select_topk < 1:
        deltas = deltas * sce_select_mask(deltas, select_topk).unsqueeze(0)
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = deltas.sign() == majority
    weights = sce_model_weights(deltas).reshape((-1,) + (1,) * (deltas.dim() - 1))
    erased = weights * agree
    merged = (deltas * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
    return (origin + merged).to(base.dtype)


# ----------------------------------------------------------------------------
# arcee fusion
# ----------------------------------------------------------------------------


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance ``|other - base| * KL(softmax(other) || softmax(base))``, the softmaxes
    (each plus 1e-8) and the KL sum along the last dim, the KL broadcast back over it."""
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(importance: torch.Tensor, *, sample_size: int = FUSION_SAMPLE_SIZE,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``median + 1.5 (q3 - q1)`` of the importances, each quartile the sorted value at index
    ``floor(q (n - 1))`` (no interpolation); over more than ``sample_size`` values, of ``sample_size``
    values drawn with replacement by ``torch.randint`` from ``generator`` (None: torch's global one,
    so the same seed draws mergekit's sample)."""
    flat = importance.reshape(-1)
    if flat.numel() > sample_size:
        flat = flat[torch.randint(flat.numel(), (sample_size,), generator=generator, device=flat.device)]
    ordered, _ = torch.sort(flat)
    quantiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32, device=ordered.device)
    q1, median, q3 = ordered[(quantiles * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *, sample_size: int = FUSION_SAMPLE_SIZE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's ``arcee_fusion``: ``base + (other - base) * [importance >= threshold]`` with
    :func:`fusion_importance` and :func:`fusion_threshold` (an outlier fence on the importances).

    Over ``sample_size`` (mergekit: 1,000,000) elements the threshold comes from a random sample:
    the same draw as mergekit's only with the same global seed (``generator=None``) or generator state.
    """
    check_inputs("arcee_fusion", [other], 1, 1, base=base)
    if int(sample_size) < 1:
        raise ConfigError(f"arcee_fusion needs a sample_size of at least 1, got {sample_size}")
    dtype = work_dtype(base, other)
    a, b = base.to(dtype), other.to(dtype)
    importance = fusion_importance(b, a)
    keep = (importance >= fusion_threshold(importance, sample_size=int(sample_size), generator=generator))
    return (a + (b - a) * keep.to(dtype)).to(base.dtype)


# ----------------------------------------------------------------------------
# RAM
# ----------------------------------------------------------------------------


def ram_contributions(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    """For flat task vectors ``(n, p)``: (``active = |d| > epsilon``, the number of active models per
    entry ``(1, p)``, ``shared`` = entries two or more models change, ``unique`` = entries one model changes)."""
    active = deltas.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return active, counts, counts > 1, counts == 1


def _ram_check(base: torch.Tensor, tensors: Sequence[torch.Tensor], method: str, epsilon: float) -> float:
    """The checked ``epsilon`` after the inputs' checks (any number of tensors besides the base)."""
    check_inputs(method, list(tensors), 0, base=base)
    return check_finite(method, "epsilon", epsilon)


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ``ram`` (Reinforced Agent Merging): an entry one task vector changes (``|d| >
    epsilon``) takes that change whole; one several change takes their mean over the changing models:
    ``base + sum_i d_i [active_i] (unique + shared / count)``. No tensor besides the base returns the base."""
    epsilon = _ram_check(base, tensors, "ram", epsilon)
    if not tensors:
        return base
    origin, stacked = _task_vectors(base, tensors)
    flat = stacked.view(len(tensors), -1)
    active, counts, shared, unique = ram_contributions(flat, epsilon)
    kept = flat * active
    merged = ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return (origin + merged.reshape_as(origin)).to(base.dtype)


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ``ramplus_tl`` (RAM+, tensor-local): :func:`ram` with each model's unique changes
    scaled by ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, ``rho_i`` = its shared over its unique
    active entries in this tensor (the unique count clamped to ``epsilon``; ``rho`` in float32, as mergekit).

    ``epsilon <= 0`` raises ConfigError: mergekit would divide 0 by 0 (NaN) for a model that changes nothing.
    """
    epsilon = _ram_check(base, tensors, "ramplus_tl", epsilon)
    r, alpha = check_finite("ramplus_tl", "r", r), check_finite("ramplus_tl", "alpha", alpha)
    if epsilon <= 0:
        raise ConfigError(f"ramplus_tl needs epsilon > 0, got {epsilon}")
    if not tensors:
        return base
    origin, stacked = _task_vectors(base, tensors)
    flat = stacked.view(len(tensors), -1)
    active, counts, shared, unique = ram_contributions(flat, epsilon)
    rho = (active & shared).sum(dim=1) / (active & unique).sum(dim=1).clamp(min=epsilon)
    lambda_ = 1 + r * rho.clamp(min=0, max=alpha)
    kept = flat * active
    merged = ((kept * unique * lambda_.unsqueeze(-1)) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return (origin + merged.reshape_as(origin)).to(base.dtype)


# ----------------------------------------------------------------------------
# passthrough
# ----------------------------------------------------------------------------


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """mergekit's ``passthrough``: the one input unchanged (the same tensor object), or ``scale * W``."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"passthrough takes one tensor, got {type(tensor).__name__}")
    if scale is None:
        return tensor
    scale = check_finite("passthrough", "scale", scale)
    if not tensor.is_floating_point():
        raise ConfigError(f"passthrough can scale only floating-point tensors, got {tensor.dtype}")
    return (tensor.to(work_dtype(tensor)) * scale).to(tensor.dtype)
