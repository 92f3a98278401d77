"""Memory-bounded passes: low-memory pruning and merging give the in-memory results; accelerate placement too."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from wandamerge import loaders as streaming
from wandamerge.cli import main
from wandamerge.jobs.merge import merge
from wandamerge.models import ModelError
from wandamerge.jobs.prune import prune_to_directory
from wandamerge.pruning import prune
from wandamerge.recipe import parse_recipe

from conftest import VOCAB, tiny_model
from test_merge_end_to_end import finetune_of, save, tensors

SETTINGS = {
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
    "wanda-parallel-update": dict(method="wanda", sparsity=0.5, update=True, within_block="parallel", batch_size=2),
    "dsnot-2:4": dict(method="dsnot", pattern="2:4"),  # the inputs' means and variances from the streamed pass
    "dsnot-guarded-70": dict(method="dsnot-guarded", sparsity=0.7),
}


def pruned(src: Path, out: Path, calib: Path, **kwargs) -> dict:
    return prune_to_directory(str(src), out, calib=str(calib), nsamples=4, seqlen=16, progress=False, **kwargs)


def assert_same_model(a: Path, b: Path) -> None:
    """Same tensors bit for bit, same config files, same logits on reload."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    for file in ("config.json", "generation_config.json"):
        assert json.loads((a / file).read_text()) == json.loads((b / file).read_text()), file
    windows = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(a).eval()(windows).logits
        lb = AutoModelForCausalLM.from_pretrained(b).eval()(windows).logits
    assert torch.equal(la, lb)


CASES = [(arch, setting) for arch in ("llama", "gpt2") for setting in SETTINGS] + [
    (arch, setting) for arch in ("opt", "gpt_neox") for setting in ("wanda-50", "sparsegpt-2:4")]


@pytest.mark.parametrize("arch, setting", CASES)
def test_low_memory_prune_equals_in_memory_prune(model_dir, text_file, tmp_path, arch, setting):
    src = model_dir(arch)
    plain = pruned(src, tmp_path / "plain", text_file, low_memory=False, **SETTINGS[setting])
    low = pruned(src, tmp_path / "low", text_file, low_memory=True, max_shard_size="20KB", **SETTINGS[setting])
    assert_same_model(tmp_path / "plain", tmp_path / "low")
    assert low["sparsity"] == plain["sparsity"]
    assert low["settings"]["low_memory"] is True and plain["settings"]["low_memory"] is False
    saved = json.loads((tmp_path / "low" / "wandamerge.json").read_text())
    assert saved["settings"]["low_memory"] is True and set(saved["seconds"]) >= {"load", "prune", "save"}
    names = {p.name for p in (tmp_path / "low").iterdir()}
    assert {"README.md", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".low")]  # staged, then renamed


def test_only_one_block_is_in_memory_at_a_time(model_dir):
    src = model_dir("llama")
    model = streaming.StreamedModel(src)
    loader = model.loader()
    resident = []

    def materialized(module):
        return any(p.device.type != "meta" for p in module.parameters())

    def visit_check(index, block):
        resident.append([i for i, b in enumerate(model.blocks) if materialized(b)])
        assert not materialized(model.model.get_input_embeddings())  # dropped after the catch

    original = loader.load
    loader.load = lambda index, block: (original(index, block), visit_check(index, block))
    windows = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    prune(model.model, windows, method="wanda", loader=loader, progress=False)
    assert resident == [[0], [1]]
    assert not any(p.device.type != "meta" for p in model.model.parameters())


@pytest.fixture
def family(tmp_path):
    base = tiny_model("llama")
    return {"base": save(base, tmp_path / "base"),
            **{f"ft{i}": save(finetune_of(base, seed=i), tmp_path / f"ft{i}") for i in (1, 2)}}


def test_low_memory_wanda_merge_equals_in_memory(family, tmp_path):
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.save(windows, tmp_path / "calib.pt")
    torch.save(windows[:2, :8] + 1, tmp_path / "own.pt")  # ft2's own calibration (task activations)
    for activations in ("base", "finetuned"):
        recipe = parse_recipe({
            "merge_method": "ties", "base_model": str(family["base"]),
            "models": [{"model": str(family[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.3},
                        **({"calibration": {"data": str(tmp_path / "own.pt"), "nsamples": 2, "seqlen": 8}}
                           if i == 2 else {})} for i in (1, 2)],
            "sparsify": {"score": "wanda", "activations": activations},
            "calibration": {"data": str(tmp_path / "calib.pt"), "nsamples": 4, "seqlen": 16}})
        plain = merge(recipe, tmp_path / f"plain-{activations}", progress=False, low_memory=False)
        low = merge(recipe, tmp_path / f"low-{activations}", progress=False, low_memory=True)
        assert low["calibration"]["low_memory"] and not plain["calibration"]["low_memory"]
        assert low["per_tensor"] == plain["per_tensor"] and low["fallbacks"] == plain["fallbacks"]
        a, b = tensors(tmp_path / f"plain-{activations}"), tensors(tmp_path / f"low-{activations}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), activations


def test_wanda_merge_streams_by_itself_when_the_base_would_not_fit(family, tmp_path, monkeypatch):
    torch.save(torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)), tmp_path / "calib.pt")
    recipe = parse_recipe({
        "merge_method": "ties", "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}],
        "sparsify": {"score": "wanda"},
        "calibration": {"data": str(tmp_path / "calib.pt"), "nsamples": 2, "seqlen": 8}})
    monkeypatch.setattr(streaming, "available_memory", lambda: 10_000)
    assert merge(recipe, tmp_path / "auto", progress=False)["calibration"]["low_memory"] is True
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**12)
    assert merge(recipe, tmp_path / "roomy", progress=False)["calibration"]["low_memory"] is False


@pytest.mark.parametrize("available, expected", [(10_000, True), (10**12, False)])
def test_low_memory_switches_on_when_the_model_would_not_fit(model_dir, text_file, tmp_path, monkeypatch,
                                                             caplog, available, expected):
    monkeypatch.setattr(streaming, "available_memory", lambda: available)
    src = model_dir("llama")
    with caplog.at_level(logging.INFO, logger="wandamerge.loaders"):
        record = pruned(src, tmp_path / "out", text_file)
    assert record["settings"]["low_memory"] is expected
    assert ("low-memory mode" in caplog.text) is expected
    # perplexity needs the whole model: no automatic switch then, and a refusal when asked for
    assert pruned(src, None, text_file, eval_ppl=str(text_file))["settings"]["low_memory"] is False
    with pytest.raises(ValueError, match="perplexity needs the whole model"):
        pruned(src, tmp_path / "x", text_file, eval_ppl=str(text_file), low_memory=True)


def test_loaded_size_counts_the_dtype_the_model_is_loaded_in(model_dir):
    src = model_dir("llama")
    size32 = streaming.loaded_size(src, torch.float32)
    assert size32 == sum(p.stat().st_size for p in src.glob("*.safetensors")) - _header_bytes(src)
    assert streaming.loaded_size(src, torch.bfloat16) == size32 // 2


def _header_bytes(path: Path) -> int:
    total = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as handle:
            total += 8 + int.from_bytes(handle.read(8), "little")
    return total


def test_low_memory_refuses_what_it_cannot_read(tmp_path, text_file):
    (tmp_path / "in").mkdir()
    gguf = tmp_path / "in" / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="low-memory mode reads a local transformers directory"):
        streaming.StreamedModel(tmp_path)
    with pytest.raises(ModelError, match="low-memory mode reads a local transformers directory"):
        prune_to_directory(str(gguf), tmp_path / "out", low_memory=True, calib=str(text_file))
    with pytest.raises(ValueError, match="give an output directory"):
        prune_to_directory(str(gguf), None, low_memory=True)


def test_cli_low_memory_prune(model_dir, text_file, tmp_path):
    src = model_dir("mistral")
    args = ["-q", "prune", str(src), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16",
            "--method", "sparsegpt", "--pattern", "2:4"]
    for tag, flag in (("low", "--low-memory"), ("plain", "--no-low-memory")):
        result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / tag), flag])
        assert result.exit_code == 0, result.output
    assert_same_model(tmp_path / "plain", tmp_path / "low")


DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.mark.parametrize("device_map", ["cpu", "disk"])
@pytest.mark.parametrize("setting", ["wanda-50", "sparsegpt-2:4", "wanda-parallel-update"])
def test_device_map_on_cpu_equals_plain(model_dir, text_file, tmp_path, device_map, setting):
    import hashlib

    src = model_dir("llama")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")}
    mapping = DISK_MAP if device_map == "disk" else "cpu"
    plain = pruned(src, tmp_path / "plain", text_file, eval_ppl=str(text_file), eval_windows=2, **SETTINGS[setting])
    placed = pruned(src, tmp_path / "placed", text_file, eval_ppl=str(text_file), eval_windows=2,
                    device_map=mapping, offload_folder=str(tmp_path / "offload"), **SETTINGS[setting])
    assert_same_model(tmp_path / "plain", tmp_path / "placed")
    assert placed["perplexity"] == plain["perplexity"]
    assert placed["settings"]["device_map"] == mapping
    # the disk index pointed into the input's shards: pruned weights went to the offload folder instead
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")} == before


def test_cli_device_map_json(model_dir, text_file, tmp_path):
    src = model_dir("llama")
    args = ["-q", "prune", str(src), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16"]
    assert CliRunner().invoke(main, [*args, "-o", str(tmp_path / "plain")]).exit_code == 0
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "placed"), "--device-map", json.dumps(DISK_MAP),
                                       "--offload-folder", str(tmp_path / "offload")])
    assert result.exit_code == 0, result.output
    assert_same_model(tmp_path / "plain", tmp_path / "placed")
    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "bad"), "--device-map", "{nope"])
    assert bad.exit_code == 2 and "not valid JSON" in bad.output
