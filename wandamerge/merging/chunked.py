"""Merging one large tensor in row blocks: :func:`~.methods.merge_tensor_detailed`'s result, bit
for bit, without holding a full-size copy.

The inputs are read a block of rows at a time (:class:`~.sources.FileRows`: plain
reads, no memory map) and the merged tensor comes out a block at a time, for
the shard writer. A tensor-wide trim needs the k-th largest score of the
whole delta first: :class:`~.sparsify.TopCut` finds it in two histogram passes
over the blocks, and then gives each block's keep-mask in flat order with the
tie rule of :func:`~.sparsify.top_mask` (equal scores at the cut-off kept from
the lowest flat index on). So each input is read three times (two passes, then
the combine), and memory holds a few blocks of every input, not a tensor.

Covered: methods on deltas with no sparsifier, ``magnitude`` or ``wanda``
(tensor, row or N:M groups) and ``breadcrumbs``, rescale off or ``"density"``,
float32 arithmetic (float32/float16/bfloat16 inputs). Not covered, and merged
whole by :func:`~.methods.merge_tensor_detailed`: the random sparsifiers
(``random``/DARE and ``della``, whose draws over the whole tensor a block
order would change), the norm-matching rescales (``True``/``"l1"``, ``"l2"``,
``"linf"``, which need the whole delta's norm summed in one order), float64,
and ``linear`` (on full weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from . import methods
from .methods import MergeResult, _delta_options, _per_model_options, combine_deltas, get_method
from .sparsify import (DEFAULT_GAMMA, TopCut, _group_keep, _rescale_mode, keep_count,
                       plan_sparsify, wanda_delta_score)

CHUNKED_SPARSIFIERS = (None, "magnitude", "wanda", "breadcrumbs")
BLOCK = 1 << 22  # entries of one input in a block (rounded to whole row chunks of the combine)


def chunked_merge_applies(method: str, dtypes: Sequence[torch.dtype], score: str | None, rescale,
                          input_sq_norms=None, shape: tuple[int, ...] = ()) -> bool:
    """Whether :func:`merge_rows` covers this merge (see the module doc); ``score`` as
    :func:`~.methods.merge_tensor_detailed` takes it (``None``: the method's)."""
    spec = get_method(method)
    if spec.on != "deltas" or any(d == torch.float64 or not d.is_floating_point for d in dtypes):
        return False
    requested = spec.score if score is None else score
    if requested is None:
        return True
    try:
        norms = input_sq_norms[0] if isinstance(input_sq_norms, (list, tuple)) else input_sq_norms
        chosen, _, _, _ = plan_sparsify(requested, tuple(shape), density=1.0, rescale=False,
                                        input_sq_norms=norms, group=None, pattern=None, gamma=None, epsilon=None)
        mode = _rescale_mode(spec.rescale if rescale is None else rescale)
    except ValueError:  # the whole-tensor merge raises it
        return False
    return chosen.name in CHUNKED_SPARSIFIERS and mode in (None, "density")


class _Trim:
    """One fine-tune's sparsification, block by block (the mask its sparsifier would give)."""

    def __init__(self, name: str | None, shape: tuple[int, ...], density: float, rescale, group, pattern, gamma,
                 input_sq_norms):
        self.name, self.density, self.rescale = name, density, _rescale_mode(rescale)
        self.norms, self.group, self.pattern = input_sq_norms, group, pattern
        self.numel = math.prod(shape)
        self.ks: list[int] = []
        self.cuts: list[TopCut] = []
        self.active = False
        if name == "breadcrumbs":
            gamma = DEFAULT_GAMMA if gamma is None else gamma
            if not 0.0 <= gamma < 1.0:
                raise ValueError(f"gamma {gamma} is outside [0, 1)")
            if density < 1.0:
                target, n_top = int(density * self.numel), int(gamma * self.numel)
                n_bottom = max(0, self.numel - target - n_top)
                n_top = self.numel - n_bottom - target
                self.ks, self.active = [n_top + target, n_top], True
        elif name in ("magnitude", "wanda"):
            self.group = group or ("tensor" if name == "magnitude" else "row")
            self.active = density < 1.0 or pattern is not None
            if self.active and pattern is None and (self.group == "tensor" or len(shape) < 2):
                self.ks = [keep_count(density, self.numel)]  # a vector is one row: tensor-wide

    def score(self, delta: torch.Tensor) -> torch.Tensor:
        if self.name == "wanda":
            return wanda_delta_score(delta, self.norms)
        return delta.abs()

    def find(self, deltas) -> None:
        """The cut-offs of a tensor-wide trim: ``deltas()`` yields the delta's blocks in order."""
        if self.ks:
            self.cuts = TopCut.find(lambda: (self.score(d).reshape(-1) for d in deltas()), self.numel, self.ks)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """The sparsified delta of the next block (in order)."""
        if not self.active:
            return delta
        score = self.score(delta)
        if self.cuts:
            keep = self.cuts[0].mask(score)
            if len(self.cuts) > 1:  # breadcrumbs: the top n_top + target, less the top n_top
                keep &= ~self.cuts[1].mask(score)
            keep = keep.view(delta.shape)
        else:
            keep = _group_keep(score, self.density, self.group, self.pattern)
        masked = delta * keep.to(delta.dtype)
        return masked / self.density if self.rescale == "density" else masked


def merge_rows(method: str, base, finetuned: Sequence, weights: Sequence[float] | float,
               densities: Sequence[float] | float | None = None, *, dtype: torch.dtype | None = None,
               score: str | None = None, lambda_: float | None = None, normalize: bool | None = None,
               rescale=None, gamma=None, epsilon=None, input_sq_norms=None, group: str | None = None,
               pattern: str | None = None) -> tuple[MergeResult, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`~.methods.merge_tensor_detailed` over row readers (``shape``, ``dtype``,
    ``rows(start, stop)``: :class:`~.sources.FileRows` or :class:`~.sources.TensorRows`).

    Every block read is first cast to ``dtype`` (default: the base's), as the
    whole-tensor merge gets its inputs. Returns the result record (its
    ``tensor`` is ``None``) and an iterator over ``(merged block, base block)``
    in row order, both in ``dtype``; the work happens as it is consumed, once.
    Check :func:`chunked_merge_applies` first.
    """
    spec = get_method(method)
    finetuned = list(finetuned)
    n = len(finetuned)
    if n == 0:
        raise ValueError("merging needs at least one fine-tuned tensor")
    shape = tuple(base.shape)
    for i, t in enumerate(finetuned):
        if tuple(t.shape) != shape:
            raise ValueError(f"shape mismatch: base {shape}, finetuned[{i}] {tuple(t.shape)}")
    dtype = dtype or base.dtype
    weights, densities, gammas, epsilons, norms, normalize = _per_model_options(
        spec, n, weights, densities, gamma, epsilon, input_sq_norms, normalize)
    lambda_, rescale, requested, used, reason = _delta_options(spec, shape, densities, norms, score, lambda_,
                                                               rescale, group, pattern, gamma, epsilon)
    trims = []
    for i in range(n):
        if used is None:
            trims.append(_Trim(None, shape, 1.0, False, None, None, None, None))
            continue
        chosen, reason, group_i, pattern_i = plan_sparsify(
            requested, shape, density=densities[i], rescale=rescale, input_sq_norms=norms[i], group=group,
            pattern=pattern, gamma=gammas[i], epsilon=epsilons[i])
        if chosen.name not in CHUNKED_SPARSIFIERS:
            raise ValueError(f"merge_rows does not cover the {chosen.name} sparsifier")
        trims.append(_Trim(chosen.name, shape, densities[i], rescale, group_i, pattern_i, gammas[i], norms[i]))
    work = torch.float32
    weight_t = torch.tensor(weights, dtype=work)

    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:])
    step = max(1, methods._COMBINE_CHUNK // max(1, row_numel))  # the whole-tensor combine's row chunks, kept whole
    block = step * max(1, BLOCK // (step * max(1, row_numel)))
    spans = [(start, min(rows, start + block)) for start in range(0, rows, block)]

    def read(reader, start, stop):
        return reader.rows(start, stop).to(dtype).to(work)

    def deltas(i):
        for start, stop in spans:
            yield read(finetuned[i], start, stop) - read(base, start, stop)

    def blocks():
        for i, trim in enumerate(trims):
            trim.find(lambda: deltas(i))
        for start, stop in spans:
            base_block = base.rows(start, stop).to(dtype)
            base_w = base_block.to(work)
            block_deltas = (trim.apply(read(finetuned[i], start, stop) - base_w) for i, trim in enumerate(trims))
            yield combine_deltas(spec, base_w, block_deltas, weight_t, normalize, lambda_).to(dtype), base_block

    result = MergeResult(None, spec.name, used, requested, reason, normalize, rescale, lambda_)
    return result, blocks()
