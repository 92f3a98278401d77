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

The trims are the sparsifiers' own :class:`~.sparsify.Selection` rows, planned
once by :func:`~.methods.plan_merge` for both paths: nothing is re-derived here.
Covered: methods on deltas with no sparsifier or a selection sparsifier
(``magnitude``, ``wanda``, ``breadcrumbs``), rescale off or ``"density"``,
float32 arithmetic (float32/float16/bfloat16 inputs), and a combine that works
entry by entry: also OBIM's exclusive assignment and the activation sign
election, whose input norms are per column, the same for every block of rows.
Not covered, and merged
whole by :func:`~.methods.merge_tensor_detailed`: the draw sparsifiers
(``random``/DARE and ``della``, whose draws over the whole tensor a block
order would change), the norm-matching rescales (``True``/``"l1"``, ``"l2"``,
``"linf"``, which need the whole delta's norm summed in one order), float64,
and ``linear`` (on full weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ..core.selection import TopCut
from ..errors import ConfigError
from . import methods
from .methods import MergePlan, MergeResult, combine_deltas, plan_merge
from .sparsify import SparsifyPlan, mask_and_rescale, rescale_mode

BLOCK = 1 << 22  # entries of one input in a block (rounded to whole row chunks of the combine)
# combine options read entry by entry, with each fine-tune's input norms by column: rows merge alone
ROW_OPTIONS = frozenset({"election"})


def chunked_merge_applies(plan: MergePlan, dtypes: Sequence[torch.dtype]) -> bool:
    """Whether :func:`merge_rows` covers a merge so planned, with inputs of these dtypes (see the module doc)."""
    if plan.method.on != "deltas" or plan.method.needs_grams:  # a solve over whole rows and columns: whole
        return False
    if set(plan.method_options) - ROW_OPTIONS:
        return False
    if any(d == torch.float64 or not d.is_floating_point for d in dtypes):
        return False
    if any(trim is not None and trim.sparsifier.select is None for trim in plan.trims):
        return False
    return plan.requested is None or rescale_mode(plan.rescale) in (None, "density")


class _Trim:
    """One fine-tune's sparsification, block by block: the mask its selection gives the whole tensor."""

    def __init__(self, trim: SparsifyPlan | None, shape: tuple[int, ...], density: float, rescale, norms):
        self.selection = None if trim is None else trim.selection(shape, density)
        self.score_fn = None if trim is None else trim.sparsifier.score
        self.density, self.rescale, self.norms = density, rescale, norms
        self.numel = math.prod(shape)
        self.cuts: list[TopCut] = []

    def score(self, delta: torch.Tensor) -> torch.Tensor:
        return self.score_fn(delta, self.norms)

    def find(self, deltas) -> None:
        """The cut-offs of a tensor-wide selection: ``deltas()`` yields the delta's blocks in order."""
        if self.selection is not None and self.selection.group == "tensor":
            self.cuts = TopCut.find(lambda: (self.score(d).reshape(-1) for d in deltas()), self.numel,
                                    self.selection.tensor_cuts())

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """The sparsified delta of the next block (in order)."""
        if self.selection is None:
            return delta
        score = self.score(delta)
        if self.cuts:
            keep = self.cuts[0].mask(score)
            if len(self.cuts) > 1:  # breadcrumbs: the top keep + drop_top, less the top drop_top
                keep &= ~self.cuts[1].mask(score)
            keep = keep.view(delta.shape)
        else:
            keep = self.selection.mask(score)
        return mask_and_rescale(delta, keep, self.density, self.rescale)


def _row_spans(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Blocks of whole rows, each a whole number of the whole-tensor combine's row chunks."""
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:])
    step = max(1, methods.COMBINE_CHUNK // max(1, row_numel))
    block = step * max(1, BLOCK // (step * max(1, row_numel)))
    return [(start, min(rows, start + block)) for start in range(0, rows, block)]


def merge_rows(plan: MergePlan, base, finetuned: Sequence, *, dtype: torch.dtype | None = None
               ) -> tuple[MergeResult, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`~.methods.merge_tensor_detailed`'s merge under ``plan``, over row readers (``shape``,
    ``dtype``, ``rows(start, stop)``: :class:`~wandamerge.io.safetensors.FileRows` or
    :class:`~wandamerge.io.safetensors.TensorRows`).

    Every block read is first cast to ``dtype`` (default: the base's), as the
    whole-tensor merge gets its inputs. Returns the result record (its
    ``tensor`` is ``None``) and an iterator over ``(merged block, base block)``
    in row order, both in ``dtype``; the work happens as it is consumed, once.
    Check :func:`chunked_merge_applies` first.
    """
    finetuned = list(finetuned)
    if len(finetuned) != len(plan.weights):
        raise ConfigError(f"{len(finetuned)} fine-tuned readers for a plan of {len(plan.weights)}")
    shape = tuple(base.shape)
    for i, t in enumerate(finetuned):
        if tuple(t.shape) != shape:
            raise ConfigError(f"shape mismatch: base {shape}, finetuned[{i}] {tuple(t.shape)}")
    dtype = dtype or base.dtype
    work = torch.float32
    trims = [_Trim(trim, shape, plan.densities[i], plan.rescale, plan.input_norms[i])
             for i, trim in enumerate(plan.trims)]
    weight_t = torch.tensor(plan.weights, dtype=work)
    spans = _row_spans(shape)

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
            yield combine_deltas(plan.method, base_w, block_deltas, weight_t, plan.normalize, plan.lambda_,
                                 options=plan.method_options or None,
                                 input_sq_norms=plan.input_norms).to(dtype), base_block

    return plan.result(None), blocks()


__all__ = ["BLOCK", "chunked_merge_applies", "merge_rows", "plan_merge"]
