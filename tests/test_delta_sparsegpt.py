"""score: sparsegpt on task vectors: SparseGPT's sweep against each task's Gram, as the pruning solver."""

from __future__ import annotations

import torch

from conftest import linear_inputs, own_calibration_windows, saved_family, tensors
from wandamerge.core.sparsegpt import sparsegpt_prune
from wandamerge.jobs.merge import merge
from wandamerge.merging.methods import merge_tensor, merge_tensor_detailed
from wandamerge.recipe import parse_recipe


def correlated(seed: int, tokens: int = 64, width: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, 4, generator=gen)
    return z @ torch.randn(4, width, generator=gen) + 0.1 * torch.randn(tokens, width, generator=gen)


def test_sparsegpt_deltas_keep_the_outputs_better_than_a_mask_of_the_same_density():
    gen = torch.Generator().manual_seed(1)
    base, delta = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen) * 0.1
    x = correlated(2)
    gram = x.T @ x / x.shape[0]
    got = merge_tensor("task_arithmetic", base, [base + delta], 1.0, 0.25, score="sparsegpt", input_grams=[gram])
    torch.testing.assert_close(got, base + sparsegpt_prune(delta, gram, sparsity=0.75)[0], rtol=0, atol=1e-6)
    assert int(((got - base) != 0).sum()) == 8 * 16 // 4
    wanda = merge_tensor("task_arithmetic", base, [base + delta], 1.0, 0.25, score="wanda",
                         input_sq_norms=[torch.diagonal(gram) * x.shape[0]])

    def output_error(merged):
        return float(((merged - base - delta) @ x.T).norm())

    assert output_error(got) < 0.7 * output_error(wanda)


def test_without_a_gram_sparsegpt_falls_back_to_magnitude_and_says_so():
    base, ft = torch.zeros(4, 6), torch.arange(24.0).reshape(4, 6)
    result = merge_tensor_detailed("ties", base, [ft], 1.0, 0.5, score="sparsegpt")
    assert result.sparsifier == "magnitude" and "input Gram" in result.fallback_reason


def test_sparsegpt_deltas_end_to_end_with_each_task_gram(tmp_path):
    paths = saved_family(tmp_path)
    windows = own_calibration_windows(tmp_path, 2, seed=8)
    record = merge(parse_recipe({
        "merge_method": "ties", "base_model": str(paths[0]), "sparsify": {"score": "sparsegpt"},
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5},
                    "calibration": {"data": str(tmp_path / f"calib{i}.pt"), "nsamples": 3, "seqlen": 12}}
                   for i, p in enumerate(paths[1:])]}), tmp_path / "out", progress=False)
    grams = [{n: (x.T @ x / x.shape[0]).float() for n, x in linear_inputs(paths[0], w).items()} for w in windows]
    base, fts, got = tensors(paths[0]), [tensors(p) for p in paths[1:]], tensors(tmp_path / "out")
    for name in grams[0]:
        want = merge_tensor("ties", base[name], [ft[name] for ft in fts], 1.0, 0.5, score="sparsegpt",
                            input_grams=[g[name] for g in grams])
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)
        assert record["per_tensor"][name]["sparsifier"] == "sparsegpt"
