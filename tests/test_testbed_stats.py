"""The merging testbed's statistics and its choice of settings (benchmarks/testbed_stats.py, merge_testbed.py).

The choice must see validation numbers only: the records below are built so that the test numbers would
pick another setting, and the protocol must not follow them.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import testbed_stats as stats  # noqa: E402


def test_summary_by_hand():
    per_seed = [{"a": [1, 1, 0, 0], "b": [1, 1, 1, 0]}, {"a": [1, 0, 0, 0], "b": [1, 1, 1, 1]}]
    own = {"a": 0.5, "b": 1.0}
    result = stats.summary(per_seed, own)
    assert result["per_task"] == pytest.approx({"a": 0.375, "b": 0.875})  # seeds averaged
    assert result["absolute"] == pytest.approx(0.625)
    assert result["normalized"] == pytest.approx((0.375 / 0.5 + 0.875 / 1.0) / 2)


def test_bootstrap_interval_matches_the_normal_approximation():
    items = [1] * 200 + [0] * 200  # accuracy 0.5 on 400 items: standard error 0.025
    low, high = stats.interval([{"a": items}], boot=4000)
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.01)
    assert high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.01)
    assert stats.task_interval(items, boot=4000) == pytest.approx((low, high), abs=0.01)
    assert stats.interval([{"a": [1] * 50}]) == (1.0, 1.0)  # nothing to resample


def test_interval_widens_with_seeds_that_disagree():
    same = [{"a": [1, 0] * 100}] * 3
    differ = [{"a": [1, 0] * 100}, {"a": [1] * 200}, {"a": [0] * 200}]
    narrow, wide = stats.interval(same), stats.interval(differ)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_paired_bootstrap():
    own = {"a": 1.0, "b": 1.0}
    base = [{"a": [1, 0] * 150, "b": [0, 1] * 150}]
    better = [{"a": [1, 1] * 150, "b": [1, 1] * 150}]  # right wherever the reference is, and more
    result = stats.paired(better, base, own)
    assert result.difference == pytest.approx(0.5)
    assert result.verdict == "better" and result.p_worse_or_equal == 0.0
    assert stats.paired(base, better, own).verdict == "worse"
    same = stats.paired(base, base, own)
    assert same.difference == 0 and same.verdict == "within noise"
    # pairing: the same items drawn for both sides, so a constant shift has no spread at all
    assert same.low == same.high == 0


def test_choose_setting_takes_validation_results_only():
    results = [stats.ValidationResult((("lambda", 0.5),), 0.80), stats.ValidationResult((("lambda", 1.0),), 0.90),
               stats.ValidationResult((("lambda", 1.5),), 0.90)]
    assert stats.choose_setting(results) == (("lambda", 1.0),)  # a tie goes to the first in grid order
    with pytest.raises(TypeError, match="validation results only"):
        stats.choose_setting([{"setting": (("lambda", 0.5),), "validation": 0.8, "test": 0.99}])
    assert not any("test" in f for f in stats.ValidationResult.__dataclass_fields__)


class FakeBench:
    """Records by split: on validation lambda 0.5 wins, on test lambda 1.5 would."""

    def __init__(self, tasks):
        self.tasks, self.asked = tasks, []

    def measure(self, method, density, seed, lam, split):
        self.asked.append((method.name, density, seed, lam, split))
        favourite = 0.5 if split == "validation" else 1.5
        right = (90 if lam == favourite else 60) + (5 if density in (None, 0.2) else 0)
        return {t: [1] * right + [0] * (100 - right) for t in self.tasks}

    def perplexity(self, *args):
        return 20.0

    def reference_perplexity(self, *args):
        return 18.0


def test_the_protocol_chooses_on_validation_although_test_would_choose_otherwise():
    import merge_testbed as mt

    full = {t: {"validation": [1] * 100, "test": [1] * 100} for t in mt.TASKS}
    refs = {"base": full, "multitask": full, **{t: full for t in mt.TASKS}}
    bench = FakeBench(mt.TASKS)
    methods = [m for m in mt.METHODS if m.name in ("task_arithmetic", "ties", "dare_ties")]
    result = mt.run(bench, methods, refs)
    for name in ("task_arithmetic", "ties", "dare_ties"):
        assert result["chosen"][name]["lambda"] == 0.5  # test alone would have picked 1.5
    assert result["chosen"]["ties"]["density"] == 0.2
    # per method, every validation setting of its grid was measured before any of its test numbers
    for name, size in (("task_arithmetic", len(mt.LAMBDAS)), ("ties", len(mt.LAMBDAS) * len(mt.DENSITIES)),
                       ("dare_ties", len(mt.LAMBDAS) * len(mt.DENSITIES))):
        asked = [a for a in bench.asked if a[0] == name]
        first_test = next(i for i, a in enumerate(asked) if a[-1] == "test")
        assert first_test == size and all(a[-1] == "test" for a in asked[first_test:])  # seed 0 on validation
    tuned = next(r for r in result["rows"] if r["name"] == "dare_ties (tuned)")
    assert tuned["seeds"] == len(mt.SEEDS) and tuned["normalized"] == pytest.approx(0.65)
    assert math.isfinite(tuned["vs_best_data_free"]["difference"])


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "ties/wanda", "task_arithmetic/wanda", "dare_ties",
                                  "dare_linear", "breadcrumbs", "della", "wudi", "ties/wanda-task",
                                  "regmean", "regmean_plus", "obim", "wudi_activation", "ties/wanda-task+gram",
                                  "task_arithmetic/magnitude", "task_arithmetic/wanda-task"])
def test_each_lambda_of_the_grid_is_the_lambda_one_merge_scaled(name):
    """The benchmark evaluates lambda as base + lambda * (merge at lambda 1 - base): the library's own
    lambda must give the same tensor, for every method of the testbed (same seed for the random ones)."""
    import merge_testbed as mt
    import torch

    from wandamerge.merging.methods import merge_tensor

    method = next(m for m in mt.METHODS if m.name == name)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 16, generator=gen)
    finetuned = [base + 0.1 * torch.randn(6, 16, generator=gen) for _ in range(3)]
    options = {"score": method.score, **{k: [v] * 3 for k, v in method.params.items()}}
    if method.score == "wanda":
        options["input_sq_norms"] = [torch.rand(16, generator=gen) for _ in range(3)]
    if method.score == "della":
        options["epsilon"] = [0.1] * 3
    if method.merge_method in ("regmean", "regmean_plus", "wudi_activation") or method.merge_params.get("rescale"):
        inputs = [torch.randn(20, 16, generator=gen) for _ in range(3)]
        options.update(input_grams=[x.T @ x / 20 for x in inputs], **method.merge_params)
    densities = 0.5 if method.score else None

    def merged(lam):
        return merge_tensor(method.merge_method, base, finetuned, [1.0] * 3, densities, lambda_=lam,
                            generator=torch.Generator().manual_seed(7), **options)

    one = merged(1.0)
    for lam in mt.LAMBDAS:
        assert torch.allclose(merged(lam), base + lam * (one - base), atol=1e-6)


def test_micro_batches_give_the_gradient_of_one_padded_batch():
    """The multi-task fine-tune runs its batch as micro-batches of similar length: same loss, same gradient."""
    import testbed
    import torch

    from conftest import tiny_model

    model = tiny_model("llama")
    rows = [(list(range(5, 17)), [20, 21]), ([5, 6], [22]), ([7, 8, 9], [23]), ([9] * 30, [24, 25, 26])]
    assert [len(g) for g in testbed.by_length(rows)] == [2, 1, 1]  # lengths 3 and 4 | 14 | 33: cut past twice the first
    results = []
    for micro in (False, True):
        model.zero_grad()
        loss = testbed.batch_loss_backward(model, rows, 0, micro)
        results.append((loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], atol=1e-5)


def test_kept_records_spare_a_new_machine_the_reference_evaluations(tmp_path, monkeypatch):
    """What one machine measured for a reference model is read back on another (an empty cache)."""
    import testbed

    from wandamerge.evaluation import choices

    calls = []

    def fake_correct(model, tokenizer, examples, **kwargs):
        calls.append(len(examples))
        return [i % 3 == 0 for i in range(len(examples))]

    monkeypatch.setattr(choices, "choice_correct", fake_correct)
    kept = tmp_path / "kept.json"
    first = testbed.Records(tmp_path / "machine1", kept)
    measured = first.measure("model-abc", "newsgroups", "validation", lambda: (None, None))
    assert calls == [len(measured)] and measured[:4] == [1, 0, 0, 1]
    again = testbed.Records(tmp_path / "machine2", kept)  # nothing in its cache
    assert again.measure("model-abc", "newsgroups", "validation", lambda: pytest.fail("re-measured")) == measured
    assert again.get("model-xyz", "newsgroups", "validation") is None  # another model: not a hit
    assert testbed.Records(tmp_path / "machine3").get("model-abc", "newsgroups", "validation") is None
    # a record the cache had before the file kept records goes into the file when next asked for
    old = testbed.Records(tmp_path / "machine4")
    old.measure("model-old", "newsgroups", "test", lambda: (None, None))
    testbed.Records(tmp_path / "machine4", kept).measure("model-old", "newsgroups", "test", lambda: pytest.fail())
    assert testbed.Records(tmp_path / "machine5", kept).get("model-old", "newsgroups", "test") is not None
