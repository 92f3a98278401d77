"""Multiple-choice accuracy by log-likelihood, computed directly: lm-eval's ``acc`` without its harness.

For grids of many models (benchmarks) lm-eval's per-request machinery costs more
than the model on a small CPU. This scores the same way (the continuation is
what the tokenizer gives for ``prompt + choice`` after the prompt's own tokens;
the prediction is the choice with the largest summed log-probability), and when
every choice of an example is one token it reads all of them from a single
forward pass of the prompt. ``tests/test_evaluation.py`` checks it against
lm-eval on the same task.
"""

from __future__ import annotations

import math

import torch


def _encode(tokenizer, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
    if whole[:len(context)] != context:  # the choice merged with the prompt's last token: split as written
        return context, tokenizer(choice, add_special_tokens=False)["input_ids"]
    return context, whole[len(context):]


@torch.inference_mode()
def choice_accuracy(model, tokenizer, examples: list[dict], *, batch_size: int = 16, limit: int | None = None,
                    device: str | torch.device | None = None) -> dict:
    """``{"acc", "acc_stderr", "n"}`` over examples ``{prompt, choices, label}`` (the first ``limit``)."""
    examples = examples[:limit] if limit else examples
    device = torch.device(device) if device else next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # one sequence per example when every choice is a single token, else one per choice
    jobs: list[tuple[int, int, list[int], list[list[int]]]] = []  # (example, choice or -1, tokens, continuations)
    for i, ex in enumerate(examples):
        encoded = [_encode(tokenizer, ex["prompt"], c) for c in ex["choices"]]
        contexts = {tuple(c) for c, _ in encoded}
        if len(contexts) == 1 and all(len(cont) == 1 for _, cont in encoded):
            jobs.append((i, -1, encoded[0][0], [cont for _, cont in encoded]))
        else:
            jobs += [(i, k, ctx + cont[:-1], [cont]) for k, (ctx, cont) in enumerate(encoded)]
    scores = [[0.0] * len(ex["choices"]) for ex in examples]
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][2]))  # similar lengths together
    for start in range(0, len(order), batch_size):
        batch = [jobs[j] for j in order[start:start + batch_size]]
        width = max(len(tokens) for _, _, tokens, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, _, tokens, _) in enumerate(batch):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, (i, k, tokens, conts) in enumerate(batch):
            if k < 0:  # all choices single tokens: read them at the prompt's last position
                logprobs = logits[row, len(tokens) - 1].float().log_softmax(-1)
                for c, cont in enumerate(conts):
                    scores[i][c] = logprobs[cont[0]].item()
            else:
                cont = conts[0]
                first = len(tokens) - len(cont) + 1  # position predicting cont[0]
                logprobs = logits[row, first - 1:len(tokens)].float().log_softmax(-1)
                scores[i][k] = sum(logprobs[j, t].item() for j, t in enumerate(cont))
    right = [float(max(range(len(s)), key=s.__getitem__) == ex["label"]) for s, ex in zip(scores, examples)]
    n = len(right)
    acc = sum(right) / n if n else float("nan")
    stderr = math.sqrt(sum((r - acc) ** 2 for r in right) / (n - 1) / n) if n > 1 else float("nan")
    return {"acc": acc, "acc_stderr": stderr, "n": n}
