"""mergekit-yaml's common flags on ``wandamerge merge``: scripts port by changing the command's name.

``--out-shard-size`` sets the shard size as mergekit reads it (``1B`` is 10^9 bytes), ``--cuda`` is
``--device cuda``, ``--copy-tokenizer/--no-copy-tokenizer`` writes the base's tokenizer or not; the flags
that change nothing here say in one line what wandamerge does instead.
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from wandamerge.cli import MERGEKIT_FLAG_NOTES, main
from wandamerge.io.safetensors import parse_count

from conftest import mergekit_yaml, saved_family, tensors


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A task-arithmetic recipe over a tiny llama base and two fine-tunes, as a file."""
    root = tmp_path_factory.mktemp("flags")
    base, ft1, ft2 = saved_family(root, "llama", finetunes=2)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                                    "models": [{"model": str(ft1), "parameters": {"weight": 0.5}},
                                               {"model": str(ft2), "parameters": {"weight": 0.5}}]}))
    return path


def merge(recipe, out, *flags):
    return CliRunner().invoke(main, ["merge", str(recipe), "-o", str(out), *flags])


def greedy_shards(sizes: list[int], limit: int) -> int:
    """Shards of a writer that starts a new one when the next tensor would pass ``limit`` (mergekit's rule)."""
    count, used = 1, 0
    for size in sizes:
        if used and used + size > limit:
            count, used = count + 1, 0
        used += size
    return count


def test_out_shard_size_sets_the_shard_size_as_mergekit_reads_it(recipe, tmp_path):
    result = merge(recipe, tmp_path / "ours", "--out-shard-size", "20K")
    assert result.exit_code == 0, result.output
    merged = tensors(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    expected = greedy_shards([merged[name].numel() * merged[name].element_size() for name in index], 20_000)
    assert len(files) == expected > 3
    mergekit_yaml(recipe, tmp_path / "theirs", "--no-copy-tokenizer", "--out-shard-size", "20K")
    assert len(list((tmp_path / "theirs").glob("*.safetensors"))) == len(files)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    one = merge(recipe, tmp_path / "one", "--out-shard-size", "1B")  # a billion bytes, not one byte
    assert one.exit_code == 0 and [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]


def test_mergekit_sizes_are_read_as_mergekit_reads_them():
    assert [parse_count(s) for s in ("5B", "500M", "20k", "1234", 7)] == [5 * 10 ** 9, 5 * 10 ** 8, 20_000, 1234, 7]


@pytest.mark.parametrize("flags, message", [
    (["--out-shard-size", "1.5B"], "cannot read the size '1.5B'"),
    (["--out-shard-size", "5B", "--max-shard-size", "2GB"], "give one of them"),
    (["--cuda", "--device", "cpu"], "--cuda means --device cuda"),
])
def test_conflicting_or_unreadable_flags_are_one_line(recipe, tmp_path, flags, message):
    result = merge(recipe, tmp_path / "out", *flags)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_copy_tokenizer_or_not(recipe, tmp_path):
    assert merge(recipe, tmp_path / "copied").exit_code == 0
    assert (tmp_path / "copied" / "tokenizer.json").is_file()
    assert merge(recipe, tmp_path / "bare", "--no-copy-tokenizer").exit_code == 0
    assert not list((tmp_path / "bare").glob("tokenizer*"))
    # a recipe's output vocabulary is written either way, as mergekit writes it
    data = yaml.safe_load(recipe.read_text())
    with_vocabulary = tmp_path / "vocabulary.yaml"
    with_vocabulary.write_text(yaml.safe_dump({**data, "tokenizer_source": "base"}))
    assert merge(with_vocabulary, tmp_path / "built", "--no-copy-tokenizer").exit_code == 0
    assert (tmp_path / "built" / "tokenizer.json").is_file()


def test_flags_without_an_effect_say_what_happens_instead(recipe, tmp_path):
    result = merge(recipe, tmp_path / "out", "--lazy-unpickle", "--allow-crimes", "--low-cpu-memory",
                   "--no-cuda")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {MERGEKIT_FLAG_NOTES[flag]}" for flag in ("lazy_unpickle", "allow_crimes",
                                                                       "low_cpu_memory")]
    quiet = merge(recipe, tmp_path / "quiet", "--no-lazy-unpickle", "--no-allow-crimes", "--no-low-cpu-memory")
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr


def test_cuda_is_device_cuda(recipe, tmp_path, monkeypatch):
    import wandamerge.jobs.merge as job

    seen = {}

    def fake_merge(parsed, out, **settings):
        seen.update(settings)
        return {"score": None, "per_tensor": {}, "fallbacks": {}, "seconds": {}}

    monkeypatch.setattr(job, "merge", fake_merge)
    result = merge(recipe, tmp_path / "out", "--cuda")
    assert result.exit_code == 0, result.output
    assert seen["device"] == "cuda" and f"note: {MERGEKIT_FLAG_NOTES['cuda']}" in result.stderr
    assert merge(recipe, tmp_path / "out", "--cuda", "--device", "cuda").exit_code == 0
