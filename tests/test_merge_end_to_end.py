"""Merging tiny saved models end to end: exact references, LoRA, Wanda-scored deltas, mergekit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from wandamerge.cli import main
from wandamerge.jobs.merge import merge
from wandamerge.recipe import RecipeError, parse_recipe

from conftest import VOCAB, finetune_of, linear_inputs, mergekit_yaml, save, tensors, tiny_model


@pytest.fixture
def family(tmp_path):
    base = tiny_model("llama")
    paths = {"base": save(base, tmp_path / "base")}
    for i in (1, 2, 3):
        paths[f"ft{i}"] = save(finetune_of(base, seed=i), tmp_path / f"ft{i}")
    return paths


def run_recipe(recipe: dict, out: Path):
    return merge(parse_recipe(recipe), out, progress=False)


def test_one_finetune_at_density_1_and_weight_1_gives_it_back(family, tmp_path):
    for method in ("task_arithmetic", "ties", "dare_ties", "linear"):
        out = tmp_path / method
        run_recipe({"merge_method": method, "base_model": str(family["base"]),
                    "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 1.0}}]}
                   if method != "linear" else
                   {"merge_method": method, "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0}}]},
                   out)
        got, want = tensors(out), tensors(family["ft1"])
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=f"{method} {name}")


def test_task_arithmetic_by_hand_on_real_files(family, tmp_path):
    out = tmp_path / "ta"
    run_recipe({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                "parameters": {"lambda": 0.5},
                "models": [{"model": str(family["ft1"]), "parameters": {"weight": 0.7}},
                           {"model": str(family["ft2"]), "parameters": {"weight": 0.3}}]}, out)
    base, a, b, got = (tensors(family["base"]), tensors(family["ft1"]), tensors(family["ft2"]), tensors(out))
    for name in base:
        want = base[name] + 0.5 * (0.7 * (a[name] - base[name]) + 0.3 * (b[name] - base[name]))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def base_inputs_sq_norms(model_dir: Path, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: (x ** 2).sum(0) for name, x in linear_inputs(model_dir, windows).items()}


def base_input_grams(model_dir: Path, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.T @ x / x.shape[0] for name, x in linear_inputs(model_dir, windows).items()}


@pytest.mark.parametrize("activations", ["base", "finetuned"])
def test_wanda_ties_keeps_the_deltas_a_brute_force_activation_score_keeps(family, tmp_path, activations):
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.save(windows, tmp_path / "calib.pt")
    out = tmp_path / "wanda-ties"
    record = run_recipe({
        "merge_method": "ties", "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.25}}],
        "sparsify": {"score": "wanda", "activations": activations},
        "calibration": {"data": str(tmp_path / "calib.pt"), "nsamples": 4, "seqlen": 16}}, out)
    norms = base_inputs_sq_norms(family["base" if activations == "base" else "ft1"], windows)
    base, ft, got = tensors(family["base"]), tensors(family["ft1"]), tensors(out)
    assert set(norms) == {n for n, s in record["per_tensor"].items() if s["sparsifier"] == "wanda"}
    for name, sq in norms.items():
        delta = (ft[name] - base[name]).double()
        rows, cols = delta.shape
        keep = int(cols * 0.25)
        for i in range(rows):  # brute force, row by row
            scores = [(abs(float(delta[i, j])) * float(sq[j]) ** 0.5, j) for j in range(cols)]
            kept = {j for _, j in sorted(scores, reverse=True)[:keep]}
            changed = {j for j in range(cols) if got[name][i, j] != base[name][i, j]}
            assert changed == kept, f"{name} row {i}"
    # norms, embeddings, LM head: magnitude fallback, recorded
    assert record["fallbacks"]["model.norm.weight"]
    assert record["per_tensor"]["model.embed_tokens.weight"]["sparsifier"] == "magnitude"


def own_and_shared_windows(tmp_path: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's own calibration windows (3 x 12) and the top-level ones (4 x 16), saved as own.pt and shared.pt."""
    gen = torch.Generator().manual_seed(seed)
    own, shared = torch.randint(3, VOCAB, (3, 12), generator=gen), torch.randint(3, VOCAB, (4, 16), generator=gen)
    torch.save(own, tmp_path / "own.pt")
    torch.save(shared, tmp_path / "shared.pt")
    return own, shared


@pytest.mark.parametrize("activations,method", [("base", "ties"), ("finetuned", "ties"), ("base", "obim")])
def test_each_model_own_calibration_gives_its_own_norms(family, tmp_path, activations, method):
    """Task activations: ft1 calibrates on its own windows, ft2 on the top-level ones; every tensor equals
    merge_tensor with the brute-force norms of (that model or the base) on (that model's) windows."""
    from wandamerge.merging.methods import merge_tensor

    own, shared = own_and_shared_windows(tmp_path, seed=3)
    out = tmp_path / "task-activations"
    record = run_recipe({
        "merge_method": method, "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.3},
                    "calibration": {"data": str(tmp_path / "own.pt"), "nsamples": 3, "seqlen": 12}},
                   {"model": str(family["ft2"]), "parameters": {"weight": 0.8, "density": 0.3}}],
        "sparsify": {"score": "wanda", "activations": activations},
        "calibration": {"data": str(tmp_path / "shared.pt"), "nsamples": 4, "seqlen": 16}}, out)
    through = (lambda m: family[m]) if activations == "finetuned" else (lambda m: family["base"])
    norms = [base_inputs_sq_norms(through("ft1"), own), base_inputs_sq_norms(through("ft2"), shared)]
    base, fts, got = tensors(family["base"]), [tensors(family["ft1"]), tensors(family["ft2"])], tensors(out)
    assert norms[0].keys() == norms[1].keys() and norms[0]
    for name in norms[0]:
        want = merge_tensor(method, base[name], [ft[name] for ft in fts], [1.0, 0.8], 0.3, score="wanda",
                            input_sq_norms=[n[name].float() for n in norms])
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    assert record["calibration"]["per_model"][str(family["ft1"])]["windows"] == [3, 12]
    assert record["calibration"]["windows"] == [4, 16]


def test_regmean_solves_each_linear_from_its_tasks_grams_and_averages_the_rest(family, tmp_path):
    """Each linear map equals RegMean on brute-force Grams of the base's inputs (ft1 on its own windows,
    ft2 on the top-level ones); every other tensor is the weighted mean of the task vectors, recorded."""
    from wandamerge.merging.methods import merge_tensor

    own, shared = own_and_shared_windows(tmp_path, seed=4)
    out = tmp_path / "regmean"
    record = run_recipe({
        "merge_method": "regmean", "base_model": str(family["base"]),
        "parameters": {"alpha": 0.7, "lambda": 1.5},
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0},
                    "calibration": {"data": str(tmp_path / "own.pt"), "nsamples": 3, "seqlen": 12}},
                   {"model": str(family["ft2"]), "parameters": {"weight": 0.5}}],
        "calibration": {"data": str(tmp_path / "shared.pt"), "nsamples": 4, "seqlen": 16}}, out)
    grams = [base_input_grams(family["base"], own), base_input_grams(family["base"], shared)]
    base, fts, got = tensors(family["base"]), [tensors(family["ft1"]), tensors(family["ft2"])], tensors(out)
    for name in base:
        if name in grams[0]:
            want = merge_tensor("regmean", base[name], [ft[name] for ft in fts], [1.0, 0.5], lambda_=1.5,
                                input_grams=[g[name].float() for g in grams], alpha=0.7)
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)
            assert name not in record["fallbacks"]
        else:
            mean = sum(w * (ft[name] - base[name]) for w, ft in zip([1.0, 0.5], fts)) / 1.5
            torch.testing.assert_close(got[name], base[name] + 1.5 * mean, rtol=0, atol=1e-6, msg=name)
            assert "merged by task_arithmetic" in record["fallbacks"][name]
    assert record["calibration"]["per_model"][str(family["ft1"])]["windows"] == [3, 12]
    assert [p.name for p in out.parent.iterdir() if "grams" in p.name] == []  # the spilled Grams are gone


def test_gram_rescale_collects_each_models_grams_in_the_calibration_pass(family, tmp_path):
    from wandamerge.merging.methods import merge_tensor

    own, shared = own_and_shared_windows(tmp_path, seed=5)
    record = run_recipe({
        "merge_method": "ties", "base_model": str(family["base"]), "parameters": {"rescale": "gram"},
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.3},
                    "calibration": {"data": str(tmp_path / "own.pt"), "nsamples": 3, "seqlen": 12}},
                   {"model": str(family["ft2"]), "parameters": {"weight": 1.0, "density": 0.3}}],
        "sparsify": {"score": "wanda"},
        "calibration": {"data": str(tmp_path / "shared.pt"), "nsamples": 4, "seqlen": 16}}, tmp_path / "out")
    windows = [own, shared]
    norms = [base_inputs_sq_norms(family["base"], w) for w in windows]
    grams = [base_input_grams(family["base"], w) for w in windows]
    base, fts, got = tensors(family["base"]), [tensors(family["ft1"]), tensors(family["ft2"])], tensors(tmp_path / "out")
    rescaled = 0
    for name in norms[0]:
        want = merge_tensor("ties", base[name], [ft[name] for ft in fts], 1.0, 0.3, score="wanda", rescale="gram",
                            input_sq_norms=[n[name].float() for n in norms],
                            input_grams=[g[name].float() for g in grams])
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)
        unscaled = merge_tensor("ties", base[name], [ft[name] for ft in fts], 1.0, 0.3, score="wanda",
                                rescale="none", input_sq_norms=[n[name].float() for n in norms])
        rescaled += not torch.allclose(got[name], unscaled, atol=1e-6)
    assert rescaled == len(norms[0])  # every linear map really rescaled, from its own Grams
    assert record["calibration"]["per_model"]


def test_own_calibration_without_an_activation_score_is_refused(family, tmp_path):
    with pytest.raises(RecipeError, match="own calibration"):
        parse_recipe({"merge_method": "ties", "base_model": str(family["base"]),
                      "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.5},
                                  "calibration": {"data": "wiki"}}]})


def test_lora_delta_equals_merge_and_unload_minus_base(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(family["base"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero; give the adapter a real effect
        g = torch.Generator().manual_seed(7)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "lora")
    merged_reference = peft_model.merge_and_unload()
    out = tmp_path / "lora-merge"
    run_recipe({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                "models": [{"model": str(tmp_path / "lora"), "parameters": {"weight": 1.0}}]}, out)
    got = tensors(out)
    for name, want in merged_reference.state_dict().items():
        if name in got:
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)


def test_mixed_lora_and_full_checkpoint_merge_runs(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(family["base"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "lora")
    out = tmp_path / "mixed"
    result = CliRunner().invoke(main, ["-q", "merge", str(_write(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(family["base"]),
        "models": [{"model": str(tmp_path / "lora"), "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": str(family["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]})), "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.randint(3, VOCAB, (1, 8))).logits.isfinite().all()
    card = (out / "README.md").read_text()
    assert "merge_method: ties" in card
    record = json.loads((out / "wandamerge.json").read_text())
    assert record["inputs"][str(tmp_path / "lora")]["kind"] == "lora"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("recipe, message", [
    ({"merge_method": "tiez", "base_model": "b", "models": [{"model": "m"}]}, "did you mean 'ties'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "paramters": {}}]},
     "did you mean 'parameters'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"wieght": 1}}]},
     "did you mean 'weight'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": "heavy"}}]},
     "must be a number"),
    ({"merge_method": "ties", "models": [{"model": "m"}]}, "needs a base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}], "sparsify": {"score": "wnda"}},
     "did you mean 'wanda'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}], "calibration": {"nsamples": 0}},
     "calibration.nsamples"),
])
def test_recipe_errors_name_the_bad_key_before_loading_anything(recipe, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        parse_recipe(recipe)


def test_incompatible_inputs_are_refused_before_heavy_work(family, tmp_path):
    from transformers import LlamaConfig

    other = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=VOCAB + 8, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    save(other, tmp_path / "bigger-vocab")
    recipe = _write(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(family["base"]),
                                          "models": [{"model": str(tmp_path / "bigger-vocab"),
                                                      "parameters": {"weight": 1, "density": 0.5}}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "resized vocabulary" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, params", [
    ("ties", {"weight": 0.6, "density": 0.3}),
    ("task_arithmetic", {"weight": 0.6}),
    ("linear", {"weight": 0.6}),
    ("breadcrumbs_ties", {"weight": 0.6, "density": 0.5, "gamma": 0.05}),
    ("ties", {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.5}], "density": [0.2, 0.7]}),
])
def test_same_tensors_as_mergekit_on_a_tiny_model(family, tmp_path, method, params):
    pytest.importorskip("mergekit")
    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(family[f"ft{i}"]),
                          "parameters": {**params, "weight": params["weight"] / i
                                         if isinstance(params["weight"], float) else params["weight"]}}
                         for i in (1, 2, 3)]}
    if method != "linear":
        recipe["base_model"] = str(family["base"])
    else:
        recipe["parameters"] = {"normalize": True}
    path = _write(tmp_path / "recipe.yaml", recipe)
    theirs = tmp_path / "mergekit-out"
    mergekit_yaml(path, theirs)
    ours = tmp_path / "ours"
    result = CliRunner().invoke(main, ["-q", "merge", str(path), "-o", str(ours)])
    assert result.exit_code == 0, result.output
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name


RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")
                 if not p.name.startswith("run-"))
RUN_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("run-*.yaml"))


@pytest.mark.parametrize("path", RUN_RECIPES, ids=lambda p: p.name)
def test_example_run_recipes_validate(path):
    from wandamerge.jobs.run import MERGED, load_run_recipe

    recipe, _ = load_run_recipe(path)
    assert (recipe.prune is not None or recipe.merge is not None) and recipe.evaluate.tasks
    assert recipe.merge is None or recipe.prune is None or recipe.prune.model == MERGED  # merge, then prune


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipes_validate(path):
    from wandamerge.recipe import load_recipe

    recipe = load_recipe(path)
    ours = recipe.sparsify is not None or any(m.calibration is not None for m in recipe.models)
    if not ours:  # plain mergekit recipes must also be valid mergekit configs, with a method mergekit has
        mergekit_config = pytest.importorskip("mergekit.config")
        registry = pytest.importorskip("mergekit.merge_methods.registry")
        if recipe.merge_method in {m.spec.name for m in registry.registered_methods()}:
            mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))


def test_gradient_and_filtered_parameters_resolve_as_in_mergekit():
    from wandamerge.recipe import Condition, evaluate_setting

    assert evaluate_setting([0.2, 0.6], "model.layers.3.mlp.up_proj.weight", t=0.5) == pytest.approx(0.4)
    conditions = [Condition(filter="mlp", value=0.8), Condition(value=0.5)]
    assert evaluate_setting(conditions, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.8
    assert evaluate_setting(conditions, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.5


def test_sharded_output_opens_with_from_pretrained_and_inputs_are_unchanged(family, tmp_path):
    import hashlib

    def digest(path):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}

    before = {k: digest(v) for k, v in family.items()}
    recipe = _write(tmp_path / "r.yaml", {"merge_method": "dare_ties", "base_model": str(family["base"]),
                                          "models": [{"model": str(family[f"ft{i}"]),
                                                      "parameters": {"weight": 0.5, "density": 0.5}}
                                                     for i in (1, 2)]})
    out = tmp_path / "sharded"
    result = CliRunner().invoke(main, ["-q", "merge", str(recipe), "-o", str(out), "--max-shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert set(merged.state_dict()) >= set(index["weight_map"])
    assert {k: digest(v) for k, v in family.items()} == before
    again = tmp_path / "again"  # same recipe, same seed: bit-identical tensors
    assert CliRunner().invoke(main, ["-q", "merge", str(recipe), "-o", str(again), "--max-shard-size", "20KB"]).exit_code == 0
    a, b = tensors(out), tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_shard_is_refused_with_a_clear_error(family, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(family["ft1"], broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    recipe = _write(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(family["base"]),
                                          "models": [{"model": str(broken), "parameters": {"weight": 1, "density": 0.5}}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "truncated" in result.output
    assert not (tmp_path / "out").exists()


def test_streaming_writer_round_trips_dtypes_across_shards(tmp_path):
    from wandamerge.io.safetensors import ShardWriter

    tensors_in = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(2.5),
                  "d": torch.randn(4, 4).half(), "e": torch.tensor([True, False, True])}
    writer = ShardWriter(tmp_path, [(k, tuple(v.shape), v.dtype) for k, v in tensors_in.items()], max_shard_size=40)
    for k, v in tensors_in.items():
        writer.add(k, v)
    writer.close()
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].keys() == tensors_in.keys()
    got = tensors(tmp_path)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors_in.items())


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "breadcrumbs_ties", "della"])
def test_combining_in_row_chunks_changes_nothing(monkeypatch, method):
    from wandamerge.merging import methods

    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 23, generator=g)
    fts = [base + torch.randn(37, 23, generator=g) * 0.1 for _ in range(3)]

    def run():
        densities = None if method == "task_arithmetic" else [0.4, 0.5, 0.6]
        return methods.merge_tensor(method, base, fts, [0.5, 0.3, 0.2], densities,
                                    generator=torch.Generator().manual_seed(1))

    whole = run()
    monkeypatch.setattr(methods, "COMBINE_CHUNK", 50)  # 2 rows at a time
    assert torch.equal(run(), whole)


def test_rslora_and_rank_patterns_match_peft(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(family["base"])
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"],
                        rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3}, init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "lora")
    reference = peft_model.merge_and_unload().state_dict()
    out = tmp_path / "merged"
    run_recipe({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                "models": [{"model": str(tmp_path / "lora"), "parameters": {"weight": 1.0}}]}, out)
    got = tensors(out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-6, msg=name)
