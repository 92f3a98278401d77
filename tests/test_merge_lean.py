"""The memory-lean paths for large tensors give the same bits as the whole-tensor ones.

Forced on small tensors with low thresholds: the histogram selection (``TopCut``)
against ``kthvalue``, the block-by-block merge (``merge_rows``) against
``merge_tensor_detailed``, and whole merges of the tiny saved models.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from wandamerge.core import selection
from wandamerge.io.safetensors import TensorRows
from wandamerge.merging import chunked, methods

from conftest import finetune_of, save, tensors
from test_merge_end_to_end import run_recipe

sparsify = importlib.import_module("wandamerge.merging.sparsify")  # the package exports a function of that name


@pytest.fixture
def lean(monkeypatch):
    """Every selection and every merge of a tensor on deltas takes the lean path, in small pieces."""
    monkeypatch.setattr(selection, "LEAN_MIN_NUMEL", 1)
    monkeypatch.setattr(selection, "SELECT_CHUNK", 16)
    monkeypatch.setattr(chunked, "BLOCK", 50)
    monkeypatch.setattr(methods, "COMBINE_CHUNK", 20)


def kth_mask(score, k, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(selection, "LEAN_MIN_NUMEL", 1 << 62)
        return selection.top_mask(score, k)


def score_cases():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 61):
        x = torch.randn(1, n, generator=g)
        yield x
        yield x.abs()
        yield (x * 3).round() / 3  # many ties
        yield torch.full((1, n), 0.25)  # all equal
        yield torch.zeros(1, n)
        yield torch.where(x > 0, torch.tensor(0.0), torch.tensor(-0.0))  # -0.0 equals 0.0
        yield x.half()
        yield ((x * 2).round() / 2).bfloat16()
    yield torch.tensor([[1e-45, -1e-45, 3.4e38, -3.4e38, float("inf"), -float("inf"), 0.0, -0.0] * 5])
    yield torch.randn(4, 40, generator=g).round()  # several rows


def test_lean_selection_equals_kthvalue(monkeypatch, lean):
    for score in score_cases():
        n = score.shape[1]
        for k in sorted({-1, 0, 1, 2, n // 3, n - 1, n, n + 3}):
            expected = kth_mask(score, k, monkeypatch)
            got = selection.top_mask(score, k)
            assert torch.equal(got, expected), (score.dtype, tuple(score.shape), k)
            if 0 < k < n:
                assert int(got.sum()) == k * score.shape[0]


def test_lean_breadcrumbs_equals_whole(monkeypatch, lean):
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(30, 17, generator=g) * 4).round() / 4
    got = sparsify.breadcrumbs_trim(delta, 0.3, gamma=0.05)
    with monkeypatch.context() as m:
        m.setattr(selection, "LEAN_MIN_NUMEL", 1 << 62)
        assert torch.equal(got, sparsify.breadcrumbs_trim(delta, 0.3, gamma=0.05))


CASES = [
    ("ties", {}),
    ("ties", {"lambda_": 0.7, "normalize": False}),
    ("ties", {"score": "magnitude", "group": "row"}),
    ("ties", {"score": "magnitude", "pattern": "2:4"}),
    ("ties", {"rescale": "density"}),
    ("ties", {"score": "wanda"}),
    ("ties", {"score": "wanda", "group": "tensor"}),
    ("task_arithmetic", {"densities": None}),
    ("task_arithmetic", {"score": "magnitude"}),
    ("breadcrumbs", {"gamma": [0.05, 0.1, 0.0]}),
    ("breadcrumbs_ties", {}),
    ("obim", {"norms": "per model"}),  # the saliencies of each fine-tune's own input norms, by column
    ("obim", {}),  # no norms (an embedding): |delta| alone
    ("ties", {"score": "wanda", "election": "activation", "norms": "per model"}),
]


@pytest.mark.parametrize("method, options, dtype, quantised",
                         [(m, o, torch.float32, q) for m, o in CASES for q in (False, True)]
                         + [("ties", {}, torch.bfloat16, True), ("breadcrumbs_ties", {}, torch.float16, False)])
def test_merge_rows_equals_whole_tensor(monkeypatch, method, options, dtype, quantised):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(37, 24, generator=g)
    fts = [base + torch.randn(37, 24, generator=g) * 0.1 for _ in range(3)]
    if quantised:  # ties across the whole delta and between fine-tunes
        fts = [base + ((ft - base) * 20).round() / 20 for ft in fts]
    base, fts = base.to(dtype), [ft.to(dtype) for ft in fts]
    options = dict(options)
    densities = options.pop("densities", [0.3, 0.5, 0.25])
    if options.pop("norms", None) == "per model":
        options["input_sq_norms"] = [torch.rand(24, generator=g) for _ in fts]
    elif options.get("score") == "wanda":
        options["input_sq_norms"] = torch.rand(24, generator=g)
    whole = methods.merge_tensor_detailed(method, base, fts, [0.5, 0.3, 0.2], densities, **options)
    monkeypatch.setattr(chunked, "BLOCK", 200)  # 4 rows a block
    monkeypatch.setattr(methods, "COMBINE_CHUNK", 48)  # 2 rows a combine
    plan = methods.plan_merge(method, tuple(base.shape), 3, [0.5, 0.3, 0.2], densities, **options)
    assert chunked.chunked_merge_applies(plan, [dtype])
    result, blocks = chunked.merge_rows(plan, TensorRows(base), [TensorRows(f) for f in fts])
    pieces = list(blocks)
    assert torch.equal(torch.cat([b for _, b in pieces]), base)
    merged = torch.cat([m for m, _ in pieces])
    assert merged.dtype == whole.tensor.dtype
    assert torch.equal(merged.view(torch.uint8), whole.tensor.view(torch.uint8))  # -0.0 too
    assert (result.sparsifier, result.requested_sparsifier, result.fallback_reason, result.normalize,
            result.lambda_) == (whole.sparsifier, whole.requested_sparsifier, whole.fallback_reason,
                                whole.normalize, whole.lambda_)


def test_merge_rows_of_a_vector_and_fallback_reason(monkeypatch):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(101, generator=g)
    fts = [base + torch.randn(101, generator=g) for _ in range(2)]
    norms = torch.rand(101, generator=g)
    whole = methods.merge_tensor_detailed("ties", base, fts, 0.5, 0.3, score="wanda", input_sq_norms=norms)
    monkeypatch.setattr(chunked, "BLOCK", 10)
    plan = methods.plan_merge("ties", tuple(base.shape), 2, 0.5, 0.3, score="wanda", input_sq_norms=norms)
    result, blocks = chunked.merge_rows(plan, TensorRows(base), [TensorRows(f) for f in fts])
    assert torch.equal(torch.cat([m for m, _ in blocks]), whole.tensor)
    assert result.fallback_reason == whole.fallback_reason is not None


@pytest.mark.parametrize("method", ["random", "della"])
def test_random_sparsifiers_stay_whole(method):
    def applies(name, dtype=torch.float32, **options):
        return chunked.chunked_merge_applies(methods.plan_merge(name, (4, 4), 2, 0.5, 0.5 if name != "linear"
                                                                else None, **options), [dtype])

    assert not applies("dare_ties" if method == "random" else "della")
    assert not applies("ties", rescale=True)  # L1 rescale
    assert not applies("ties", torch.float64)
    assert not applies("linear")
    assert applies("ties")


def count_block_merges(m) -> list:
    """Spy on the merge's block-by-block path: the names it merged that way."""
    from wandamerge.jobs import merge as merge_module

    names, real = [], merge_module._TensorJob.merge_in_blocks

    def spy(self, *args, **kwargs):
        names.append(self.name)
        return real(self, *args, **kwargs)

    m.setattr(merge_module._TensorJob, "merge_in_blocks", spy)
    return names


@pytest.fixture
def family(tmp_path):
    from conftest import tiny_model

    base = tiny_model("llama")
    paths = {"base": save(base, tmp_path / "base")}
    for i in (1, 2, 3):
        ft = finetune_of(base, seed=i)
        if i == 3:  # quantised deltas: ties at the cut-off
            with torch.no_grad():
                for p, b in zip(ft.parameters(), base.parameters()):
                    p.copy_(b + ((p - b) * 40).round() / 40)
        paths[f"ft{i}"] = save(ft, tmp_path / f"ft{i}")
    return paths


RECIPES = [
    {"merge_method": "ties"},
    {"merge_method": "ties", "dtype": "bfloat16", "out_dtype": "float32"},
    {"merge_method": "task_arithmetic"},
    {"merge_method": "breadcrumbs_ties", "parameters": {"gamma": 0.05}},
    {"merge_method": "ties", "sparsify": {"score": "magnitude", "group": "row"}},
    {"merge_method": "dare_ties"},  # stays on the whole-tensor path
]


@pytest.mark.parametrize("extra", RECIPES, ids=lambda r: r["merge_method"] + "-" + "-".join(
    sorted(k for k in r if k != "merge_method")))
def test_whole_merges_are_bit_identical_on_the_lean_path(family, tmp_path, monkeypatch, extra):
    recipe = {"base_model": str(family["base"]),
              "models": [{"model": str(family[f"ft{i}"]), "parameters": {"weight": w, "density": d}}
                         for i, w, d in ((1, 0.5, 0.3), (2, 0.3, 0.5), (3, 0.4, 0.2))], **extra}
    if extra["merge_method"] == "task_arithmetic":
        for entry in recipe["models"]:
            del entry["parameters"]["density"]
    whole = run_recipe(recipe, tmp_path / "whole")
    with monkeypatch.context() as m:
        m.setattr(selection, "LEAN_MIN_NUMEL", 64)  # the matrices, not the norms; rows stay on kthvalue
        m.setattr(selection, "SELECT_CHUNK", 500)
        m.setattr(chunked, "BLOCK", 1000)
        m.setattr(methods, "COMBINE_CHUNK", 300)
        blocked = count_block_merges(m)
        leaned = run_recipe(recipe, tmp_path / "lean")
    large = [n for n, t in tensors(family["base"]).items() if t.numel() >= 64]
    assert sorted(blocked) == ([] if extra["merge_method"] == "dare_ties" else sorted(large))
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "lean")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    assert whole["per_tensor"] == leaned["per_tensor"]
    assert whole["fallbacks"] == leaned["fallbacks"]


def test_lora_and_wanda_merge_on_the_lean_path(family, tmp_path, monkeypatch, text_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family["base"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "lora")
    recipe = {"merge_method": "ties", "base_model": str(family["base"]),
              "sparsify": {"score": "wanda"}, "calibration": {"data": str(text_file), "nsamples": 2, "seqlen": 16},
              "models": [{"model": str(tmp_path / "lora"), "parameters": {"weight": 0.6, "density": 0.4}},
                         {"model": str(family["ft1"]), "parameters": {"weight": 0.4, "density": 0.3}}]}
    whole = run_recipe(recipe, tmp_path / "whole")
    with monkeypatch.context() as m:
        m.setattr(selection, "LEAN_MIN_NUMEL", 64)
        m.setattr(chunked, "BLOCK", 1000)
        blocked = count_block_merges(m)
        leaned = run_recipe(recipe, tmp_path / "lean")
    assert "model.layers.0.self_attn.q_proj.weight" in blocked  # a LoRA-adapted matrix with Wanda scores
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "lean")
    assert all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    assert whole["per_tensor"] == leaned["per_tensor"]
