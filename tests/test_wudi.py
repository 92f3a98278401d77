"""WUDI against the official objective run through autograd, and its minimiser."""

from __future__ import annotations

import pytest
import torch

from wandamerge.merging.wudi import wudi_combine


def official_loop(taus: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """The paper's loop: autograd on sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2, Adam from the sum."""
    merged = torch.stack(taus).sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(((merged - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus)
        loss.backward()
        optimizer.step()
    return merged.detach()


def task_vectors(seed: int, n: int = 3, out: int = 6, width: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(out, width, generator=gen) * 0.01 * (i + 1) for i in range(n)]


def test_wudi_takes_the_official_loops_steps():
    taus = task_vectors(0)
    got = wudi_combine(torch.stack(taus), torch.ones(3), steps=50, lr=1e-3)
    want = official_loop(taus, steps=50, lr=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, torch.stack(taus).sum(0), atol=1e-3)  # it moved


def test_wudi_run_long_reaches_the_minimiser_of_its_quadratic():
    taus = task_vectors(1, n=4, out=3, width=6)  # rank 3 each, four tasks: H is invertible
    hessian = sum(t.T @ t / t.pow(2).sum() for t in taus)
    target = sum(t @ t.T @ t / t.pow(2).sum() for t in taus)
    minimiser = target @ torch.linalg.inv(hessian)
    got = wudi_combine(torch.stack(taus).double(), torch.ones(4), steps=4000, lr=2e-3)
    torch.testing.assert_close(got.float(), minimiser, rtol=0, atol=2e-4)


def test_one_task_vector_is_its_own_merge_and_zeros_are_ignored():
    tau = task_vectors(2, n=1)[0]
    torch.testing.assert_close(wudi_combine(tau[None], torch.ones(1), steps=100, lr=1e-3), tau)
    stacked = torch.stack([tau, torch.zeros_like(tau)])
    torch.testing.assert_close(wudi_combine(stacked, torch.ones(2), steps=100, lr=1e-3), tau)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wudi_merges_each_linear_map_as_out_by_in_and_sums_the_rest(arch, tmp_path):
    """End to end: every block linear (GPT-2's Conv1D turned to (out, in) and back) is WUDI of its task
    vectors; every other tensor is their sum (task arithmetic), and the record says which."""
    from conftest import saved_family, tensors
    from wandamerge.jobs.merge import merge
    from wandamerge.recipe import parse_recipe

    paths = saved_family(tmp_path, arch)
    record = merge(parse_recipe({"merge_method": "wudi", "base_model": str(paths[0]), "parameters": {"lambda": 0.8},
                                 "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]]}),
                   tmp_path / "out", progress=False)
    base, fts, got = tensors(paths[0]), [tensors(p) for p in paths[1:]], tensors(tmp_path / "out")
    prefix = "transformer.h." if arch == "gpt2" else "model.layers."
    linears = [n for n, t in base.items() if n.startswith(prefix) and n.endswith(".weight") and t.ndim == 2]
    assert linears
    for name, tensor in base.items():
        taus = torch.stack([ft[name] - tensor for ft in fts])
        if name in linears:
            stored_in_out = arch == "gpt2"
            merged = wudi_combine(taus.transpose(1, 2) if stored_in_out else taus, torch.ones(2))
            want = tensor + 0.8 * (merged.T if stored_in_out else merged)
            assert name not in record["fallbacks"]
        else:
            want = tensor + 0.8 * taus.sum(0)
            assert "merged by task_arithmetic" in record["fallbacks"][name]
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


def activation_loop(taus: list[torch.Tensor], inputs: list[torch.Tensor], share: float, steps: int, lr: float
                    ) -> torch.Tensor:
    """wudi_activation's loss written from the raw inputs X_i (tokens x in), through autograd:
    sum_i (1 - s) ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2 + s ||(tau - tau_i) X_i^T||^2 / ||X_i||^2."""
    merged = torch.stack(taus).sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum((1 - share) * ((merged - t) @ t.T).pow(2).sum() / t.pow(2).sum()
                   + share * ((merged - t) @ x.T).pow(2).sum() / x.pow(2).sum() for t, x in zip(taus, inputs))
        loss.backward()
        optimizer.step()
    return merged.detach()


@pytest.mark.parametrize("share", [0.0, 0.4, 1.0])
def test_wudi_activation_takes_the_loop_of_its_loss_on_the_raw_inputs(share):
    from wandamerge.merging.wudi import wudi_activation_combine

    taus = task_vectors(3)
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(20, 5, generator=gen) * (i + 1) for i in range(3)]
    grams = [x.T @ x / x.shape[0] for x in inputs]  # the mean of x x^T, as the calibration pass gives
    got = wudi_activation_combine(torch.stack(taus), torch.ones(3), grams, gram_share=share, steps=50, lr=1e-3)
    torch.testing.assert_close(got, activation_loop(taus, inputs, share, 50, 1e-3), rtol=1e-4, atol=1e-6)
    if share == 0.0:  # WUDI itself
        torch.testing.assert_close(got, wudi_combine(torch.stack(taus), torch.ones(3), steps=50, lr=1e-3))


def test_wudi_activation_reads_its_grams_one_at_a_time_from_a_sequence_that_loads_them():
    from conftest import LoadedWhenIndexed
    from wandamerge.merging.wudi import wudi_activation_combine

    taus = task_vectors(5)
    gen = torch.Generator().manual_seed(6)
    grams = [x.T @ x / x.shape[0] for x in (torch.randn(20, 5, generator=gen) for _ in range(3))]
    loading = LoadedWhenIndexed(grams)
    got = wudi_activation_combine(torch.stack(taus), torch.ones(3), loading, gram_share=0.5, steps=20, lr=1e-3)
    assert loading.most_alive == 1
    assert torch.equal(got, wudi_activation_combine(torch.stack(taus), torch.ones(3), grams, gram_share=0.5,
                                                    steps=20, lr=1e-3))


def test_wudi_activation_refuses_what_it_cannot_merge():
    from wandamerge.errors import ConfigError
    from wandamerge.merging.methods import merge_tensor
    from wandamerge.merging.wudi import wudi_activation_combine

    taus = torch.stack(task_vectors(5))
    with pytest.raises(ConfigError, match="gram_share"):
        wudi_activation_combine(taus, torch.ones(3), [torch.eye(5)] * 3, gram_share=1.5)
    with pytest.raises(ConfigError, match=r"\(5, 5\) input Gram"):
        wudi_activation_combine(taus, torch.ones(3), [torch.eye(4)] * 3)
    with pytest.raises(ConfigError, match="takes no alpha"):
        merge_tensor("wudi_activation", torch.zeros(6, 5), list(taus), 1.0, input_grams=[torch.eye(5)] * 3, alpha=0.5)


def test_wudi_activation_end_to_end_uses_each_models_own_grams(tmp_path):
    """Through a recipe with each model's own calibration: every block linear is wudi_activation of the
    Grams that hooks on the base see on that model's windows; every other tensor the sum of the task vectors."""
    from conftest import linear_inputs, own_calibration_windows, saved_family, tensors
    from wandamerge.jobs.merge import merge
    from wandamerge.merging.methods import merge_tensor
    from wandamerge.recipe import parse_recipe

    paths = saved_family(tmp_path)
    windows = own_calibration_windows(tmp_path, 2, seed=6)
    recipe = {"merge_method": "wudi_activation", "base_model": str(paths[0]),
              "parameters": {"gram_share": 0.5, "lambda": 0.7},
              "models": [{"model": str(p), "parameters": {"weight": 1.0},
                          "calibration": {"data": str(tmp_path / f"calib{i}.pt"), "nsamples": 3, "seqlen": 12}}
                         for i, p in enumerate(paths[1:])]}
    record = merge(parse_recipe(recipe), tmp_path / "out", progress=False)
    grams = [{name: (x.T @ x / x.shape[0]).float() for name, x in linear_inputs(paths[0], w).items()}
             for w in windows]
    base, fts, got = tensors(paths[0]), [tensors(p) for p in paths[1:]], tensors(tmp_path / "out")
    assert grams[0]
    for name, tensor in base.items():
        if name in grams[0]:
            want = merge_tensor("wudi_activation", tensor, [ft[name] for ft in fts], 1.0, lambda_=0.7,
                                input_grams=[g[name] for g in grams], gram_share=0.5)
            assert name not in record["fallbacks"]
        else:
            want = tensor + 0.7 * sum(ft[name] - tensor for ft in fts)
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)
