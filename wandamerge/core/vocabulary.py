"""Token-indexed tensors (embeddings, LM heads) moved into an output vocabulary, as mergekit 0.1.5's
``PermutedVocabulary`` does it, as pure functions on tensors and integer lists.

A *permutation* gives, for each token id of the output vocabulary, the row of one input's tensor that
holds that token, or :data:`MISSING`. A token an input lacks (or any token a rule *forces*) gets a
*default row*, the same for every input:

* a rule of the recipe (:class:`TokenRule`): zeros, the token's own row in one input, or a given row of
  one input;
* else, by mergekit's rule: the one input that has the token gives its row; no input has it: zeros; the
  base (when it is an input and has it) gives its row; else the rows of the inputs that have it are
  averaged, in input order, as ``(0 + r_1 + r_2 + ...) / count``.

Output rows past the vocabulary (``pad_to_multiple_of``) are the mean of that input's rows in the
vocabulary. :class:`PermutedRows` reads an input's rows in the output vocabulary lazily, a block of rows at
a time, from any row reader (``shape``, ``rows(start, stop)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

MISSING = -1  # the input has no row for this token


def padded_size(size: int, multiple: int | None) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (mergekit's ``pad_to_multiple_of``)."""
    if not multiple or size % multiple == 0:
        return size
    return (size // multiple + 1) * multiple


@dataclass(frozen=True)
class TokenRule:
    """Where a token's default row comes from (mergekit's ``tokens: {TOKEN: {source, force}}``): ``zero``,
    or input ``input``'s row ``row`` (``None``: the row of the token itself in that input); ``force``:
    every input takes the default row, also one that has the token. No source at all: mergekit's rule."""

    zero: bool = False
    input: int | None = None
    row: int | None = None
    force: bool = False

    @property
    def automatic(self) -> bool:
        return not self.zero and self.input is None


@dataclass(frozen=True)
class DefaultRow:
    """A token's default row: the rows ``(input, row)`` taken (none: zeros), averaged or the one taken."""

    rows: tuple[tuple[int, int], ...] = ()
    average: bool = False


def default_rows(permutations: Sequence[Sequence[int]], rules: Mapping[int, TokenRule], base: int | None,
                 tokens: Sequence[str] | None = None, row_counts: Sequence[int] | None = None
                 ) -> tuple[dict[int, DefaultRow], frozenset[int]]:
    """The default row of every token some input lacks or a rule forces, and the forced token ids.

    ``permutations``: one per input, over the output token ids; ``rules``: token id -> the recipe's rule;
    ``base``: the index of the base among the inputs, or None; ``tokens``: the token strings (for
    messages); ``row_counts``: each input's number of rows (to check a rule's row)."""
    size = len(permutations[0]) if permutations else 0
    name = (lambda i: repr(tokens[i])) if tokens is not None else (lambda i: f"id {i}")
    defaults: dict[int, DefaultRow] = {}
    forced = frozenset(i for i, rule in rules.items() if rule.force)
    for token in range(size):
        present = [i for i, p in enumerate(permutations) if p[token] != MISSING]
        if token not in forced and len(present) == len(permutations):
            continue
        rule = rules.get(token)
        if rule is not None and not rule.automatic:
            defaults[token] = _ruled(rule, permutations, token, name(token), row_counts)
        elif len(present) == 1:
            defaults[token] = DefaultRow(((present[0], permutations[present[0]][token]),))
        elif not present:
            log.warning("token %s is in no input's vocabulary: its rows are zeros", name(token))
            defaults[token] = DefaultRow()
        elif base is not None and base in present:
            defaults[token] = DefaultRow(((base, permutations[base][token]),))
        else:
            defaults[token] = DefaultRow(tuple((i, permutations[i][token]) for i in present), average=True)
    return defaults, forced


def _ruled(rule: TokenRule, permutations, token: int, name: str, row_counts) -> DefaultRow:
    if rule.zero:
        return DefaultRow()
    if rule.row is None:
        row = permutations[rule.input][token]
        if row == MISSING:
            raise InputError(f"token {name}: its source model has no such token; give a source that has it "
                             f"(or kind: model_token with a token_id or token)")
        return DefaultRow(((rule.input, row),))
    if row_counts is not None and not 0 <= rule.row < row_counts[rule.input]:
        raise InputError(f"token {name}: token_id {rule.row} is outside its source model's "
                         f"{row_counts[rule.input]} rows")
    return DefaultRow(((rule.input, rule.row),))


def default_embeddings(defaults: Mapping[int, DefaultRow], read_row: Callable[[int, int], torch.Tensor],
                       token_shape: tuple[int, ...], dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """The default rows as tensors: ``read_row(input, row)`` gives one row of one input (in ``dtype``)."""
    out = {}
    for token, plan in defaults.items():
        if not plan.rows:
            out[token] = torch.zeros(token_shape, dtype=dtype)
        elif not plan.average:
            out[token] = read_row(*plan.rows[0]).to(dtype)
        else:
            total = torch.zeros(token_shape, dtype=dtype)
            for source, row in plan.rows:
                total = total + read_row(source, row).to(dtype)
            out[token] = total / len(plan.rows)
    return out


def permuted_block(read: Callable[[int, int], torch.Tensor], permutation: Sequence[int], start: int, stop: int,
                   defaults: Mapping[int, torch.Tensor], forced: frozenset[int], token_shape: tuple[int, ...],
                   dtype: torch.dtype, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Output rows ``start:stop`` of one input: its own row of each token it has (read in runs of
    consecutive rows with ``read(first, last + 1)``), else the token's default row, else zeros; rows past
    the permutation (padding) are ``pad``."""
    out = torch.zeros((stop - start, *token_shape), dtype=dtype)
    end = min(stop, len(permutation))
    run = None  # [first output id, first input row] of the current run of the input's own rows

    def flush(upto: int):
        if run is not None:
            out[run[0] - start:upto - start] = read(run[1], run[1] + upto - run[0]).to(dtype)

    for token in range(start, end):
        own = permutation[token]
        if own != MISSING and token not in forced:
            if run is None or own != run[1] + token - run[0]:
                flush(token)
                run = [token, own]
            continue
        flush(token)
        run = None
        if token in defaults:
            out[token - start] = defaults[token]
        else:
            log.error("no row for token id %d in an input", token)
    flush(end)
    if stop > end and pad is not None:
        out[max(0, end - start):] = pad
    return out


class PermutedRows:
    """One input's token-indexed tensor in the output vocabulary (``size`` rows), read a block of rows at
    a time from ``source`` (a row reader in the input's own vocabulary), in ``dtype``."""

    def __init__(self, source, permutation: Sequence[int], size: int, defaults: Mapping[int, torch.Tensor],
                 forced: frozenset[int], dtype: torch.dtype):
        self.source, self.permutation, self.defaults, self.forced = source, permutation, defaults, forced
        self.token_shape = tuple(source.shape[1:])
        self.shape, self.dtype = (size, *self.token_shape), dtype
        self._pad: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        pad = None
        if stop > len(self.permutation):
            if self._pad is None:  # the mean of the whole vocabulary's rows, once (mergekit's padding)
                self._pad = torch.mean(self._block(0, len(self.permutation)), dim=0)
            pad = self._pad
        return self._block(start, stop, pad)

    def _block(self, start: int, stop: int, pad: torch.Tensor | None = None) -> torch.Tensor:
        return permuted_block(self.source.rows, self.permutation, start, stop, self.defaults, self.forced,
                              self.token_shape, self.dtype, pad)

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


__all__ = ["MISSING", "DefaultRow", "PermutedRows", "TokenRule", "default_embeddings", "default_rows",
           "padded_size", "permuted_block"]
