"""TIES' sign election weighted by each task's own input activity: by hand and end to end."""

from __future__ import annotations

import pytest
import torch

from conftest import linear_inputs, own_calibration_windows, saved_family, tensors
from wandamerge.jobs.merge import merge
from wandamerge.merging.methods import merge_tensor, merge_tensor_detailed
from wandamerge.recipe import RecipeError, parse_recipe


def test_activation_election_by_hand():
    # one row, two columns; task 0: +1, +1; task 1: -3, -3. Summed mass elects - everywhere; with task 0's
    # inputs 16x as active on column 0 (||X|| 4 against 1), column 0 elects +.
    base = torch.zeros(1, 2)
    finetuned = [torch.tensor([[1.0, 1.0]]), torch.tensor([[-3.0, -3.0]])]
    norms = [torch.tensor([16.0, 1.0]), torch.tensor([1.0, 1.0])]
    plain = merge_tensor("ties", base, finetuned, [1.0, 1.0], 1.0, input_sq_norms=norms, score="wanda")
    assert plain.tolist() == [[-3.0, -3.0]]
    voted = merge_tensor("ties", base, finetuned, [1.0, 1.0], 1.0, input_sq_norms=norms, score="wanda",
                         election="activation")
    assert voted.tolist() == [[1.0, -3.0]]  # votes: column 0: 4 - 3 > 0; column 1: 1 - 3 < 0
    vector = merge_tensor_detailed("ties", base[0], [f[0] for f in finetuned], [1.0, 1.0], 1.0,
                                   election="activation")
    assert "summed mass" in vector.fallback_reason and vector.tensor.tolist() == [-3.0, -3.0]
    with pytest.raises(ValueError, match="TIES-style"):
        merge_tensor("task_arithmetic", base, finetuned, [1.0, 1.0], election="activation")


def test_activation_election_end_to_end_with_each_models_own_data(tmp_path):
    paths = saved_family(tmp_path)
    windows = own_calibration_windows(tmp_path, 2, seed=6)
    merge(parse_recipe({
        "merge_method": "ties", "base_model": str(paths[0]), "parameters": {"election": "activation"},
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5},
                    "calibration": {"data": str(tmp_path / f"calib{i}.pt"), "nsamples": 3, "seqlen": 12}}
                   for i, p in enumerate(paths[1:])]}), tmp_path / "out", progress=False)
    norms = [{n: (x ** 2).sum(0).float() for n, x in linear_inputs(paths[0], w).items()} for w in windows]
    base, fts, got = tensors(paths[0]), [tensors(p) for p in paths[1:]], tensors(tmp_path / "out")
    differs = 0
    for name in norms[0]:
        args = (base[name], [ft[name] for ft in fts], [1.0, 1.0], 0.5)
        want = merge_tensor("ties", *args, input_sq_norms=[n[name] for n in norms], election="activation")
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
        differs += not torch.equal(want, merge_tensor("ties", *args))
    assert differs  # the election changed something


def test_activation_election_is_refused_where_no_sign_is_elected():
    with pytest.raises(RecipeError, match="elects no sign"):
        parse_recipe({"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"election": "activation"},
                      "models": [{"model": "a", "parameters": {"weight": 1.0}}]})
