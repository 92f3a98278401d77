"""Output vocabularies as mergekit 0.1.5 builds them: ``tokenizer_source``, the ``tokenizer:`` section, and
``chat_template``, on tiny models where fine-tunes have added tokens (resized embeddings and LM heads).

Each recipe runs through mergekit's own ``mergekit-yaml`` and through ``wandamerge merge``: the tensors
(names, shapes, values, to the bit), the tokenizers' vocabularies and added tokens, the chat template and
the config's ``vocab_size`` must be the same. Then the pure row logic on hand-made permutations, the
memory-lean path, the one-tensor-at-a-time rule, and one-line refusals of bad tokenizer sections.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import wandamerge
from wandamerge.cli import main
from wandamerge.core.vocabulary import MISSING, DefaultRow, TokenRule, default_rows, permuted_block
from wandamerge.io.chat_templates import chat_template_names, chat_template_text
from wandamerge.jobs.merge import merge
from wandamerge.recipe import parse_recipe

from conftest import finetune_of, mergekit_yaml, save, save_with_tokens, tensors, tiny_model, track_reads
from test_merge_lean import lean  # noqa: F401  (a fixture)

FT1_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
JINJA = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """A tiny llama base (96 tokens); ft1 of the same vocabulary (with a chat template); ft2 with two added
    tokens and a special one (99 rows); ft3 with one of ft2's added tokens (97 rows)."""
    root = tmp_path_factory.mktemp("vocab")
    base = tiny_model("llama")
    paths = {"base": save(base, root / "base")}
    ft1, ft2, ft3 = (finetune_of(base, seed=seed) for seed in (1, 2, 3))
    paths["ft1"] = save_with_tokens(ft1, root / "ft1", chat_template=FT1_TEMPLATE)
    paths["ft2"] = save_with_tokens(ft2, root / "ft2", ["<tool>", "<think>"], ["<|im_end|>"], seed=2)
    paths["ft3"] = save_with_tokens(ft3, root / "ft3", ["<tool>"], seed=3)
    return {name: str(path) for name, path in paths.items()}


def both(recipe: dict, tmp_path, *flags: str) -> tuple:
    """The recipe through mergekit-yaml and through ``wandamerge merge``: the two output directories."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    theirs, ours = tmp_path / "mergekit", tmp_path / "ours"
    mergekit_yaml(path, theirs, *flags)
    result = CliRunner().invoke(main, ["-q", "merge", str(path), "-o", str(ours)])
    assert result.exit_code == 0, result.output
    return theirs, ours


def assert_same_model(theirs, ours) -> None:
    mine, reference = tensors(ours), tensors(theirs)
    assert sorted(mine) == sorted(reference)
    for name, tensor in reference.items():
        assert mine[name].shape == tensor.shape, name
        assert torch.equal(mine[name], tensor), name
    config = [json.loads((d / "config.json").read_text()) for d in (theirs, ours)]
    assert config[0]["vocab_size"] == config[1]["vocab_size"]


def assert_same_tokenizer(theirs, ours) -> AutoTokenizer:
    reference, mine = AutoTokenizer.from_pretrained(theirs), AutoTokenizer.from_pretrained(ours)
    assert mine.get_vocab() == reference.get_vocab()
    assert ({i: str(t) for i, t in mine.added_tokens_decoder.items()}
            == {i: str(t) for i, t in reference.added_tokens_decoder.items()})
    assert mine.chat_template == reference.chat_template
    return mine


def recipe_of(family: dict, method: str, models: list, **keys) -> dict:
    """A recipe over ``models`` (keys of ``family``, or (key, parameters) pairs), the base as base_model."""
    entries = [{"model": family[m]} if isinstance(m, str) else {"model": family[m[0]], "parameters": m[1]}
               for m in models]
    return {"merge_method": method, "base_model": family["base"], "models": entries, "dtype": "float32", **keys}


# ----------------------------------------------------------------------------- against mergekit


def test_union_vocabulary_gives_mergekit_tensors_and_tokenizer(family, tmp_path):
    """tokenizer_source: union: ft2's tokens take ft2's rows in every model (one model has them), <tool> the
    mean of ft2's and ft3's (two have it, the base not), and the output opens with its 99 tokens."""
    recipe = recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.5}),
                                                   ("ft3", {"weight": 0.4})],
                       tokenizer_source="union", chat_template="chatml")
    theirs, ours = both(recipe, tmp_path)
    assert_same_model(theirs, ours)
    tokenizer = assert_same_tokenizer(theirs, ours)
    assert len(tokenizer) == 99 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 98
    assert "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.get_input_embeddings().weight.shape == (99, 32)
    assert model(input_ids=torch.tensor([tokenizer("w5 <tool> w9 <think>")["input_ids"]])).logits.shape[-1] == 99


def test_tokenizer_section_with_token_rules_and_padding(family, tmp_path):
    """tokens: a new token of zeros, a forced row from another token of a model (by token and by id), a
    token's own row from a named model; rows padded to a multiple of 8 with each model's mean row."""
    tokens = {
        "<new>": {"source": {"kind": "zero"}},
        "<think>": {"source": {"kind": "model_token", "model": family["ft1"], "token": "w5"}, "force": True},
        "<tool>": {"source": family["ft3"]},
        "w7": {"source": {"kind": "model_token", "model": family["base"], "token_id": 9}, "force": True},
        "<|im_end|>": {"source": {"kind": "zero"}},
    }
    recipe = recipe_of(family, "linear", [("base", {"weight": 0.2}), ("ft1", {"weight": 0.3}),
                                          ("ft2", {"weight": 0.5}), ("ft3", {"weight": 0.4})],
                       tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}, chat_template=JINJA)
    theirs, ours = both(recipe, tmp_path)
    assert_same_model(theirs, ours)
    tokenizer = assert_same_tokenizer(theirs, ours)
    assert len(tokenizer) == 100 and tokenizer.chat_template == JINJA
    embed = tensors(ours)["model.embed_tokens.weight"]
    assert embed.shape == (104, 32) and torch.equal(embed[tokenizer.convert_tokens_to_ids("<new>")], torch.zeros(32))
    assert torch.equal(embed[100], embed[103])  # padding: one mean row per model, merged


@pytest.mark.parametrize("source, method", [("base", "ties"), ("ft2", "task_arithmetic")])
def test_base_or_model_vocabulary(family, tmp_path, source, method):
    """tokenizer_source: base drops the fine-tunes' added rows; a model's vocabulary is that model's."""
    parameters = {"weight": 0.5, "density": 0.6} if method == "ties" else {"weight": 0.5}
    recipe = recipe_of(family, method, [("ft1", parameters), ("ft2", parameters), ("ft3", parameters)],
                       tokenizer_source=family.get(source, source))
    theirs, ours = both(recipe, tmp_path)
    assert_same_model(theirs, ours)
    assert len(assert_same_tokenizer(theirs, ours)) == (96 if source == "base" else 99)


@pytest.mark.parametrize("method, slices", [
    # a frankenmerge: embeddings from ft2 (all its tokens), LM head from the base (ft2's tokens: zeros)
    ("passthrough", [[("ft2", [0, 1])], [("base", [1, 2])]]),
    ("slerp", [[("base", [0, 2]), ("ft2", [0, 2])]]),
])
def test_slices_recipe_in_a_union_vocabulary(family, tmp_path, method, slices):
    recipe = {"merge_method": method, "dtype": "float32", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": family[m], "layer_range": r} for m, r in piece]} for piece in slices]}
    if method == "slerp":
        recipe.update(base_model=family["base"], parameters={"t": 0.3})
    theirs, ours = both(recipe, tmp_path)
    assert_same_model(theirs, ours)
    assert len(assert_same_tokenizer(theirs, ours)) == 99


@pytest.mark.parametrize("template", ["llama3", "auto"])
def test_chat_template_on_the_copied_tokenizer(family, tmp_path, template):
    """No output vocabulary: the base's tokenizer is saved with the template (auto: the one ft1 has)."""
    recipe = recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5})], chat_template=template)
    theirs, ours = both(recipe, tmp_path, "--copy-tokenizer")
    assert_same_model(theirs, ours)
    tokenizer = assert_same_tokenizer(theirs, ours)
    if template == "auto":
        assert tokenizer.chat_template == FT1_TEMPLATE
    else:
        assert "<|start_header_id|>" in tokenizer.chat_template


def test_where_mergekit_stops_the_merge_goes_on(family, tmp_path):
    """mergekit 0.1.5 fails (KeyError) on a token the section adds to the base's vocabulary, and on a
    ``tokens:`` entry without a source for a token some model lacks: here the new token's rows are zeros and
    the entry takes the automatic rule, as if it were not there."""
    recipe = recipe_of(family, "task_arithmetic", [("ft2", {"weight": 1.0})],
                       tokenizer={"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}}}})
    merge(parse_recipe(recipe), tmp_path / "base", progress=False)
    embed = tensors(tmp_path / "base")["model.embed_tokens.weight"]
    assert embed.shape == (97, 32) and torch.equal(embed[96], torch.zeros(32))
    models = [("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.5}), ("ft3", {"weight": 0.4})]
    merge(parse_recipe(recipe_of(family, "task_arithmetic", models, tokenizer={"tokens": {"<tool>": {}}})),
          tmp_path / "entry", progress=False)
    merge(parse_recipe(recipe_of(family, "task_arithmetic", models, tokenizer_source="union")),
          tmp_path / "union", progress=False)
    with_entry, union = tensors(tmp_path / "entry"), tensors(tmp_path / "union")
    assert all(torch.equal(with_entry[name], union[name]) for name in union)


# ----------------------------------------------------------------------------- named templates: mergekit's files


def mergekit_template_files() -> dict[str, str]:
    """The named templates in the installed mergekit's package, read from its folder (not through
    wandamerge): name -> text."""
    mergekit = pytest.importorskip("mergekit")
    folder = Path(mergekit.__file__).parent / "_data" / "chat_templates"
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.jinja"))}


def test_named_templates_are_read_from_mergekit(family, tmp_path):
    """Each name is the text of mergekit's file to the byte, and the merge writes that text; wandamerge
    ships no template of its own."""
    files = mergekit_template_files()
    assert chat_template_names() == sorted(files) and "chatml" in files
    assert all(chat_template_text(name) == text for name, text in files.items())
    assert not list(Path(wandamerge.__file__).parent.rglob("*.jinja"))
    merge(parse_recipe(recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5})], chat_template="mistral")),
          tmp_path / "out", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == files["mistral"]


def test_unknown_template_name_is_refused_with_a_suggestion(family, tmp_path):
    mergekit_template_files()
    recipe = recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5})], chat_template="chatmll")
    assert "unknown chat_template 'chatmll'; did you mean 'chatml'?" in refused(recipe, tmp_path)


@pytest.fixture
def no_mergekit(monkeypatch):
    """mergekit made unimportable, as where it is not installed (its cached modules too)."""
    for name in ["mergekit", *(name for name in sys.modules if name.startswith("mergekit."))]:
        monkeypatch.setitem(sys.modules, name, None)
    assert chat_template_names() is None


def test_without_mergekit_a_name_is_refused_in_one_line(family, tmp_path, no_mergekit):
    """A name passes the recipe's check (the names are mergekit's to list) and is refused before the merge;
    a name that is no identifier is refused as the recipe is read."""
    recipe = recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5})], chat_template="chatml")
    parse_recipe(recipe)
    assert refused(recipe, tmp_path).endswith(
        "chat_template 'chatml' is one of mergekit's named templates; install mergekit to use it, or give the "
        "template itself (a Jinja string) or 'auto'")
    recipe["chat_template"] = "chat ml"
    assert "neither a template name, 'auto' nor a Jinja template" in refused(recipe, tmp_path)


@pytest.mark.parametrize("template", [JINJA, "auto"])
def test_without_mergekit_a_jinja_template_or_auto_works(family, tmp_path, no_mergekit, template):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5})],
                                             chat_template=template), sort_keys=False))
    result = CliRunner().invoke(main, ["-q", "merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    expected = JINJA if template == JINJA else FT1_TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == expected


# ----------------------------------------------------------------------------- our paths agree


def test_lean_path_and_one_tensor_at_a_time(family, tmp_path, monkeypatch, lean):  # noqa: F811
    """Block by block (embeddings read a few rows at a time in the output vocabulary) gives the whole
    path's bits, and no input's tensor is read while another of its tensors is held."""
    recipe = parse_recipe(recipe_of(family, "ties", [("ft1", {"weight": 0.5, "density": 0.5}),
                                                     ("ft2", {"weight": 0.7, "density": 0.5}),
                                                     ("ft3", {"weight": 0.4, "density": 0.5})],
                                    tokenizer_source="union"))
    merge(recipe, tmp_path / "lean", progress=False)
    monkeypatch.undo()
    reads = track_reads(monkeypatch)
    merge(recipe, tmp_path / "whole", progress=False)
    assert reads
    lean_out, whole = tensors(tmp_path / "lean"), tensors(tmp_path / "whole")
    assert all(torch.equal(lean_out[name], whole[name]) for name in whole)
    assert whole["lm_head.weight"].shape == (99, 32)


def test_default_rows_follow_mergekit_rule():
    """Three inputs (the base is input 2) over five output tokens."""
    permutations = [[0, 1, MISSING, MISSING, 4],
                    [0, MISSING, 5, MISSING, MISSING],
                    [0, 1, MISSING, MISSING, 3]]
    defaults, forced = default_rows(permutations, {}, base=2)
    assert forced == frozenset()
    assert defaults == {1: DefaultRow(((2, 1),)),  # the base has it
                        2: DefaultRow(((1, 5),)),  # one input has it
                        3: DefaultRow(()),  # none has it: zeros
                        4: DefaultRow(((2, 3),))}
    defaults, _ = default_rows(permutations, {}, base=None)
    assert defaults[1] == DefaultRow(((0, 1), (2, 1)), average=True)
    defaults, forced = default_rows(permutations, {0: TokenRule(input=1, row=7, force=True)}, base=2)
    assert forced == {0} and defaults[0] == DefaultRow(((1, 7),))
    rows = torch.arange(12.0).reshape(6, 2)
    block = permuted_block(lambda a, b: rows[a:b], [0, 1, MISSING, 4, 5], 0, 6, {2: torch.tensor([-1.0, -1.0])},
                           frozenset(), (2,), torch.float32, pad=torch.tensor([9.0, 9.0]))
    assert block.tolist() == [[0, 1], [2, 3], [-1, -1], [8, 9], [10, 11], [9, 9]]


# ----------------------------------------------------------------------------- refusals


def refused(recipe: dict, tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(main, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    lines = result.output.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1
    return lines[-1]


@pytest.mark.parametrize("keys, message", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"tokenizer": {"sources": "union"}}, "unknown key 'tokenizer.sources'; did you mean 'source'?"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "copy"}}}}}, "kind model_token or zero"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "FT1"}}}}},
     "one of token_id or token"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "FT1", "token": "w3",
                                                  "token_id": 3}}}}}, "one of token_id or token"),
    ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, "give a source"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "/elsewhere/model"}}}}, "none of the recipe's models"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"chat_template": "{{ x }}"}, "neither a template name, 'auto' nor a Jinja template"),
])
def test_bad_tokenizer_sections_are_refused_in_one_line(family, tmp_path, keys, message):
    keys = json.loads(json.dumps(keys).replace('"FT1"', json.dumps(family["ft1"])))
    recipe = recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5})], **keys)
    assert message in refused(recipe, tmp_path)


@pytest.mark.parametrize("keys, message", [
    ({}, "set tokenizer_source: union"),  # a resized vocabulary without an output vocabulary
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "FT2", "token": "nope"}}}}},
     "'nope' is not in"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "FT2", "token_id": 99}}}}},
     "outside its source model's 99 rows"),
    ({"tokenizer": {"tokens": {"<tool>": {"source": "FT1"}}}}, "its source model has no such token"),
    ({"tokenizer_source": "union", "sparsify": {"score": "wanda", "activations": "finetuned"}},
     "use activations: base"),
])
def test_inputs_that_do_not_fit_the_section_are_refused(family, tmp_path, keys, message):
    keys = json.loads(json.dumps(keys).replace('"FT1"', json.dumps(family["ft1"]))
                      .replace('"FT2"', json.dumps(family["ft2"])))
    recipe = recipe_of(family, "task_arithmetic", [("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.5})], **keys)
    assert message in refused(recipe, tmp_path)
