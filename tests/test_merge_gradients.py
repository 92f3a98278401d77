"""Gradient parameters (mergekit's per-layer interpolation, ``t`` = layer / (layers - 1)) on a 4-block model.

The conftest models have 2 blocks, where ``t`` is only 0 or 1; here every
gradient is sampled at t = 0, 1/3, 2/3 and 1. Global ``lambda`` must be read at
each tensor's own ``t`` (as mergekit does), like per-model ``weight`` and
``density``; tensors outside the decoder blocks (embeddings, final norm, LM
head) take t = 0, as in mergekit's plan (pre/post weights are planned at t=0).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from wandamerge.cli import main

from conftest import finetune_of, save, tensors, tiny_model

NUM_LAYERS = 4
ATOL = 1e-6
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# --- small local helpers ----------------------------------------------------------------------------

def tiny_llama(seed: int = 0):
    """A llama of NUM_LAYERS blocks, so that t takes interior values."""
    return tiny_model("llama", seed, num_layers=NUM_LAYERS)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def t_of(name: str) -> float:
    """mergekit's t: layer index / (layers - 1) in the blocks, 0 outside them."""
    match = LAYER.match(name)
    return int(match.group(1)) / (NUM_LAYERS - 1) if match else 0.0


def run_ours(recipe_path: Path, out: Path) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, ["-q", "merge", str(recipe_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return tensors(out)


def run_mergekit(recipe_path: Path, out: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5 through its own command line (the module behind ``mergekit-yaml``)."""
    pytest.importorskip("mergekit")
    done = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(recipe_path), str(out),
                           "--no-copy-tokenizer", "--no-lazy-unpickle", "--quiet"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return tensors(out)


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    """Every tensor within ATOL; on failure, list every differing tensor with its t and max difference."""
    assert ours.keys() == theirs.keys()
    bad = {name: (t_of(name), (ours[name] - theirs[name]).abs().max().item()) for name in ours}
    bad = {name: v for name, v in bad.items() if v[1] > ATOL}
    assert not bad, "tensors differ (name: t, max |diff|):\n" + "\n".join(
        f"  {name}: t={t:.3f} {diff:.3g}" for name, (t, diff) in sorted(bad.items()))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradient-family")
    base = tiny_llama()
    paths = {"base": save(base, root / "base")}
    for i in (1, 2, 3):
        paths[f"ft{i}"] = save(finetune_of(base, seed=i), root / f"ft{i}")
    return paths


def recipe_of(family, method: str, per_model: list[dict], global_params: dict | None = None) -> dict:
    recipe = {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32",
              "models": [{"model": str(family[f"ft{i + 1}"]), "parameters": p} for i, p in enumerate(per_model)]}
    if global_params:
        recipe["parameters"] = global_params
    return recipe


def test_the_model_has_enough_blocks_for_interior_t(family):
    names = tensors(family["base"]).keys()
    assert {t_of(n) for n in names} == {0.0, 1 / 3, 2 / 3, 1.0}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)


# --- 1. against mergekit ----------------------------------------------------------------------------

@pytest.mark.parametrize("method, per_model", [
    ("ties", [{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.2, "density": 0.4}]),
    ("task_arithmetic", [{"weight": 0.6}, {"weight": 0.3}, {"weight": 0.2}]),
])
def test_gradient_lambda_same_tensors_as_mergekit(family, tmp_path, method, per_model):
    path = write_recipe(tmp_path / "r.yaml", recipe_of(family, method, per_model, {"lambda": [0.5, 1.5]}))
    assert_same_tensors(run_ours(path, tmp_path / "ours"), run_mergekit(path, tmp_path / "mergekit"))


@pytest.mark.parametrize("method, per_model", [
    ("ties", [{"weight": [0.2, 0.8], "density": [0.3, 0.9]},
              {"weight": [0.7, 0.1], "density": [0.8, 0.2]},
              {"weight": 0.4, "density": [0.5, 0.6, 0.4]}]),
    ("task_arithmetic", [{"weight": [0.2, 0.8]}, {"weight": [0.7, 0.1, 0.5]}, {"weight": 0.4}]),
])
def test_gradient_weight_and_density_same_tensors_as_mergekit(family, tmp_path, method, per_model):
    """Per-model parameters, resolved at each tensor's t: no global lambda (passes on the current code)."""
    path = write_recipe(tmp_path / "r.yaml", recipe_of(family, method, per_model))
    assert_same_tensors(run_ours(path, tmp_path / "ours"), run_mergekit(path, tmp_path / "mergekit"))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_gradient_weight_density_and_lambda_together_same_tensors_as_mergekit(family, tmp_path, method):
    per_model = [{"weight": [0.2, 0.8], "density": [0.3, 0.9]},
                 {"weight": [0.7, 0.1], "density": [0.8, 0.2]}]
    if method == "task_arithmetic":  # a density without a sparsifier does nothing there; keep the recipe plain
        per_model = [{"weight": p["weight"]} for p in per_model]
    path = write_recipe(tmp_path / "r.yaml", recipe_of(family, method, per_model, {"lambda": [0.5, 1.5, 1.0]}))
    assert_same_tensors(run_ours(path, tmp_path / "ours"), run_mergekit(path, tmp_path / "mergekit"))


# --- 2. by hand ------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["ours", "mergekit"])
def test_lambda_gradient_by_hand(family, tmp_path, engine):
    """task_arithmetic, one fine-tune, weight 1, lambda [0, 1]: layer i gets base + i/(L-1) * (ft - base);
    the embeddings, final norm and LM head get t = 0, i.e. the base. Run against mergekit too, so the
    expectation itself is mergekit's behaviour, not a guess."""
    path = write_recipe(tmp_path / "r.yaml", recipe_of(family, "task_arithmetic", [{"weight": 1.0}],
                                                       {"lambda": [0.0, 1.0]}))
    got = (run_ours if engine == "ours" else run_mergekit)(path, tmp_path / engine)
    base, ft = tensors(family["base"]), tensors(family["ft1"])
    assert got.keys() == base.keys()
    wrong = []
    for name in base:
        match = LAYER.match(name)
        t = int(match.group(1)) / (NUM_LAYERS - 1) if match else 0.0
        want = base[name] + t * (ft[name] - base[name])
        if not torch.allclose(got[name], want, rtol=0, atol=ATOL):
            wrong.append(f"{name} (t={t:.3f}, max |diff| {(got[name] - want).abs().max().item():.3g})")
    assert not wrong, "not base + t * (ft - base):\n  " + "\n  ".join(wrong)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], base[name], rtol=0, atol=ATOL, msg=name)
    last = f"model.layers.{NUM_LAYERS - 1}.mlp.down_proj.weight"  # t = 1: the fine-tune itself
    torch.testing.assert_close(got[last], ft[last], rtol=0, atol=ATOL)
