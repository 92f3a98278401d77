"""mergekit 0.1.5's other eleven methods from recipes, end to end, against mergekit itself on tiny models.

Each recipe runs through mergekit's own ``mergekit-yaml`` (``python -m
mergekit.scripts.run_yaml``, as ``test_merge_end_to_end`` runs it) and twice through ours, from the
same YAML file by the command line and from the same dict by the Python API
(``wandamerge.merge(parse_recipe(...))``); every tensor must be equal to the bit (float32 models,
``dtype: float32``: our kernels repeat mergekit's float32 arithmetic in its order). Then the
recipes mergekit would refuse, or that name what a method does not take, are refused here in one
line before any model loads, and the merge reads each input's tensors one at a time.
"""

from __future__ import annotations


import pytest
import torch
import yaml
from click.testing import CliRunner

from wandamerge.cli import main
from wandamerge.errors import ConfigError, RecipeError
from wandamerge.jobs.merge import merge
from wandamerge.merging import MERGE_METHODS, merge_tensor
from wandamerge.recipe import parse_recipe

from conftest import mergekit_yaml, saved_family, tensors, track_reads

MERGEKIT_METHODS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "sce", "arcee_fusion",
                    "passthrough", "ram", "ramplus_tl")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """A tiny llama base and three seeded fine-tunes of it (every entry changed by N(0, 0.05))."""
    paths = saved_family(tmp_path_factory.mktemp("family"), "llama", finetunes=3)
    return {"base": str(paths[0]), **{f"ft{i}": str(p) for i, p in enumerate(paths[1:], start=1)}}


def recipe_of(family: dict, method: str, models: list, parameters: dict | None = None, base: bool = True) -> dict:
    """A mergekit recipe: ``models`` are keys of ``family`` or (key, own parameters) pairs."""
    entries = [{"model": family[m]} if isinstance(m, str) else {"model": family[m[0]], "parameters": m[1]}
               for m in models]
    recipe = {"merge_method": method, "models": entries, "dtype": "float32"}
    if base:
        recipe["base_model"] = family["base"]
    if parameters:
        recipe["parameters"] = parameters
    return recipe


# one recipe per method (two where a parameter changes the method's structure), as mergekit's docs write them
CASES = {
    "slerp": ("slerp", ["base", "ft1"], {"t": 0.3}),
    # a gradient over the layers per filter, mergekit's classic slerp recipe; the rest (embeddings, norms) at 0.5
    "slerp-gradient-filters": ("slerp", ["base", "ft1"], {"t": [{"filter": "self_attn", "value": [0.0, 0.7]},
                                                                {"filter": "mlp", "value": [1.0, 0.2]},
                                                                {"value": 0.5}]}),
    "nuslerp": ("nuslerp", [("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.7})], None),
    "nuslerp-row-wise-no-base": ("nuslerp", [("ft1", {"weight": 1.0}), ("ft2", {"weight": 2.0})],
                                 {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": ("multislerp", [("ft1", {"weight": 0.2}), ("ft2", {"weight": 0.5}), ("ft3", {"weight": 0.3})],
                   {"eps": 1e-7}),
    # the base_model, not listed, is merged as a third input (karcher takes no base)
    "karcher": ("karcher", ["ft1", "ft2"], {"max_iter": 5, "tol": 1e-6}),
    "model_stock": ("model_stock", ["base", "ft1", "ft2", "ft3"], None),
    "model_stock-filter-wise": ("model_stock", ["ft1", "ft2", "ft3"], {"filter_wise": True}),
    "nearswap": ("nearswap", ["base", "ft2"], {"t": [0.01, 0.05]}),
    "sce": ("sce", ["ft1", "ft2", "ft3"], {"select_topk": 0.4}),
    "arcee_fusion": ("arcee_fusion", ["base", "ft3"], None),
    "passthrough": ("passthrough", [("ft2", {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 2.0}]})], None),
    "ram": ("ram", ["ft1", "ft2", "ft3"], {"epsilon": 0.04}),
    "ramplus_tl": ("ramplus_tl", ["ft1", "ft2", "ft3"], {"epsilon": 0.04, "r": 0.3, "alpha": 0.5}),
}
NO_BASE = {"nuslerp-row-wise-no-base", "passthrough"}


def test_every_method_of_mergekit_is_a_row():
    assert {m.name for m in MERGE_METHODS.values() if m.on == "tensors"} == set(MERGEKIT_METHODS)
    assert {case[0] for case in CASES.values()} == set(MERGEKIT_METHODS)


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(family, tmp_path, case):
    pytest.importorskip("mergekit")
    method, models, parameters = CASES[case]
    recipe = recipe_of(family, method, models, parameters, base=case not in NO_BASE)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    mergekit_yaml(path, tmp_path / "mergekit")
    result = CliRunner().invoke(main, ["-q", "merge", str(path), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    merge(parse_recipe(recipe), tmp_path / "api", progress=False)
    theirs, cli, api = tensors(tmp_path / "mergekit"), tensors(tmp_path / "cli"), tensors(tmp_path / "api")
    assert theirs.keys() == cli.keys() == api.keys()
    for name in theirs:
        assert cli[name].dtype == theirs[name].dtype == torch.float32, name
        assert torch.equal(cli[name], theirs[name]), (name, (cli[name] - theirs[name]).abs().max().item())
        assert torch.equal(api[name], cli[name]), name
    base = tensors(family["base"])
    assert any(not torch.equal(cli[n], base[n]) for n in base)  # the merge did something


def test_the_python_api_merges_one_tensor_by_the_rows_parameters():
    from wandamerge.merging.interpolation import karcher_mean, slerp

    g = torch.Generator().manual_seed(0)
    base, other, third = (torch.randn(4, 6, generator=g) for _ in range(3))
    assert torch.equal(merge_tensor("slerp", base, [other], None, parameters={"t": 0.3}), slerp(base, other, 0.3))
    assert torch.equal(merge_tensor("karcher", base, [other, third], None, parameters={"max_iter": 3}),
                       karcher_mean([other, third], max_iter=3))
    for call, words in [(dict(method="slerp", finetuned=[other], weights=None, lambda_=0.5, parameters={"t": 0.3}),
                         "takes no lambda_"),
                        (dict(method="slerp", finetuned=[other, third], weights=None, parameters={"t": 0.3}),
                         "exactly 1 model"),
                        (dict(method="slerp", finetuned=[other], weights=[1.0], parameters={"t": 0.3}),
                         "takes no weights"),
                        (dict(method="nuslerp", finetuned=[other, third], weights=None), "needs weight"),
                        (dict(method="karcher", finetuned=[other], weights=None, parameters={"max_iter": 2.5}),
                         "must be an integer")]:
        method, finetuned, weights = call.pop("method"), call.pop("finetuned"), call.pop("weights")
        with pytest.raises(ConfigError, match=words):
            merge_tensor(method, base, finetuned, weights, **call)


BAD = {  # (method, models, parameters, other keys) -> words of the one-line refusal
    "slerp with two other models": (("slerp", ["base", "ft1", "ft2"], {"t": 0.5}),
                                    ["'slerp'", "exactly 1 model besides the base_model", "got 2"]),
    "slerp without a base": (("slerp", ["ft1", "ft2"], {"t": 0.5}, {"base": False}), ["'slerp' needs a base_model"]),
    "slerp without t": (("slerp", ["ft1"], None), ["'slerp' needs parameter 't'"]),
    "t per model": (("slerp", [("ft1", {"t": 0.4})], {"t": 0.5}), ["'t' is a global parameter of slerp"]),
    "weight for slerp": (("slerp", [("ft1", {"weight": 1.0})], {"t": 0.5}),
                         ["'slerp' takes no parameter 'weight'", "expected one of: t"]),
    "misspelt nuslerp flag": (("nuslerp", [("ft1", {"weight": 1}), ("ft2", {"weight": 1})], {"nuslerp_flaten": False}),
                              ["unknown parameter 'nuslerp_flaten'", "did you mean 'nuslerp_flatten'"]),
    "nuslerp of one model": (("nuslerp", [("ft1", {"weight": 1})], None), ["'nuslerp'", "exactly 2 models"]),
    "nuslerp without a weight": (("nuslerp", [("ft1", {"weight": 1}), "ft2"], None), ["has no weight"]),
    "karcher's max_iter a fraction": (("karcher", ["ft1", "ft2"], {"max_iter": 2.5}), ["'max_iter'", "integer"]),
    "normalize_weights a number": (("multislerp", [("ft1", {"weight": 1})], {"normalize_weights": 0.5}),
                                   ["'normalize_weights'", "one of True, False"]),
    "model_stock of one model": (("model_stock", ["base", "ft1"], None), ["'model_stock'", "at least 2 models"]),
    "passthrough of the model and the base": (("passthrough", ["ft1"], None),
                                              ["'passthrough'", "exactly 1 model", "base_model not listed"]),
    "arcee_fusion with a parameter": (("arcee_fusion", ["ft1"], {"t": 0.5}), ["takes no parameters"]),
    "a model listed twice": (("karcher", ["ft1", "ft1"], None), ["listed twice"]),
    "density for sce": (("sce", [("ft1", {"density": 0.5})], None), ["'sce' takes no parameter 'density'"]),
    "lambda for ram": (("ram", ["ft1"], {"lambda": 0.5}), ["'ram' takes no parameter 'lambda'"]),
    "ram's epsilon per model": (("ram", [("ft1", {"epsilon": 0.1})], None), ["global parameter of ram"]),
    "sparsify slerp": (("slerp", ["ft1"], {"t": 0.5}, {"sparsify": {"score": "wanda"}}),
                       ["'slerp' takes no sparsify section", "whole tensors"]),
    "sparsify passthrough": (("passthrough", ["ft1"], None, {"base": False, "sparsify": {"score": "magnitude"}}),
                             ["'passthrough' takes no sparsify section"]),
    "sparsify sce": (("sce", ["ft1", "ft2"], None, {"sparsify": {"score": "magnitude"}}),
                     ["'sce' takes no sparsify section", "select_topk"]),
    "sparsify ram": (("ram", ["ft1", "ft2"], None, {"sparsify": {"score": "wanda"}}), ["'ram' takes no sparsify",
                                                                                     "epsilon"]),
    "sparsify model_stock": (("model_stock", ["ft1", "ft2"], None, {"sparsify": {}}),
                             ["'model_stock' takes no sparsify", "angles"]),
}
FAKE = {"base": "b", "ft1": "m1", "ft2": "m2", "ft3": "m3"}  # validation reads no model


def bad_recipe(case: str) -> dict:
    spec, _ = BAD[case]
    method, models, parameters, *more = spec
    extra = dict(more[0]) if more else {}
    recipe = recipe_of(FAKE, method, models, parameters, base=extra.pop("base", True))
    return {**recipe, **extra}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipes_are_refused_in_one_line_before_loading(case):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(bad_recipe(case))
    message = str(caught.value)
    assert "\n" not in message
    for word in BAD[case][1]:
        assert word in message, (word, message)


@pytest.mark.parametrize("value", [10 ** 400, float("nan")])
def test_a_number_beyond_floats_is_refused_not_a_crash(value):
    for method, models, parameters in [("ties", [("ft1", {"weight": value})], None),
                                       ("slerp", ["ft1"], {"t": value})]:
        with pytest.raises(RecipeError, match="must be a finite number"):
            parse_recipe(recipe_of(FAKE, method, models, parameters))


def test_the_command_line_refuses_a_bad_recipe_with_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(bad_recipe("slerp with two other models")))
    result = CliRunner().invoke(main, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "exactly 1 model besides the base_model" in result.output and not (tmp_path / "out").exists()


def test_what_mergekit_takes_and_wandamerge_did_not_restrict():
    # ramplus_tl's alpha is a clamp bound (any number, as mergekit), not RegMean's alpha in [0, 1]
    parse_recipe(recipe_of(FAKE, "ramplus_tl", ["ft1"], {"alpha": 3.0}))
    # a listed base_model is the base; sce and ram merge it alone into itself, as mergekit
    assert parse_recipe(recipe_of(FAKE, "sce", ["base"])).inputs() == (True, [])


def test_a_required_parameter_missing_for_some_tensors_is_refused_before_merging(family, tmp_path):
    """As mergekit ("Missing required parameter t"): t only under filters leaves the embeddings without one."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_of(family, "slerp", ["ft1"], {"t": [{"filter": "mlp", "value": 0.5}]})))
    result = CliRunner().invoke(main, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "slerp has no t for" in result.output and "set parameters.t" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, inputs", [("karcher", 3), ("slerp-gradient-filters", 2),
                                         ("nuslerp-row-wise-no-base", 2)])
def test_each_input_holds_one_tensor_at_a_time(family, tmp_path, monkeypatch, case, inputs):
    """Every read of an input's tensor finds that input's earlier tensors released, and each input is read
    once per tensor name (the base too, also where it is one of the inputs)."""
    reads = track_reads(monkeypatch)
    method, models, parameters = CASES[case]
    recipe = recipe_of(family, method, models, parameters, base=case not in NO_BASE)
    merge(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert len(reads) == len(set(reads))  # no tensor of any input read twice
    names = {name for _, name in reads}
    assert len({path for path, _ in reads}) == inputs and len(reads) == inputs * len(names)
