"""mergekit 0.1.5's ``slices:`` and ``modules:`` recipes, end to end, against mergekit itself on tiny models.

Each recipe runs through mergekit's own ``mergekit-yaml`` and through ours, by the command line and by
the Python API: every tensor must have mergekit's name and value to the bit (float32 models, ``dtype:
float32``), the output's layer count must be the slices' total, and the output must load with
``AutoModelForCausalLM`` and run. Per-layer config lists follow their layers (a Qwen2 with sliding and
full attention layers). Then the recipes mergekit would refuse, or that ask what a slices recipe cannot
do, are refused in one line, before any model loads or, for what needs the models' configs (a layer
range past the end), before any tensor is read; and the merge reads one tensor per source at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from wandamerge.cli import main
from wandamerge.errors import RecipeError
from wandamerge.io.safetensors import Checkpoint
from wandamerge.jobs.merge import merge
from wandamerge.recipe import SlicesRecipe, parse_recipe

from conftest import VOCAB, finetune_of, mergekit_yaml, save, tensors, tiny_model, track_reads

LAYERS = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict[str, str]:
    """A tiny 4-layer llama ``a``, two seeded fine-tunes ``b`` and ``c`` of it, and a 2-layer llama ``short``."""
    root = tmp_path_factory.mktemp("stack")
    base = tiny_model("llama", 0, num_layers=LAYERS)
    paths = {"a": save(base, root / "a"), "b": save(finetune_of(base, seed=1), root / "b"),
             "c": save(finetune_of(base, seed=2), root / "c"), "short": save(tiny_model("llama", 3, num_layers=2),
                                                                           root / "short")}
    return {key: str(path) for key, path in paths.items()}


def source(stack: dict, model: str, start: int, end: int, **parameters) -> dict:
    entry = {"model": stack[model], "layer_range": [start, end]}
    return {**entry, "parameters": parameters} if parameters else entry


# name -> (recipe of the stack's paths, layers of the output)
CASES = {
    # a frankenmerge: a's layers 0-1 then b's 1-2; b's scale filtered by b's OWN tensor names (mergekit's rule)
    "passthrough frankenmerge": (lambda s: {
        "merge_method": "passthrough",
        "slices": [{"sources": [source(s, "a", 0, 2)]},
                   {"sources": [source(s, "b", 1, 3, scale=[{"filter": "layers.2.", "value": 0.5}, {"value": 1.0}])]}]},
        4),
    # slerp across two sources of different layers; t a gradient over each slice, per slice and under filters
    "slerp t gradient": (lambda s: {
        "merge_method": "slerp", "base_model": s["a"],
        "slices": [{"sources": [source(s, "a", 0, 2), source(s, "b", 1, 3)], "parameters": {"t": [0.0, 1.0]}},
                   {"sources": [source(s, "a", 1, 4), source(s, "c", 0, 3)]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.4}]}},
        5),
    # ties across three sources with the base among them; per-source weights and density gradients, slice defaults
    "ties with a base": (lambda s: {
        "merge_method": "ties", "base_model": s["a"],
        "slices": [{"sources": [source(s, "a", 0, 3), source(s, "b", 0, 3, weight=0.6, density=[0.3, 0.9]),
                                source(s, "c", 1, 4, weight=0.4, density=0.5)]},
                   {"sources": [source(s, "a", 3, 4), source(s, "b", 3, 4, weight=1.0, density=0.7),
                                source(s, "c", 3, 4)], "parameters": {"weight": 0.3, "density": 0.5}}],
        "parameters": {"lambda": 0.9}},
        4),
    # task arithmetic with a base of its own per slice (b for the second), lambda a gradient, normalized
    "task_arithmetic with a base per slice": (lambda s: {
        "merge_method": "task_arithmetic", "base_model": s["a"],
        "slices": [{"sources": [source(s, "a", 0, 2), source(s, "b", 0, 2, weight=0.5),
                                source(s, "c", 2, 4, weight=[1.0, 0.1])]},
                   {"sources": [source(s, "b", 2, 4), source(s, "a", 0, 2), source(s, "c", 0, 2, weight=0.4)],
                    "base_model": s["b"], "parameters": {"weight": 0.8}}],
        "parameters": {"normalize": True, "lambda": [0.5, 1.5]}},
        4),
    # mergekit's modules: spelling, with the module's parameters between the slice's and the global ones
    "modules with slices": (lambda s: {
        "merge_method": "slerp", "base_model": s["a"],
        "modules": {"default": {"slices": [{"sources": [source(s, "a", 0, 2), source(s, "b", 2, 4)]}],
                                "parameters": {"t": [0.2, 0.7]}}},
        "parameters": {"t": 0.5}},
        2),
    # modules with models: one slice of every model's whole range, the base added as a source
    "modules with models": (lambda s: {
        "merge_method": "task_arithmetic", "base_model": s["a"],
        "modules": {"default": {"models": [{"model": s["b"], "parameters": {"weight": 0.7}}, {"model": s["c"]}],
                                "parameters": {"weight": [0.2, 0.5]}}}},
        LAYERS),
}


def run_ours(recipe: dict, path: Path, out: Path) -> dict:
    result = CliRunner().invoke(main, ["-q", "merge", str(path), "-o", str(out / "cli")])
    assert result.exit_code == 0, result.output
    merge(parse_recipe(recipe), out / "api", progress=False)
    return tensors(out / "cli")


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_and_layer_count_as_mergekit(stack, tmp_path, case):
    build, layers = CASES[case]
    recipe = {**build(stack), "dtype": "float32"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    mergekit_yaml(path, tmp_path / "mergekit")
    ours, theirs, api = run_ours(recipe, path, tmp_path), tensors(tmp_path / "mergekit"), tensors(tmp_path / "api")
    assert ours.keys() == theirs.keys() == api.keys()
    assert {int(n.split(".")[2]) for n in ours if n.startswith("model.layers.")} == set(range(layers))
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        assert torch.equal(ours[name], theirs[name]), (name, (ours[name] - theirs[name]).abs().max().item())
        assert torch.equal(api[name], ours[name]), name
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["num_hidden_layers"] == json.loads((tmp_path / "mergekit" / "config.json").read_text())[
        "num_hidden_layers"] == layers
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cli").eval()
    assert len(model.model.layers) == layers
    with torch.no_grad():
        logits = model(torch.tensor([[3, 17, 40, 5, 88, 9]])).logits
    assert logits.shape == (1, 6, VOCAB) and torch.isfinite(logits).all()


def test_the_record_says_where_each_layer_comes_from(stack, tmp_path):
    record = merge(parse_recipe(CASES["passthrough frankenmerge"][0](stack)), tmp_path / "out", progress=False)
    assert record["layers"] == [{"slice": 0, "from": {stack["a"]: 0}}, {"slice": 0, "from": {stack["a"]: 1}},
                                {"slice": 1, "from": {stack["b"]: 1}}, {"slice": 1, "from": {stack["b"]: 2}}]
    assert record["per_tensor"]["model.layers.3.mlp.up_proj.weight"]["from"] == {
        stack["b"]: "model.layers.2.mlp.up_proj.weight"}
    # mergekit's plan.py: the embeddings from the first slice's model, final norm and LM head from the last one's
    out, a, b = tensors(tmp_path / "out"), tensors(stack["a"]), tensors(stack["b"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])


def test_per_layer_config_lists_follow_their_layers(tmp_path):
    """A Qwen2 whose layers are full, sliding, sliding attention: a frankenmerge of layer 2 then layers 0-2
    gets layer_types [sliding, full, sliding, sliding], and loads (transformers checks the list against the
    layer count; mergekit 0.1.5 leaves the list as it was, and fails there under transformers 5)."""
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    qwen = save(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "qwen")
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(qwen), "layer_range": [2, 3]}]},
        {"sources": [{"model": str(qwen), "layer_range": [0, 3]}]}]}
    merge(parse_recipe(recipe), tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    out, original = tensors(tmp_path / "out"), tensors(qwen)
    for index, origin in enumerate([2, 0, 1, 2]):
        assert torch.equal(out[f"model.layers.{index}.self_attn.q_proj.bias"],
                           original[f"model.layers.{origin}.self_attn.q_proj.bias"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.layer_types == written["layer_types"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6, 7, 8, 9]])).logits).all()


FAKE = {"a": "a", "b": "b", "c": "c"}  # validation reads no model


def fake(model: str, start: int = 0, end: int = 2, **parameters) -> dict:
    return source(FAKE, model, start, end, **parameters)


BAD = {  # recipe -> words of the one-line refusal
    "a slice with no sources": ({"merge_method": "passthrough", "slices": [{"sources": []}]},
                                ["slices.0.sources", "a slice with no sources"]),
    "sources of unequal length": ({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
                                   "slices": [{"sources": [fake("a", 0, 2), fake("b", 0, 3)]}]},
                                  ["sources of unequal length", "a [0, 2], b [0, 3]"]),
    "an empty layer range": ({"merge_method": "passthrough", "slices": [{"sources": [fake("a", 2, 2)]}]},
                             ["layer_range must be [start, end] with 0 <= start < end", "got [2, 2]"]),
    "a negative layer": ({"merge_method": "passthrough", "slices": [{"sources": [fake("a", -1, 2)]}]},
                         ["slices.0.sources.0.layer_range", "got [-1, 2]"]),
    "a misspelt layer_range": ({"merge_method": "passthrough",
                                "slices": [{"sources": [{"model": "a", "layer_rnage": [0, 2]}]}]},
                               ["unknown key 'slices.0.sources.0.layer_rnage'", "did you mean 'layer_range'"]),
    "models and slices": ({"merge_method": "passthrough", "models": [{"model": "a"}],
                           "slices": [{"sources": [fake("a")]}]}, ["one of 'models', 'slices' or 'modules'"]),
    "no slices": ({"merge_method": "passthrough", "slices": []}, ["exactly one of 'models', 'slices' or 'modules'"]),
    "ties without a base": ({"merge_method": "ties", "parameters": {"weight": 1.0},
                             "slices": [{"sources": [fake("a"), fake("b")]}]},
                            ["slices.0", "'ties' needs a base_model"]),
    "a base that is no source": ({"merge_method": "ties", "base_model": "c", "parameters": {"weight": 1.0},
                                  "slices": [{"sources": [fake("a"), fake("b")]}]},
                                 ["slices.0", "base_model c is none of the sources (a, b)"]),
    "passthrough of two sources": ({"merge_method": "passthrough", "slices": [{"sources": [fake("a"), fake("b")]}]},
                                   ["'passthrough' merges exactly 1 source, got 2"]),
    "slerp of three sources": ({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
                                "slices": [{"sources": [fake("a"), fake("b"), fake("c")]}]},
                               ["'slerp' merges exactly 1 source besides the base_model, got 2"]),
    "a model twice in a slice": ({"merge_method": "karcher", "slices": [{"sources": [fake("a"), fake("a", 2, 4)]}]},
                                 ["'karcher' merges distinct models, and a is listed twice"]),
    "slerp without t": ({"merge_method": "slerp", "base_model": "a",
                         "slices": [{"sources": [fake("a"), fake("b")]}, {"sources": [fake("a"), fake("b")],
                                                                          "parameters": {"t": 0.5}}]},
                        ["slices.0: merge_method 'slerp' needs parameter 't'"]),
    "a source without its weight": ({"merge_method": "ties", "base_model": "a",
                                     "slices": [{"sources": [fake("a"), fake("b", weight=1.0), fake("c")]}]},
                                    ["slices.0: model c has no weight"]),
    "t per source": ({"merge_method": "slerp", "base_model": "a",
                      "slices": [{"sources": [fake("a"), fake("b", t=0.5)]}]},
                     ["'t' is a global parameter of slerp", "slices.0.sources.1 (b)"]),
    "a parameter the method does not take": ({"merge_method": "passthrough", "slices": [
        {"sources": [fake("a")], "parameters": {"weight": 1.0}}]},
        ["'passthrough' takes no parameter 'weight'", "slices.0.parameters"]),
    "another module": ({"merge_method": "passthrough", "modules": {"text": {"slices": [{"sources": [fake("a")]}]}}},
                       ["one module, 'default'", "got 'text'"]),
    "a module of slices and models": ({"merge_method": "passthrough", "modules": {"default": {
        "slices": [{"sources": [fake("a")]}], "models": [{"model": "a"}]}}}, ["one of 'slices' or 'models'"]),
    "modules.models with the base as one more source": (
        {"merge_method": "passthrough", "base_model": "b", "modules": {"default": {"models": [{"model": "a"}]}}},
        ["modules.default.models", "exactly 1 source, got 2"]),
    "a sparsify section": ({"merge_method": "ties", "base_model": "a", "sparsify": {"score": "wanda"},
                            "slices": [{"sources": [fake("a"), fake("b", weight=1.0)]}]},
                           ["'sparsify' is not supported in a slices recipe"]),
    "regmean": ({"merge_method": "regmean", "slices": [{"sources": [fake("a")]}]},
                ["'regmean' cannot merge slices", "calibration activations"]),
    "wudi": ({"merge_method": "wudi", "base_model": "a", "slices": [{"sources": [fake("a"), fake("b")]}]},
             ["'wudi' cannot merge slices", "linear maps"]),
    "an activation election": ({"merge_method": "ties", "base_model": "a", "parameters": {"weight": 1.0},
                                "slices": [{"sources": [fake("a"), fake("b")],
                                            "parameters": {"election": "activation"}}]},
                               ["election: activation reads calibration activations"]),
    # the tensors after the blocks come from the last slice's first sources, as many as the first slice has
    "the base beyond the sources that merge the final norm": (
        {"merge_method": "ties", "base_model": "a", "parameters": {"weight": 1.0},
         "slices": [{"sources": [fake("a"), fake("b")]}, {"sources": [fake("b", 2, 3), fake("c", 2, 3),
                                                                      fake("a", 2, 3)]}]},
        ["slices.1 (its first sources, as many as the first slice's", "base_model a is none of the sources (b, c)"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_slices_recipes_are_refused_in_one_line_before_loading(case):
    recipe, words = BAD[case]
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_good_slices_recipes_parse_as_such():
    recipe = parse_recipe({"merge_method": "passthrough", "base_model": "c",
                           "slices": [{"sources": [fake("a")], "residual_weight": 0.5},
                                      {"sources": [fake("b", 1, 3)]}]})
    assert isinstance(recipe, SlicesRecipe) and recipe.referenced_models() == ["a", "b", "c"]


@pytest.fixture
def no_tensor_read(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"{name} of {self.path} read before the recipe was checked")
    monkeypatch.setattr(Checkpoint, "tensor", refuse)


@pytest.mark.parametrize("case, words", [
    ("past the last layer", ["slices.1: layer_range [2, 5]", "is outside its 4 layers (0 to 3)"]),
    ("unknown model", ["does not exist"]),
    ("models of unequal length", ["modules.default.models", "sources of unequal length"]),
    ("another architecture", ["does not fit", "hidden_size"]),
])
def test_what_needs_the_models_configs_is_refused_before_any_tensor_is_read(stack, tmp_path, no_tensor_read, case,
                                                                           words):
    if case == "past the last layer":
        recipe = {"merge_method": "passthrough", "slices": [{"sources": [source(stack, "a", 0, 2)]},
                                                            {"sources": [source(stack, "b", 2, 5)]}]}
    elif case == "unknown model":
        recipe = {"merge_method": "passthrough", "slices": [{"sources": [
            {"model": str(tmp_path / "nowhere"), "layer_range": [0, 2]}]}]}
    elif case == "models of unequal length":
        recipe = {"merge_method": "task_arithmetic", "base_model": stack["a"], "parameters": {"weight": 1.0},
                  "modules": {"default": {"models": [{"model": stack["short"]}]}}}
    else:
        wide = save(AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB)), tmp_path / "wide")
        recipe = {"merge_method": "passthrough", "slices": [{"sources": [source(stack, "a", 0, 2)]},
                                                            {"sources": [{"model": str(wide), "layer_range": [0, 2]}]}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not (tmp_path / "out").exists()


def test_each_source_holds_one_tensor_at_a_time(stack, tmp_path, monkeypatch):
    """Every read of a source's tensor finds that source's earlier tensors released, and each output tensor
    reads its tensor from each source of its slice once (the base's too)."""
    reads = track_reads(monkeypatch)
    record = merge(parse_recipe(CASES["ties with a base"][0](stack)), tmp_path / "out", progress=False)
    assert sorted(reads) == sorted((path, name) for entry in record["per_tensor"].values()
                                   for path, name in entry["from"].items())
    assert len(reads) == 3 * len(record["per_tensor"])
