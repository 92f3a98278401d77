"""AIM's post-pass by hand and end to end against brute-force activations of the base."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, linear_inputs, saved_family, tensors
from wandamerge.jobs.merge import merge
from wandamerge.merging.aim import aim_factors, aim_relax
from wandamerge.recipe import RecipeError, parse_recipe


def test_aim_by_hand():
    # channel activity 4, 1, 0, 2: I = 1, 0.25, 0, 0.5; omega 0.4 keeps 0.4, 0.85, 1, 0.7 of the update
    factors = aim_factors(torch.tensor([4.0, 1.0, 0.0, 2.0]), 0.4)
    torch.testing.assert_close(factors, torch.tensor([0.4, 0.85, 1.0, 0.7]))
    base, merged = torch.zeros(2, 4), torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 2.0, 4.0]])
    torch.testing.assert_close(aim_relax(base + 1, merged + 1, torch.tensor([4.0, 1.0, 0.0, 2.0]), 0.4),
                               1 + merged * factors)
    assert torch.equal(aim_factors(torch.zeros(3), 0.4), torch.ones(3))  # nothing active: nothing shrunk


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_aim_shrinks_each_linear_maps_update_by_the_bases_mean_abs_activation(arch, tmp_path):
    paths = saved_family(tmp_path, arch)
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.save(windows, tmp_path / "calib.pt")
    record = merge(parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(paths[0]), "aim": {"omega": 0.3},
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths[1:]],
        "calibration": {"data": str(tmp_path / "calib.pt"), "nsamples": 4, "seqlen": 16}}), tmp_path / "out",
        progress=False)
    activity = {name: x.abs().sum(0) for name, x in linear_inputs(paths[0], windows).items()}
    base, fts, got = tensors(paths[0]), [tensors(p) for p in paths[1:]], tensors(tmp_path / "out")
    assert activity
    for name, tensor in base.items():
        update = 0.5 * sum(ft[name] - tensor for ft in fts)
        if name in activity:
            a = activity[name]
            factors = (1 - a / a.max() * 0.7).float()
            want = tensor + (update.T * factors).T if arch == "gpt2" else tensor + update * factors
            assert record["per_tensor"][name]["aim"]
        else:
            want = tensor + update
            assert "aim" not in record["per_tensor"][name]
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_aim_needs_a_base_model():
    with pytest.raises(RecipeError, match="aim"):
        parse_recipe({"merge_method": "linear", "aim": {"omega": 0.4},
                      "models": [{"model": "a", "parameters": {"weight": 1.0}}]})
