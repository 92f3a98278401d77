"""RegMean against a least-squares brute force and hand-worked special cases."""

from __future__ import annotations

import pytest
import torch

from wandamerge.errors import ConfigError
from wandamerge.merging.regmean import reduce_off_diagonal, regmean_combine


def task_data(seed: int, n: int = 3, out: int = 5, width: int = 4):
    gen = torch.Generator().manual_seed(seed)
    taus = [torch.randn(out, width, generator=gen, dtype=torch.float64) for _ in range(n)]
    inputs = [torch.randn(10 + 7 * i, width, generator=gen, dtype=torch.float64) * torch.rand(width, generator=gen,
                                                                                              dtype=torch.float64)
              for i in range(n)]
    return taus, inputs


def test_regmean_is_the_least_squares_merge_of_the_tasks_outputs():
    """alpha 1, no ridge: W minimises sum_i w_i / N_i ||X_i W^T - X_i W_i^T||^2 (lstsq on stacked rows)."""
    taus, inputs = task_data(0)
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    grams = [x.T @ x / x.shape[0] for x in inputs]
    weighted = torch.stack([w * t for w, t in zip(weights, taus)])
    got = regmean_combine(weighted, weights, grams, alpha=1.0, ridge=0.0)
    scale = [torch.sqrt(w / x.shape[0]) for w, x in zip(weights, inputs)]
    design = torch.cat([s * x for s, x in zip(scale, inputs)])
    target = torch.cat([s * x @ t.T for s, x, t in zip(scale, inputs, taus)])
    want = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_the_base_drops_out_so_task_vectors_give_the_full_weight_merge():
    taus, inputs = task_data(1)
    base = torch.randn(taus[0].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    weights = torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64)
    grams = [x.T @ x / x.shape[0] for x in inputs]
    on_weights = regmean_combine(torch.stack([w * (base + t) for w, t in zip(weights, taus)]), weights, grams,
                                 alpha=0.6, ridge=0.0)
    on_deltas = regmean_combine(torch.stack([w * t for w, t in zip(weights, taus)]), weights, grams, alpha=0.6,
                                ridge=0.0)
    torch.testing.assert_close(on_weights, base + on_deltas, rtol=1e-9, atol=1e-9)


def test_identical_grams_give_the_weighted_mean_and_alpha_zero_a_per_column_mean():
    taus, inputs = task_data(2)
    weights = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    weighted = torch.stack([w * t for w, t in zip(weights, taus)])
    same = inputs[0].T @ inputs[0]
    torch.testing.assert_close(regmean_combine(weighted, weights, [same] * 3, ridge=0.0),
                               weighted.sum(0) / weights.sum())
    grams = [x.T @ x for x in inputs]
    diag = torch.stack([g.diagonal() for g in grams])  # (n, in)
    by_hand = (weighted * diag[:, None, :]).sum(0) / (weights[:, None] * diag).sum(0)
    torch.testing.assert_close(regmean_combine(weighted, weights, grams, alpha=0.0, ridge=0.0), by_hand)


def test_a_channel_no_task_reaches_gets_the_weighted_mean_through_the_ridge():
    taus, inputs = task_data(3)
    for x in inputs:
        x[:, 2] = 0
    weights = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    weighted = torch.stack([w * t for w, t in zip(weights, taus)])
    got = regmean_combine(weighted, weights, [x.T @ x for x in inputs], alpha=0.9, ridge=1e-6)
    torch.testing.assert_close(got[:, 2], weighted.sum(0)[:, 2] / 4)
    assert torch.isfinite(got).all()


def test_reduce_off_diagonal_by_hand():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(reduce_off_diagonal(gram, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]]))
    assert torch.equal(gram, torch.tensor([[4.0, 2.0], [2.0, 9.0]]))  # input untouched


def test_regmean_refuses_what_it_cannot_merge():
    taus, inputs = task_data(4)
    weighted, grams = torch.stack(taus), [x.T @ x for x in inputs]
    with pytest.raises(ConfigError, match="positive"):
        regmean_combine(weighted, torch.tensor([1.0, 0.0, 1.0]), grams)
    with pytest.raises(ConfigError, match="input Gram"):
        regmean_combine(weighted, torch.ones(3), grams[:2])
    with pytest.raises(ConfigError, match="alpha"):
        regmean_combine(weighted, torch.ones(3), grams, alpha=1.5)


def test_merge_tensor_regmean_scales_by_lambda_and_falls_back_without_grams():
    from wandamerge.merging.methods import merge_tensor, merge_tensor_detailed

    taus, inputs = task_data(5)
    base = torch.randn(taus[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    finetuned = [base + t for t in taus]
    grams = [x.T @ x / x.shape[0] for x in inputs]
    weights = [1.0, 2.0, 0.5]
    w = torch.tensor(weights, dtype=torch.float64)
    solved = regmean_combine(torch.stack([wi * t for wi, t in zip(w, taus)]), w, grams, alpha=0.5, ridge=0.0)
    got = merge_tensor("regmean", base, finetuned, weights, input_grams=grams, alpha=0.5, ridge=0.0, lambda_=0.7)
    torch.testing.assert_close(got, base + 0.7 * solved)
    alone = merge_tensor_detailed("regmean", base, finetuned, weights)  # no Grams: the weighted mean
    assert "needs each fine-tune's input Gram" in alone.fallback_reason and alone.method == "task_arithmetic"
    torch.testing.assert_close(alone.tensor, base + sum(wi * t for wi, t in zip(weights, taus)) / sum(weights))
    vector = merge_tensor_detailed("regmean", base[0], [f[0] for f in finetuned], weights, input_grams=grams)
    assert "is not one: merged by task_arithmetic" in vector.fallback_reason
    with pytest.raises(ConfigError, match="takes no alpha"):
        merge_tensor("ties", base, finetuned, weights, 0.5, alpha=0.5)
    with pytest.raises(ConfigError, match="alpha in"):
        merge_tensor("regmean", base, finetuned, weights, input_grams=grams, alpha=2.0)


def test_gram_rescale_is_the_least_squares_scale_of_the_kept_entries():
    """c minimises ||X (c M o delta - delta)^T||^2 (a one-column lstsq); a diagonal Gram gives 1."""
    from wandamerge.merging.sparsify import mask_and_rescale

    taus, inputs = task_data(6)
    delta, x = taus[0].abs(), inputs[0][:, :1] + 0.1 * inputs[0]  # correlated inputs, same-sign entries
    keep = torch.rand(delta.shape, generator=torch.Generator().manual_seed(2)) < 0.4
    got = mask_and_rescale(delta, keep, 0.4, "gram", x.T @ x / x.shape[0])
    masked = delta * keep
    c = torch.linalg.lstsq((x @ masked.T).reshape(-1, 1), (x @ delta.T).reshape(-1, 1)).solution.item()
    torch.testing.assert_close(got, c * masked)
    assert abs(c - 1) > 0.05  # a real rescale here
    diagonal = torch.diag(torch.rand(delta.shape[1], dtype=torch.float64) + 0.1)
    torch.testing.assert_close(mask_and_rescale(delta, keep, 0.4, "gram", diagonal), masked)
    assert torch.equal(mask_and_rescale(delta, keep, 0.4, "none"), masked)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "random"])
def test_every_sparsifier_takes_the_gram_rescale_through_the_merge(score):
    from wandamerge.merging.methods import merge_tensor
    from wandamerge.merging.sparsify import gram_scale

    taus, inputs = task_data(7)
    base = torch.zeros(taus[0].shape, dtype=torch.float64)
    grams = [x.T @ x / x.shape[0] for x in inputs]
    norms = [torch.diagonal(g) for g in grams]
    options = {"input_sq_norms": norms} if score == "wanda" else {}

    def merged(rescale, seed=3):
        return merge_tensor("task_arithmetic", base, taus, 1.0, 0.5, score=score, rescale=rescale,
                            input_grams=grams, generator=torch.Generator().manual_seed(seed), **options)

    plain, gen = merged(False), torch.Generator().manual_seed(3)
    kept = [merge_tensor("task_arithmetic", base, [t], 1.0, 0.5, score=score, rescale=False, generator=gen,
                         **({"input_sq_norms": [n]} if score == "wanda" else {})) for t, n in zip(taus, norms)]
    torch.testing.assert_close(plain, sum(kept))
    want = sum(k * gram_scale(t, k, g) for k, t, g in zip(kept, taus, grams))
    torch.testing.assert_close(merged("gram"), want)


def regmean_plus_by_whole_models(paths, windows, weights, alpha, ridge) -> dict:
    """Independent reference: for each layer l and task t, a whole model made of the merged layers before l
    and fine-tune t's layer l runs task t's windows; hooks give the Grams of layer l's maps; layer l is
    merged (RegMean for its maps, the weighted mean of the task vectors for the rest) into the merged model."""
    import copy

    from transformers import AutoModelForCausalLM

    from wandamerge.merging.methods import merge_tensor

    base = AutoModelForCausalLM.from_pretrained(paths[0]).eval()
    fts = [AutoModelForCausalLM.from_pretrained(p).eval() for p in paths[1:]]
    merged = copy.deepcopy(base)
    layers = lambda m: m.model.layers  # noqa: E731
    for index in range(len(layers(base))):
        grams = []
        for ft, w in zip(fts, windows):
            probe = copy.deepcopy(merged)
            layers(probe)[index].load_state_dict(layers(ft)[index].state_dict())
            seen, handles = {}, []
            for name, module in layers(probe)[index].named_modules():
                if isinstance(module, torch.nn.Linear):
                    def hook(mod, args, name=name):
                        x = args[0].reshape(-1, args[0].shape[-1]).double()
                        seen[name + ".weight"] = (x.T @ x / x.shape[0]).float()
                    handles.append(module.register_forward_pre_hook(hook))
            with torch.no_grad():
                probe(input_ids=w)
            for h in handles:
                h.remove()
            grams.append(seen)
        state = {}
        for key, value in layers(base)[index].state_dict().items():
            finetuned = [layers(ft)[index].state_dict()[key] for ft in fts]
            if key in grams[0]:
                state[key] = merge_tensor("regmean", value, finetuned, weights, input_grams=[g[key] for g in grams],
                                          alpha=alpha, ridge=ridge)
            else:
                state[key] = value + sum(wt * (f - value) for wt, f in zip(weights, finetuned)) / sum(weights)
        layers(merged)[index].load_state_dict(state)
    return {f"model.layers.{i}.{k}": v for i, layer in enumerate(layers(merged)) for k, v in layer.state_dict().items()}


def test_regmean_plus_equals_a_whole_model_reference_and_differs_from_regmean(tmp_path):
    from conftest import own_calibration_windows, saved_family, tensors
    from wandamerge.jobs.merge import merge
    from wandamerge.recipe import parse_recipe

    paths = saved_family(tmp_path, finetunes=3)
    windows = own_calibration_windows(tmp_path, 3, seed=2)

    def run(method, lam, low_memory=False):
        merge(parse_recipe({"merge_method": method, "base_model": str(paths[0]),
                            "parameters": {"alpha": 0.8, "lambda": lam},
                            "models": [{"model": str(p), "parameters": {"weight": w},
                                        "calibration": {"data": str(tmp_path / f"calib{i}.pt"), "nsamples": 3,
                                                        "seqlen": 12}}
                                       for i, (p, w) in enumerate(zip(paths[1:], [1.0, 0.5, 2.0]))]}),
              tmp_path / f"{method}-{lam}-{low_memory}", progress=False, low_memory=low_memory)
        return tensors(tmp_path / f"{method}-{lam}-{low_memory}")

    want = regmean_plus_by_whole_models(paths, windows, [1.0, 0.5, 2.0], alpha=0.8, ridge=1e-4)
    got, scaled, plain, base = run("regmean_plus", 1.0), run("regmean_plus", 1.5), run("regmean", 1.0), \
        tensors(paths[0])
    streamed = run("regmean_plus", 1.0, low_memory=True)  # blocks read one at a time from the shards
    assert all(torch.equal(streamed[name], got[name]) for name in got)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(scaled[name], base[name] + 1.5 * (value - base[name]), rtol=1e-4, atol=1e-5)
    # RegMean's Grams come from the base on its own inputs, RegMean++'s from each fine-tune's block on the
    # merged blocks' outputs: not the same merge
    later = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(got[later], plain[later], atol=1e-5)


@pytest.mark.parametrize("definite", [True, False])
def test_the_in_place_solve_equals_a_general_solve(definite):
    """The Cholesky solve that overwrites its inputs, and its fallback for a matrix that is not positive
    definite (which the failed factorisation has partly overwritten), against numpy's general solve."""
    import numpy as np

    from wandamerge.merging.regmean import _solve_symmetric_in_place

    g = torch.Generator().manual_seed(9)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    total = a @ a.T + torch.eye(40, dtype=torch.float64) if definite else a + a.T  # indefinite: both signs
    target = torch.randn(7, 40, generator=g, dtype=torch.float64)
    want = np.linalg.solve(total.numpy(), target.numpy().T).T
    got = _solve_symmetric_in_place(total.clone(), target.clone())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_regmean_reads_its_grams_one_at_a_time_from_a_sequence_that_loads_them():
    """A sequence that makes each Gram only when indexed (as the merge job's, from files): at most one is
    alive at a time, and the merge is the one from the list of the same Grams."""
    from conftest import LoadedWhenIndexed

    taus, inputs = task_data(3, n=4, out=700, width=600)  # over one block of rows and of columns
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    grams = [x.T @ x / x.shape[0] for x in inputs]
    loading = LoadedWhenIndexed(grams)
    weighted = torch.stack([w * t for w, t in zip(weights, taus)])
    got = regmean_combine(weighted, weights, loading, alpha=0.7, ridge=1e-3)
    assert loading.most_alive == 1
    assert torch.equal(got, regmean_combine(weighted, weights, grams, alpha=0.7, ridge=1e-3))
