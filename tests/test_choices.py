"""Packed multiple-choice scoring equals one sequence per choice, computed here by brute force."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, random_text, tiny_model, word_tokenizer
from wandamerge.evaluation import choices


def brute_force_scores(model, tokenizer, example) -> list[float]:
    """Each choice alone: the whole ``prompt + choice`` through the model, one sequence at a time."""
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    scores = []
    for choice in example["choices"]:
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        scores.append(sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
    return scores


def examples(n: int, seed: int) -> list[dict]:
    """Prompts of different lengths; choices of one to four words (shared first words too)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = random_text(int(torch.randint(2, 12, (1,), generator=gen)), seed=seed * 100 + i)
        lengths = torch.randint(1, 5, (3,), generator=gen).tolist()
        words = [random_text(k, seed=seed * 1000 + 10 * i + j) for j, k in enumerate(lengths)]
        words[2] = words[0].split()[0] + " " + words[2]  # two choices that share their first token
        rows.append({"prompt": prompt, "choices": [" " + w for w in words], "label": i % 3})
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_scores_equal_each_choice_alone(arch):
    model, tokenizer = tiny_model(arch, seed=3).eval(), word_tokenizer()
    rows = examples(9, seed=1)
    packed = choices.choice_scores(model, tokenizer, rows, batch_size=4)
    for example, got in zip(rows, packed):
        assert got == pytest.approx(brute_force_scores(model, tokenizer, example), abs=1e-4)


def test_single_token_choices_and_accuracy_by_hand():
    model, tokenizer = tiny_model("llama", seed=5).eval(), word_tokenizer()
    rows = [{"prompt": random_text(5, seed=i), "choices": [" w7", " w8", " w9"], "label": i % 3} for i in range(7)]
    scores = choices.choice_scores(model, tokenizer, rows, batch_size=3)
    expected = [brute_force_scores(model, tokenizer, r) for r in rows]
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=1e-4)
    right = [max(range(3), key=want.__getitem__) == r["label"] for want, r in zip(expected, rows)]
    assert choices.choice_correct(model, tokenizer, rows) == right
    assert choices.choice_accuracy(model, tokenizer, rows)["acc"] == pytest.approx(sum(right) / len(rows))


class IgnoresPositions(torch.nn.Module):
    """A model that drops ``position_ids`` (as some remote-code models do): packing must not be trusted."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None  # and ignores a custom mask
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_model_that_ignores_the_packed_mask_falls_back_to_one_sequence_per_choice():
    model, tokenizer = tiny_model("llama", seed=2).eval(), word_tokenizer()
    rows = examples(6, seed=4)
    wrapped = IgnoresPositions(model)
    assert not choices._packing_works(wrapped, [choices._encode_example(tokenizer, r) for r in rows],
                                      tokenizer.pad_token_id, torch.device("cpu"))
    for example, got in zip(rows, choices.choice_scores(wrapped, tokenizer, rows)):
        assert got == pytest.approx(brute_force_scores(model, tokenizer, example), abs=1e-4)


class Recorded(torch.nn.Module):
    """Counts how a model is called; ``slicing``: pass ``logits_to_keep`` on, drop it, or refuse it."""

    def __init__(self, model, slicing: str):
        super().__init__()
        self.inner, self.slicing, self.sliced_calls = model, slicing, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
        if "logits_to_keep" in kwargs:
            if self.slicing == "refuse":
                raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
            if self.slicing == "ignore":
                kwargs.pop("logits_to_keep")
            else:
                self.sliced_calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **kwargs)


@pytest.mark.parametrize("slicing", ["pass", "ignore", "refuse"])
def test_only_the_read_positions_are_projected_and_other_models_get_every_logit(slicing):
    """transformers >= 5 projects only the positions read; a model that ignores or refuses
    ``logits_to_keep`` gets the full logits: the same scores either way."""
    model, tokenizer = tiny_model("llama", seed=6).eval(), word_tokenizer()
    rows = examples(7, seed=8) + [{"prompt": random_text(6, seed=50 + i), "choices": [" w3", " w4"], "label": 0}
                                  for i in range(5)]  # single-token choices: the plain-mask path
    recorded = Recorded(model, slicing)
    for example, got in zip(rows, choices.choice_scores(recorded, tokenizer, rows, batch_size=3)):
        assert got == pytest.approx(brute_force_scores(model, tokenizer, example), abs=1e-4)
    assert (recorded.sliced_calls > 0) == (slicing == "pass" and choices._SLICES_BY_MASK)
