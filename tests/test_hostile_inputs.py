"""Hostile and broken input: every case gives one line naming the problem and what to do,
exit status 2, no traceback, and changes nothing on disk.

Cases already covered elsewhere are not repeated here: tests/test_cli.py (missing model, a directory
that is not a model, --sparsity 1.5, --pattern 4:2 and 2:5, --nsamples 0, an unknown --calib source,
an existing output, an output inside the input model of a prune) and tests/test_merge_end_to_end.py
(a resized vocabulary, a truncated merge input, recipe errors at the parse level, same recipe twice
gives the same tensors, merge inputs unchanged, same seed same pruned tensors).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

from wandamerge.cli import main
from wandamerge.recipe import MergeRecipe, RecipeError, SlicesRecipe, parse_recipe

from conftest import VOCAB, random_text, tiny_model, word_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with the sha256 of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(*args) -> "CliRunner.Result":
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def refused(result, *words: str) -> str:
    """Exit 2 and one line ``error: ...`` naming every word, last in the output; returns the line.

    Progress bars (transformers' "Loading weights", ours) may come before it; nothing else does.
    """
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.output
    assert all("it/s]" in line or "s/it]" in line for line in lines[:-1]), result.output
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


def refuses_and_changes_nothing(root: Path, args, *words: str) -> str:
    before = snapshot(root)
    line = refused(cli(*args), *words)
    assert snapshot(root) == before, "the refused run changed files on disk"
    return line


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def write_recipe(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def ties(base, *models, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models], **extra}


@pytest.fixture
def work(tmp_path):
    """A base llama, a fine-tune of it, and a calibration text, all under one root."""
    base = tiny_model("llama")
    paths = {"root": tmp_path, "base": save(base, tmp_path / "base"), "out": tmp_path / "out"}
    ft = tiny_model("llama", seed=1)
    paths["ft"] = save(ft, tmp_path / "ft")
    paths["text"] = tmp_path / "calib.txt"
    paths["text"].write_text(random_text(2000, seed=1))
    return paths


def prune_args(work, *extra, model=None):
    return ["prune", model or work["base"], "-o", work["out"], "--calib", work["text"], "--nsamples", 2,
            "--seqlen", 8, *extra]


# ----------------------------------------------------------------------------- models that cannot be read


def test_merge_input_that_does_not_exist(work):
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["root"] / "no-such-model"))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "no-such-model",
                                "does not exist", "check the path")


def test_merge_input_directory_that_is_not_a_model(work):
    (work["root"] / "notes").mkdir()
    (work["root"] / "notes" / "todo.txt").write_text("buy milk")
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["root"] / "notes"))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "notes",
                                "not a transformers model directory", "holds config.json")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "json-header-not-a-table"])
def test_prune_refuses_a_damaged_shard(work, damage):
    shard = work["base"] / "model.safetensors"
    data = shard.read_bytes()
    if damage == "garbage":
        shard.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    elif damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:
        header = b"[1, 2, 3]"
        shard.write_bytes(len(header).to_bytes(8, "little") + header)
    line = refuses_and_changes_nothing(work["root"], prune_args(work), "model.safetensors")
    assert "corrupt" in line or "truncated" in line
    assert "again" in line  # what to do: download or save it again


def test_merge_refuses_a_shard_of_garbage_and_a_config_of_garbage(work):
    (work["ft"] / "model.safetensors").write_bytes(os.urandom(100) + b"\xff" * 8)
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["ft"]))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "ft/model.safetensors",
                                "corrupt")
    (work["base"] / "config.json").write_text("{not json")
    line = refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "config.json",
                                       "not valid JSON")
    assert str(work["base"]) in line


def test_unsupported_architecture_is_refused_before_its_weights_are_read(work, monkeypatch):
    from transformers import AutoModelForCausalLM as Auto

    bloom = save(AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1,
                                                              n_head=2)), work["root"] / "bloom")

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Auto, "from_pretrained", no_load)
    line = refuses_and_changes_nothing(work["root"], prune_args(work, model=bloom), "'bloom'",
                                       "unsupported architecture")
    assert "llama" in line  # names the supported ones
    recipe = write_recipe(work["root"] / "r.yaml", ties(bloom, bloom))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "'bloom'", "unsupported")


# ----------------------------------------------------------------------------- merge inputs that do not fit


def test_merge_input_of_another_architecture(work):
    gpt2 = save(tiny_model("gpt2"), work["root"] / "gpt2")
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], gpt2))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "gpt2", "model_type",
                                "does not fit the base", "fine-tunes of the same base")


def test_merge_input_of_other_shapes(work):
    wider = save(AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)), work["root"] / "wider")
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], wider))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "wider", "intermediate_size",
                                "48", "64")


def lora_of(model, path: Path, base_name: str | None = None) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "up_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(path)
    if base_name is not None:
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_lora_adapter_made_for_a_base_of_other_shapes(work):
    other_base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    lora = lora_of(other_base, work["root"] / "lora", base_name="org/wider-llama")
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], lora))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "lora",
                                "made for another base", "org/wider-llama")


def test_lora_adapter_made_for_another_architecture(work):
    from peft import LoraConfig, get_peft_model

    gpt2 = tiny_model("gpt2")
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)).save_pretrained(
        work["root"] / "gpt2-lora")
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["root"] / "gpt2-lora"))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "gpt2-lora",
                                "c_attn", "made for another base")


# ----------------------------------------------------------------------------- recipes, before any model loads


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a merge input is opened or a model loaded."""
    import wandamerge.io.adapters as adapters
    import wandamerge.jobs.merge as merge_module
    import wandamerge.jobs.merge_inputs as inputs
    import wandamerge.models as models

    calls = []

    def forbidden(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called before the recipe was validated")
        return fn

    for module, name in [(merge_module, "merge"), (merge_module, "load_model"), (merge_module, "open_input"),
                         (merge_module, "local_model_dir"), (models, "load_model"), (adapters, "open_input"),
                         (inputs, "local_model_dir"), (inputs, "open_input"), (models, "local_model_dir")]:
        monkeypatch.setattr(module, name, forbidden(name))
    return calls


RECIPE_CASES = {
    "not YAML": ("merge_method: ties\nmodels: [ {model: a\n", ["not valid YAML", "line"]),
    "not UTF-8": (b"merge_method: \xff\xfe ties\n", ["not UTF-8"]),
    "not a mapping": ("- ties\n- a\n", ["a recipe is a YAML mapping"]),
    "empty": ("", ["a recipe is a YAML mapping"]),
    "unknown top-level key": ({"merge_methd": "ties", "base_model": "b", "models": [{"model": "m"}]},
                              ["unknown key 'merge_methd'", "did you mean 'merge_method'"]),
    "unknown key in calibration": ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
                                    "calibration": {"nsample": 4}}, ["calibration.nsample", "'nsamples'"]),
    "unknown method": ({"merge_method": "dare_tie", "base_model": "b", "models": [{"model": "m"}]},
                       ["unknown merge_method 'dare_tie'", "did you mean 'dare_ties'"]),
    "unknown score": ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
                       "sparsify": {"score": "magnitud"}}, ["did you mean 'magnitude'"]),
    "models not a list": ({"merge_method": "ties", "base_model": "b", "models": "m"}, ["models", "list"]),
    "model entry not a mapping": ({"merge_method": "ties", "base_model": "b", "models": ["m"]},
                                  ["models.0", "model"]),
    "nsamples not a number": ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
                               "calibration": {"nsamples": "many"}}, ["calibration.nsamples", "integer"]),
    "missing base model": ({"merge_method": "dare_ties", "models": [{"model": "m"}]},
                           ["'dare_ties' needs a base_model"]),
    "missing models": ({"merge_method": "ties", "base_model": "b"}, ["missing required key 'models'"]),
    "weight a word": ({"merge_method": "ties", "base_model": "b",
                       "models": [{"model": "m", "parameters": {"weight": "half"}}]}, ["'weight'", "number", "'half'"]),
    "weight true": ({"merge_method": "ties", "base_model": "b",
                     "models": [{"model": "m", "parameters": {"weight": True}}]}, ["'weight'", "number"]),
    "weight null": ({"merge_method": "ties", "base_model": "b",
                     "models": [{"model": "m", "parameters": {"weight": None}}]}, ["'weight'", "number"]),
    "weight a mapping": ({"merge_method": "ties", "base_model": "b",
                          "models": [{"model": "m", "parameters": {"weight": {"heavy": 1}}}]}, ["'weight'"]),
    "weight NaN": ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters: {weight: .nan}\n",
                   ["'weight'", "finite"]),
    "weight Inf in a gradient": ({"merge_method": "ties", "base_model": "b",
                                  "models": [{"model": "m", "parameters": {"weight": [0.1, math.inf]}}]},
                                 ["'weight'", "finite"]),
    "density out of range": ({"merge_method": "ties", "base_model": "b",
                              "models": [{"model": "m", "parameters": {"weight": 1, "density": 1.5}}]},
                             ["density", "(0, 1]"]),
    "rescale misspelt": ({"merge_method": "ties", "base_model": "b", "parameters": {"rescale": "gramm"},
                          "models": [{"model": "m"}]}, ["'rescale'", "did you mean 'gram'"]),
    "election misspelt": ({"merge_method": "ties", "base_model": "b", "parameters": {"election": "activations"},
                           "models": [{"model": "m"}]}, ["'election'", "did you mean 'activation'"]),
    "regmean alpha out of range": ({"merge_method": "regmean", "base_model": "b", "parameters": {"alpha": 2},
                                    "models": [{"model": "m"}]}, ["alpha", "[0, 1]"]),
    "own calibration unused": ({"merge_method": "ties", "base_model": "b",
                                "models": [{"model": "m", "calibration": {"data": "wiki"}}]},
                               ["own calibration", "reads none"]),
    "aim without a base": ({"merge_method": "linear", "aim": {"omega": 0.4}, "models": [{"model": "m"}]},
                           ["aim", "base_model"]),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_errors_are_one_line_before_any_model_loads(tmp_path, no_loading, case):
    data, words = RECIPE_CASES[case]
    recipe = tmp_path / "r.yaml"
    if isinstance(data, bytes):
        recipe.write_bytes(data)
    else:
        write_recipe(recipe, data)
    refuses_and_changes_nothing(tmp_path, ["merge", recipe, "-o", tmp_path / "out"], *words)
    assert no_loading == []


def test_debug_shows_the_traceback_instead(tmp_path, no_loading):
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "tiez", "base_model": "b", "models": [{"model": "m"}]})
    result = CliRunner().invoke(main, ["--debug", "merge", str(recipe), "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, RecipeError) and "did you mean 'ties'" in str(result.exception)
    assert result.exit_code == 1 and not (tmp_path / "out").exists()


def test_recipe_that_is_missing_or_a_directory(tmp_path, no_loading):
    refused(cli("merge", tmp_path / "nope.yaml", "-o", tmp_path / "out"), "nope.yaml", "does not exist")
    refused(cli("merge", tmp_path, "-o", tmp_path / "out"), str(tmp_path), "not a file")
    assert no_loading == []


# ----------------------------------------------------------------------------- prune settings


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "-0.1"], ["sparsity -0.1", "[0, 1)"]),
    (["--sparsity", "1"], ["sparsity 1.0", "[0, 1)"]),
    (["--sparsity", "nan"], ["sparsity nan", "[0, 1)"]),
    (["--pattern", "2-4"], ["'2-4'", "N:M", "2:4"]),
    (["--pattern", "two:four"], ["'two:four'", "N:M"]),
    (["--pattern", "4:4"], ["'4:4'", "0 < N < M"]),
    (["--pattern", "0:4"], ["'0:4'", "0 < N < M"]),
    (["--pattern", "3:12"], ["divisible by 12", "inputs"]),
    (["--nsamples", "-3"], ["nsamples must be positive", "-3"]),
    (["--seqlen", "0"], ["seqlen must be positive", "0"]),
    (["--seqlen", "-8"], ["seqlen must be positive", "-8"]),
    (["--batch-size", "-1"], ["batch size must be positive", "-1"]),
])
def test_bad_prune_settings(work, args, words):
    refuses_and_changes_nothing(work["root"], prune_args(work, *args), *words)


def test_bad_settings_are_refused_before_the_model_loads(work, monkeypatch):
    import wandamerge.jobs.prune as prune_job

    monkeypatch.setattr(prune_job, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for args in (["--sparsity", "2"], ["--pattern", "2-4"], ["--seqlen", "0"], ["--batch-size", "0"]):
        refused(cli(*prune_args(work, *args)))


def test_calibration_text_shorter_than_asked_says_how_many_tokens(work):
    work["text"].write_text("w5 w6 w7 w8 w9 w10 w11")
    refuses_and_changes_nothing(work["root"], prune_args(work), "has 7 tokens", "need at least 9",
                                "longer text or a smaller seqlen")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights_is_refused_naming_the_tensor(work, value):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    save(model, work["root"] / "broken")
    refuses_and_changes_nothing(work["root"], prune_args(work, model=work["root"] / "broken"),
                                "model.layers.1.mlp.up_proj.weight", "NaN or Inf")
    # magnitude pruning needs no calibration: it is refused too
    refuses_and_changes_nothing(work["root"], prune_args(work, "--method", "magnitude",
                                                         model=work["root"] / "broken"),
                                "model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_activations_that_overflow_are_refused_naming_block_and_layer(work, order):
    model = tiny_model("llama")
    with torch.no_grad():  # finite weights whose outputs overflow float32 in block 1's attention
        model.model.layers[1].input_layernorm.weight.fill_(1e30)
    save(model, work["root"] / "hot")
    refuses_and_changes_nothing(work["root"], prune_args(work, "--within-block", order, model=work["root"] / "hot"),
                                "block 1", "self_attn.q_proj", "not finite", "check the weights of blocks 0 to 1")


def test_activations_that_overflow_float16_suggest_float32(work):
    model = tiny_model("llama")
    with torch.no_grad():  # representable in float16, but the attention scores made from it are not
        model.model.layers[1].input_layernorm.weight.fill_(6e4)
    save(model, work["root"] / "warm")
    refuses_and_changes_nothing(work["root"], prune_args(work, "--dtype", "float16", model=work["root"] / "warm"),
                                "block 1", "not finite", "--dtype float32")
    assert cli(*prune_args(work, model=work["root"] / "warm")).exit_code == 0  # and float32 indeed copes


# ----------------------------------------------------------------------------- outputs


def test_merge_output_that_exists_is_refused_unless_overwrite(work):
    work["out"].mkdir()
    (work["out"] / "keep.txt").write_text("mine")
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["ft"]))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], str(work["out"]),
                                "already exists", "--overwrite")
    # --overwrite never deletes a directory of other files, only an earlier output
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"], "--overwrite"],
                                "holds other files (keep.txt)", "remove it yourself")
    (work["out"] / "keep.txt").unlink()
    assert cli("merge", recipe, "-o", work["out"]).exit_code == 2
    assert cli("merge", recipe, "-o", work["out"], "--overwrite").exit_code == 0
    assert (work["out"] / "config.json").is_file()
    assert cli("merge", recipe, "-o", work["out"], "--overwrite").exit_code == 0  # replaces the earlier merge


def test_merge_output_inside_an_input_model_is_refused(work):
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["ft"]))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["ft"] / "merged"], "inside the input model",
                                str(work["ft"]))


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_prune_on_a_full_disk_says_so_and_leaves_nothing(work, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    def half_then_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial shard, then the disk is full
        enospc()

    monkeypatch.setattr(modeling_utils, "safe_save_file", half_then_full)
    out = work["root"] / "deep" / "er" / "out"
    before = snapshot(work["root"])
    line = refused(cli("prune", work["base"], "-o", out, "--calib", work["text"], "--nsamples", 2, "--seqlen", 8),
                   "disk is full", str(out.parent))
    assert snapshot(work["root"]) == before, line  # not even the parent directories are left


def test_merge_on_a_full_disk_says_so_and_leaves_nothing(work, monkeypatch):
    from wandamerge.io.safetensors import ShardWriter

    original = ShardWriter.add
    count = {"n": 0}

    def add(self, name, tensor):
        count["n"] += 1
        if count["n"] == 5:
            enospc()
        return original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)
    recipe = write_recipe(work["root"] / "r.yaml", ties(work["base"], work["ft"]))
    refuses_and_changes_nothing(work["root"], ["merge", recipe, "-o", work["out"]], "disk is full",
                                str(work["root"]))
    assert count["n"] == 5


# ----------------------------------------------------------------------------- killed runs


# Imports once, then forks one child per moment (no child pays for importing torch and transformers);
# prints "PID MOMENT" per child and reaps them all. Each child runs `wandamerge prune` and, at its
# moment, writes its marker file and stalls until the test kills it with SIGKILL.
FORKER = Path(__file__).parent / "programs" / "prune_forker.py"



def complete_model(out: Path) -> bool:
    model = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "wandamerge.json").read_text())["job"] == "prune"
    return model.model.layers[0].mlp.down_proj.weight.eq(0).float().mean().item() == pytest.approx(0.5)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it had finished and been reaped
        pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed runs are forked from one process")
def test_a_killed_prune_leaves_nothing_or_a_whole_model(work):
    """SIGKILL at several moments: the output is absent or complete; stale temp dirs go on the next run."""
    moments = ["random", "random", "mid-shard", "before-rename", "after-rename"]
    jobs = []
    for i, moment in enumerate(moments):
        root = work["root"] / f"run{i}"
        root.mkdir()
        jobs.append((moment, str(root), ["prune", str(work["base"]), "-o", str(root / "out"), "--calib",
                                         str(work["text"]), "--nsamples", "2", "--seqlen", "8"]))
    forker = subprocess.Popen([sys.executable, str(FORKER), json.dumps(jobs)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    rng = random.Random(1)
    pending = {}
    try:
        for moment, root, _ in jobs:
            pid = int(forker.stdout.readline().split()[0])
            pending[pid] = (moment, Path(root), time.monotonic() + rng.uniform(0.0, 2.0))
        started = dict(pending)
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for pid, (moment, root, kill_at) in list(pending.items()):
                due = (root / "marker").exists() if moment != "random" else time.monotonic() >= kill_at
                finished = (root / "out" / "wandamerge.json").exists() and moment == "random"
                if due or finished:
                    kill(pid)
                    del pending[pid]
            time.sleep(0.02)
        assert not pending, f"runs that never reached their moment: {pending}"
        forker.wait(timeout=60)  # it reaps its killed children
    finally:
        for pid in pending:
            kill(pid)
        if forker.poll() is None:
            forker.kill()
    for pid, (moment, root, _) in started.items():
        out = root / "out"
        if moment in ("mid-shard", "before-rename"):
            assert (root / "marker").exists() and not out.exists(), moment
        if moment == "after-rename":
            assert (root / "marker").exists() and out.exists(), moment
        if out.exists():
            assert complete_model(out), moment
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".out.")]
        assert all(name.startswith(f".out.partial-{pid}@") for name in leftovers), leftovers  # clearly named
        # the next run into the same place succeeds and clears what the killed one left behind
        result = cli("prune", work["base"], "-o", out, "--calib", work["text"], "--nsamples", 2, "--seqlen", 8,
                     "--overwrite")
        assert result.exit_code == 0, result.output
        assert complete_model(out)
        assert [p.name for p in root.iterdir() if p.name.startswith(".out.")] == [], moment


def test_a_running_jobs_temp_dir_is_not_taken_for_a_stale_one(work):
    from wandamerge.io.staging import staged_output

    out = work["root"] / "shared-out"
    with staged_output(out) as first:  # this process is alive: its temp dir must survive a second run
        (first / "x").write_text("1")
        with staged_output(work["root"] / "shared-out", overwrite=True) as second:
            assert first.is_dir() and first != second
            (second / "y").write_text("2")
        assert first.is_dir()
    assert (out / "x").exists() and not (out / "y").exists()


# ----------------------------------------------------------------------------- inputs stay as they were


def test_prune_leaves_its_inputs_untouched_and_is_bit_identical(work):
    inputs = {k: snapshot(work[k]) for k in ("base",)}
    text = hashlib.sha256(work["text"].read_bytes()).hexdigest()
    outs = []
    for tag in ("a", "b"):
        out = work["root"] / tag
        assert cli("prune", work["base"], "-o", out, "--calib", work["text"], "--nsamples", 2, "--seqlen", 8,
                   "--seed", 7).exit_code == 0
        outs.append((out / "model.safetensors").read_bytes())
    assert {k: snapshot(work[k]) for k in ("base",)} == inputs
    assert hashlib.sha256(work["text"].read_bytes()).hexdigest() == text
    assert outs[0] == outs[1]  # byte for byte, not only equal tensors


def test_merge_with_a_lora_input_leaves_inputs_untouched_and_is_bit_identical(work):
    lora = lora_of(AutoModelForCausalLM.from_pretrained(work["base"]), work["root"] / "lora")
    before = {k: snapshot(p) for k, p in (("base", work["base"]), ("ft", work["ft"]), ("lora", lora))}
    recipe = write_recipe(work["root"] / "r.yaml", {**ties(work["base"], work["ft"], lora), "merge_method": "dare_ties"})
    outs = []
    for tag in ("a", "b"):
        assert cli("merge", recipe, "-o", work["root"] / tag).exit_code == 0
        outs.append((work["root"] / tag / "model.safetensors").read_bytes())
    assert {k: snapshot(p) for k, p in (("base", work["base"]), ("ft", work["ft"]), ("lora", lora))} == before
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------- random recipes


REAL_KEYS = ["merge_method", "base_model", "models", "model", "parameters", "weight", "density", "gamma",
             "epsilon", "lambda", "normalize", "rescale", "int8_mask", "alpha", "ridge", "election", "aim", "omega",
             "dtype", "out_dtype", "tokenizer_source",
             "sparsify", "score", "group", "pattern", "activations", "calibration", "data", "nsamples", "seqlen",
             "seed", "batch_size", "filter", "value", "slices", "sources", "layer_range", "residual_weight",
             "modules", "default", "t", "scale"]
REAL_VALUES = ["ties", "dare_ties", "linear", "task_arithmetic", "regmean", "wudi", "obim", "sparsegpt", "gram",
               "activation", "wanda", "magnitude", "row", "tensor", "2:4",
               "unstructured", "base", "finetuned", "union", "float32", "bfloat16", "wiki", "*", "mlp"]


@st.composite
def near_miss(draw, words):
    word = draw(st.sampled_from(words))
    edit = draw(st.sampled_from(["same", "drop", "swap", "double", "upper", "suffix"]))
    i = draw(st.integers(0, max(0, len(word) - 2)))
    if edit == "drop":
        return word[:i] + word[i + 1:]
    if edit == "swap" and len(word) > 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    if edit == "upper":
        return word.upper()
    if edit == "suffix":
        return word + draw(st.sampled_from(["s", "_", "2", " "]))
    return word


@st.composite
def mostly(draw, good, bad):
    """``good`` four times in five, else ``bad``."""
    return draw(good) if draw(st.sampled_from(range(5))) else draw(bad)


def real_or_near(words):
    return mostly(st.sampled_from(words), near_miss(words))


keys = st.one_of(near_miss(REAL_KEYS), st.text(max_size=8), st.integers(-3, 3), st.booleans())
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(), st.floats(),
                    st.text(max_size=10), near_miss(REAL_VALUES))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
numbers = mostly(st.one_of(st.floats(0.01, 1), st.lists(st.floats(0.01, 1), min_size=1, max_size=3)),
                 st.one_of(st.floats(), values))
settings_ = mostly(numbers, st.lists(st.fixed_dictionaries({"value": numbers},
                                                              optional={"filter": st.one_of(st.text(max_size=5),
                                                                                            scalars)}),
                                        min_size=1, max_size=2))
parameters = st.dictionaries(real_or_near(REAL_KEYS[5:13]), settings_, max_size=3)
model_entries = mostly(st.fixed_dictionaries({"model": st.sampled_from(["m1", "m2"])},
                                             optional={"parameters": parameters}),
                       st.dictionaries(real_or_near(["model", "parameters"]), values, max_size=2))
plausible = st.fixed_dictionaries(
    {"merge_method": mostly(st.sampled_from(["ties", "dare_ties", "linear", "task_arithmetic"]),
                            st.one_of(near_miss(["ties", "dare_ties", "linear"]), scalars)),
     "models": mostly(st.lists(model_entries, min_size=1, max_size=3), values),
     "base_model": mostly(st.just("b"), scalars)},
    optional={"parameters": parameters,
              "sparsify": st.dictionaries(real_or_near(REAL_KEYS[17:21]), st.one_of(real_or_near(REAL_VALUES), values),
                                          max_size=3),
              "calibration": st.dictionaries(real_or_near(REAL_KEYS[22:27]),
                                             st.one_of(st.integers(-2, 600), values), max_size=3),
              "dtype": st.one_of(real_or_near(REAL_VALUES[13:15]), scalars)})
slice_parameters = st.dictionaries(real_or_near(REAL_KEYS[5:13] + ["t", "scale"]), settings_, max_size=2)
layer_ranges = mostly(st.tuples(st.integers(0, 1), st.integers(2, 3)).map(list),
                      st.one_of(st.lists(st.integers(-1, 5), min_size=2, max_size=2), values))
slice_sources = mostly(st.fixed_dictionaries({"model": st.sampled_from(["m1", "m2", "b"]), "layer_range": layer_ranges},
                                             optional={"parameters": slice_parameters}),
                       st.dictionaries(real_or_near(["model", "layer_range", "parameters"]), values, max_size=3))
output_slices = mostly(st.fixed_dictionaries({"sources": mostly(st.lists(slice_sources, min_size=1, max_size=3),
                                                                values)},
                                             optional={"parameters": slice_parameters,
                                                       "base_model": mostly(st.just("b"), scalars)}),
                       st.dictionaries(real_or_near(["sources", "base_model", "parameters", "residual_weight"]),
                                       values, max_size=3))
slice_lists = mostly(st.lists(output_slices, min_size=1, max_size=3), values)
slice_methods = mostly(st.sampled_from(["passthrough", "slerp", "ties", "linear", "karcher", "task_arithmetic"]),
                       st.one_of(near_miss(["passthrough", "slerp", "ties"]), scalars))
module_bodies = st.one_of(st.fixed_dictionaries({"slices": slice_lists}, optional={"parameters": slice_parameters}),
                          st.fixed_dictionaries({"models": st.lists(model_entries, min_size=1, max_size=2)}))
plausible_slices = st.one_of(
    st.fixed_dictionaries({"merge_method": slice_methods, "slices": slice_lists},
                          optional={"base_model": mostly(st.just("b"), scalars), "parameters": slice_parameters}),
    st.fixed_dictionaries({"merge_method": slice_methods, "modules": mostly(
        st.fixed_dictionaries({"default": mostly(module_bodies, values)}),
        st.dictionaries(real_or_near(["default", "models", "slices"]), values, max_size=2))},
        optional={"base_model": mostly(st.just("b"), scalars), "parameters": slice_parameters,
                  "sparsify": st.dictionaries(real_or_near(REAL_KEYS[17:21]), values, max_size=2)}))
recipes = st.one_of(plausible, plausible, plausible_slices, plausible_slices, values,
                    st.dictionaries(keys, values, max_size=5))


@settings(max_examples=300, deadline=None)
@given(recipes)
def test_random_recipes_are_accepted_or_refused_with_a_recipe_error(data):
    try:
        recipe = parse_recipe(data)
    except RecipeError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()
    else:
        assert isinstance(recipe, (MergeRecipe, SlicesRecipe))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(recipes, st.binary(max_size=60), st.text(max_size=60)))
def test_random_recipes_through_the_cli_never_give_a_traceback(tmp_path_factory, data):
    import wandamerge.jobs.merge as merge_module

    root = tmp_path_factory.mktemp("fuzz")
    path = root / "r.yaml"
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(yaml.safe_dump(data))
    reached = []

    def fake_merge(recipe, out, **kwargs):  # stands in for everything after validation
        reached.append(recipe)
        return {"fallbacks": {}, "score": None, "per_tensor": {}, "seconds": {}}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(merge_module, "merge", fake_merge)
        result = CliRunner().invoke(main, ["-q", "merge", str(path), "-o", str(root / "out")])
    if reached:
        assert result.exit_code == 0, result.output
    else:
        refused(result)


@pytest.mark.parametrize("key", ["none", "list", "str"])
def test_an_unknown_key_spelt_like_a_type_is_named(key):
    """Found by the fuzzer: ``{'none': None}`` lost its key among pydantic's type tags (an IndexError)."""
    with pytest.raises(RecipeError, match=f"unknown key '{key}'"):
        parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}], key: None})
    with pytest.raises(RecipeError, match=f"unknown key 'models.0.{key}'"):
        parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "m", key: 1}]})


def test_a_home_directory_of_no_user_is_a_recipe_error(tmp_path):
    """Found by the fuzzer: ``~0`` names the home of a user that does not exist."""
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": "~0",
                                                "models": [{"model": "~no_such_user_here/m"}]})
    refused(cli("merge", recipe, "-o", tmp_path / "out"), "no home directory", "without ~")


def test_scratch_files_of_a_run_killed_outright_go_with_the_next_run(tmp_path):
    """A merge's spilled Grams (gigabytes for a large model) left by a run killed with SIGKILL, where no cleanup
    can run, are removed by the next run into the same place, as its staging folder is; a live run's are kept."""
    import signal
    import subprocess
    import sys
    import textwrap

    from wandamerge.io.staging import scratch_dir, staged_output

    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from wandamerge.io.staging import scratch_dir
        with scratch_dir(Path({str(out)!r}), "grams") as spill:
            (Path(spill) / "gram.pt").write_bytes(b"0" * 1000)
            print(spill, flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    left = Path(child.stdout.readline().strip())
    assert left.parent == tmp_path and left.name.startswith(f".out.partial-{child.pid}@")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert left.is_dir()  # nothing could clean up
    with scratch_dir(out, "grams") as mine, staged_output(out) as staging:
        (staging / "config.json").write_text("{}")
        assert Path(mine).is_dir()  # this live run's scratch is not taken for a stale one
    assert not left.exists() and out.is_dir()
