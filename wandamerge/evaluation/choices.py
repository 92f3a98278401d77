"""Multiple-choice accuracy by log-likelihood, computed directly: lm-eval's ``acc`` without its harness.

For grids of many models (benchmarks) lm-eval's per-request machinery costs more
than the model on a small CPU. This scores the same way (the continuation is
what the tokenizer gives for ``prompt + choice`` after the prompt's own tokens;
the prediction is the choice with the largest summed log-probability).
``tests/test_evaluation.py`` checks it against lm-eval on the same task.

Each example is one packed row: the prompt once, then every choice's tokens
but the last as a branch that sees the prompt and its own earlier tokens only
(a 4-D attention mask, positions continuing after the prompt). A choice's first
token is read at the prompt's last position, its later ones in its branch: the
same numbers as one sequence per choice, for the prompt's cost once. Before
trusting the packed path on a model, the first examples are scored both ways
and compared; a model that does not honour custom masks or positions falls back
to one sequence per choice (``tests/test_choices.py`` checks both).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

try:  # transformers >= 5: logits_to_keep may be a boolean (batch, length) mask of positions, per row
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep  # noqa: F401
    _SLICES_BY_MASK = True
except ImportError:
    _SLICES_BY_MASK = False

PACKED_CHECK_TOLERANCE = 1e-3  # nats: the packed and per-choice scores of a model that honours the mask agree


@dataclass(frozen=True)
class _Packed:
    """One example as one row: ``tokens`` (prompt, then branches), ``positions``, ``branch`` (for the mask),
    and for each choice the (row position, token) pairs whose log-probabilities add up to its score."""
    tokens: list[int]
    positions: list[int]
    branch: list[int]  # -1 for prompt tokens, else the choice whose branch the token belongs to
    reads: list[list[tuple[int, int]]]


def _encode(tokenizer, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
    if whole[:len(context)] != context:  # the choice merged with the prompt's last token: split as written
        return context, tokenizer(choice, add_special_tokens=False)["input_ids"]
    return context, whole[len(context):]


def _encode_example(tokenizer, example: dict) -> tuple[list[int], list[list[int]]]:
    """The prompt's tokens (shared by every choice: ``_encode`` keeps them) and each choice's continuation."""
    pairs = [_encode(tokenizer, example["prompt"], c) for c in example["choices"]]
    return pairs[0][0], [cont for _, cont in pairs]


def _pack(context: list[int], continuations: list[list[int]]) -> _Packed:
    tokens, positions, branch = list(context), list(range(len(context))), [-1] * len(context)
    reads = []
    for k, cont in enumerate(continuations):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(len(context), len(context) + len(cont) - 1)
        branch += [k] * (len(cont) - 1)
        # cont[0] is predicted at the prompt's last token, cont[j] at branch token j - 1
        reads.append([(len(context) - 1, cont[0])] + [(start + j - 1, t) for j, t in enumerate(cont) if j > 0])
    return _Packed(tokens, positions, branch, reads)


def _packed_mask(rows: list[_Packed], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, width, width) mask: prompt tokens causal, branch tokens see the prompt and their
    own branch's earlier tokens; padding sees only itself (no row of the softmax is empty)."""
    allowed = torch.zeros(len(rows), width, width, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        n = len(row.tokens)
        branch = torch.tensor(row.branch)
        same = (branch[:, None] == branch[None, :]) | (branch[None, :] < 0)
        allowed[r, :n, :n] = same & causal[:n, :n]
        allowed[r, n:, n:] = torch.eye(width - n, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _score_packed(model, rows: list[_Packed], pad: int, device) -> list[list[float]]:
    width = max(len(row.tokens) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row.tokens)] = torch.tensor(row.tokens)
        positions[r, :len(row.tokens)] = torch.tensor(row.positions)
    if any(b >= 0 for row in rows for b in row.branch):
        dtype = next(model.parameters()).dtype
        mask = _packed_mask(rows, width, dtype if dtype.is_floating_point else torch.float32)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    else:  # single-token choices only: a plain right-padded batch, which keeps the fast attention kernels
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            mask[r, :len(row.tokens)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
    wanted = [sorted({p for reads in row.reads for p, _ in reads}) for row in rows]
    logprobs = _logprobs_at(model, {k: v.to(device) for k, v in inputs.items()}, wanted)
    return [[sum(logprobs[r][p][t].item() for p, t in reads) for reads in row.reads] for r, row in enumerate(rows)]


def _logprobs_at(model, inputs: dict, wanted: list[list[int]]) -> list[dict[int, torch.Tensor]]:
    """Next-token log-probabilities of row r at positions ``wanted[r]`` only: the vocabulary projection of
    the other positions (a fifth of a small model's work) is skipped through transformers' ``logits_to_keep``
    (a boolean (batch, length) selection, flattened in row order); a model that does not take it, or
    returns another shape, gets every position's logits."""
    keep = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    for r, positions in enumerate(wanted):
        keep[r, positions] = True
    count = int(keep.sum())
    logits = None
    if _SLICES_BY_MASK:
        try:
            logits = model(**inputs, use_cache=False, logits_to_keep=keep.to(inputs["input_ids"].device)).logits
        except TypeError:  # this model's forward has no logits_to_keep
            logits = None
    if logits is not None and logits.shape[:-1] == (count,):
        rows = logits.float().log_softmax(-1).split([len(p) for p in wanted])
        return [dict(zip(positions, row)) for positions, row in zip(wanted, rows)]
    logits = model(**inputs, use_cache=False).logits
    return [dict(zip(positions, logits[r, positions].float().log_softmax(-1))) for r, positions in enumerate(wanted)]


def _score_per_choice(model, context: list[int], continuations: list[list[int]], pad: int,
                      device) -> list[float]:
    """The reference: one right-padded sequence per choice (what lm-eval does)."""
    width = max(len(context) + len(c) - 1 for c in continuations)
    ids = torch.full((len(continuations), width), pad, dtype=torch.long)
    mask = torch.zeros((len(continuations), width), dtype=torch.long)
    for k, cont in enumerate(continuations):
        seq = context + cont[:-1]
        ids[k, :len(seq)] = torch.tensor(seq)
        mask[k, :len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    scores = []
    for k, cont in enumerate(continuations):
        first = len(context) - 1  # position predicting cont[0]
        logprobs = logits[k, first:first + len(cont)].float().log_softmax(-1)
        scores.append(sum(logprobs[j, t].item() for j, t in enumerate(cont)))
    return scores


def _packing_works(model, encoded: list[tuple[list[int], list[list[int]]]], pad: int, device) -> bool:
    """Score a few examples packed and one sequence per choice; packing is used only if they agree."""
    sample = encoded[:4]
    packed = _score_packed(model, [_pack(c, conts) for c, conts in sample], pad, device)
    reference = [_score_per_choice(model, c, conts, pad, device) for c, conts in sample]
    worst = max(abs(a - b) for p, q in zip(packed, reference) for a, b in zip(p, q))
    if worst > PACKED_CHECK_TOLERANCE:
        log.info("packed choice scoring differs from per-choice scoring by %.3g on this model; scoring each "
                 "choice as its own sequence", worst)
    return worst <= PACKED_CHECK_TOLERANCE


@torch.inference_mode()
def choice_scores(model, tokenizer, examples: list[dict], *, batch_size: int = 16,
                  device: str | torch.device | None = None) -> list[list[float]]:
    """The summed log-probability of each choice of each example ``{prompt, choices, label}``."""
    device = torch.device(device) if device else next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [_encode_example(tokenizer, ex) for ex in examples]
    if not encoded:
        return []
    if not _packing_works(model, encoded, pad, device):
        return [_score_per_choice(model, c, conts, pad, device) for c, conts in encoded]
    rows = [_pack(c, conts) for c, conts in encoded]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))  # similar lengths together
    scores: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, s in zip(batch, _score_packed(model, [rows[i] for i in batch], pad, device)):
            scores[i] = s
    return scores


def choice_correct(model, tokenizer, examples: list[dict], **kwargs) -> list[bool]:
    """Whether each example's most likely choice is its label (ties go to the first choice, as lm-eval)."""
    return [max(range(len(s)), key=s.__getitem__) == ex["label"]
            for s, ex in zip(choice_scores(model, tokenizer, examples, **kwargs), examples)]


def choice_accuracy(model, tokenizer, examples: list[dict], *, batch_size: int = 16, limit: int | None = None,
                    device: str | torch.device | None = None) -> dict:
    """``{"acc", "acc_stderr", "n"}`` over examples ``{prompt, choices, label}`` (the first ``limit``)."""
    examples = examples[:limit] if limit else examples
    right = [float(c) for c in choice_correct(model, tokenizer, examples, batch_size=batch_size, device=device)]
    n = len(right)
    acc = sum(right) / n if n else float("nan")
    stderr = math.sqrt(sum((r - acc) ** 2 for r in right) / (n - 1) / n) if n > 1 else float("nan")
    return {"acc": acc, "acc_stderr": stderr, "n": n}
