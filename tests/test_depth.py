"""Structured depth pruning: whole decoder blocks removed by ShortGPT's Block Influence, the model saved shallower.

Tiny random models of each supported family, against independent references: the scores by brute force from the
hidden states hooked around every block in a whole-model forward of the unmodified model; the saved model,
loaded by plain ``transformers`` (no project code on that path), against a fresh model of the family built with
fewer blocks and given the kept blocks' tensors under their new indices by hand (logits, and greedy generation
through the KV cache, which finds each block by its new index); worked examples for the pure functions.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, Qwen2Config

from conftest import ARCHS, VOCAB, tiny_model, tiny_moe_model, word_tokenizer
from conftest import model_logits as logits
from conftest import random_windows as windows
from wandamerge.cli import main
from wandamerge.core.depth import block_influence, blocks_to_remove, cosine_sum, removed_blocks
from wandamerge.errors import ConfigError, ModelError
from wandamerge.jobs.prune import prune_to_directory
from wandamerge.models import decoder_blocks
from wandamerge.pruning import DEPTH_SCORES, depth_setup, prune_depth

BLOCKS = 5


def deep_model(arch: str = "llama", seed: int = 0, blocks: int = BLOCKS):
    return tiny_model(arch, seed, num_layers=blocks)


def save_with_tokenizer(model, path):
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def depth_pruned(source, out, calib: torch.Tensor, tmp_path, **settings) -> dict:
    torch.save(calib, tmp_path / "calib.pt")
    return prune_to_directory(str(source), out, structure="depth", calib=str(tmp_path / "calib.pt"), progress=False,
                              **settings)


# ----------------------------------------------------------------------------- pure functions, by hand


def test_cosines_influence_and_the_choice_worked_by_hand():
    before = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    after = torch.tensor([[0.0, 3.0], [2.0, 2.0], [1.0, 0.0]])  # cosines 0, 1, and 0 for the all-zero token
    assert cosine_sum(before, after) == pytest.approx(1.0)
    assert cosine_sum(before, -before[[0, 1, 1]]) == pytest.approx(-2.0)
    assert block_influence(1.0, 4) == 0.75
    assert blocks_to_remove(30, 0.2) == 6 and blocks_to_remove(30, 0.3) == 9 and blocks_to_remove(30, 0.0) == 0
    assert blocks_to_remove(5, 0.1) == 0  # 0.5 block rounds to even
    assert removed_blocks(torch.tensor([0.3, 0.1, 0.2, 0.1]), 2) == [1, 3]
    assert removed_blocks(torch.tensor([0.1, 0.1, 0.5]), 1) == [1]  # a tie: the later block goes
    assert removed_blocks(torch.tensor([0.1, 0.2]), 0) == []
    with pytest.raises(ConfigError, match="at most 3 of 4"):
        blocks_to_remove(4, 0.9)
    with pytest.raises(ConfigError, match="do not pair up"):
        cosine_sum(before, after[:2])


# ----------------------------------------------------------------------------- against independent references


def hooked_influence(model, tokens: torch.Tensor) -> list[float]:
    """Brute force: every block's input and output hidden states hooked in one whole-model forward, then
    1 - the mean over tokens of their cosine similarity."""
    seen = {}

    def hook(module, args, kwargs, output, index):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, (tuple, list)) else output
        seen[index] = torch.nn.functional.cosine_similarity(hidden_in.double(), hidden_out.double(), dim=-1)

    handles = [block.register_forward_hook(lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True)
               for i, block in enumerate(decoder_blocks(model))]
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return [1 - float(seen[i].mean()) for i in range(len(seen))]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_scores_equal_a_brute_force_from_hooked_hidden_states(arch):
    model, calib = deep_model(arch), windows()
    expected = hooked_influence(copy.deepcopy(model), calib)
    report = prune_depth(model, calib, sparsity=0.4, progress=False)
    assert report.scores == pytest.approx(expected, abs=1e-6)
    assert report.removed == sorted(sorted(range(BLOCKS), key=lambda i: expected[i])[:2])


def reference_without(source, removed: list[int]):
    """A fresh model of the family with fewer blocks, given the kept blocks' tensors by hand."""
    original = AutoModelForCausalLM.from_pretrained(source)
    config = copy.deepcopy(original.config)
    kept = [i for i in range(config.num_hidden_layers) if i not in removed]
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    state = {}
    for name, tensor in original.state_dict().items():
        found = re.search(r"\.(layers|h)\.(\d+)\.", name)
        if found is None:
            state[name] = tensor
        elif int(found.group(2)) in kept:
            state[name[:found.start(2)] + str(kept.index(int(found.group(2)))) + name[found.end(2):]] = tensor
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize("arch", ARCHS)
def test_the_saved_model_equals_the_family_built_without_the_removed_blocks(arch, tmp_path):
    source = save_with_tokenizer(deep_model(arch), tmp_path / "source")
    record = depth_pruned(source, tmp_path / "out", windows(), tmp_path, sparsity=0.4)
    assert len(record["depth"]["removed"]) == 2 and record["depth"]["blocks"] == {"before": BLOCKS, "after": 3}
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    reference = reference_without(source, record["depth"]["removed"])
    tokens = windows(seed=7)
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens), rtol=0, atol=1e-5)
    prompt = tokens[:2, :6]
    generated = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)
    assert pruned.config.num_hidden_layers == 3
    assert record["parameters"]["blocks_after"] == record["parameters"]["blocks_before"] * 3 // BLOCKS
    assert record["depth"]["achieved"] == pytest.approx(0.4)


def test_removing_nothing_gives_the_original_logits_after_save_and_reload(tmp_path):
    source = save_with_tokenizer(deep_model(), tmp_path / "source")
    record = depth_pruned(source, tmp_path / "out", windows(), tmp_path, sparsity=0.0)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(source)
    tokens = windows(seed=7)
    assert torch.equal(logits(pruned, tokens), logits(original, tokens))
    assert record["depth"]["removed"] == [] and record["parameters"]["after"] == record["parameters"]["before"]


def test_per_block_attention_types_follow_their_blocks(tmp_path):
    """Qwen2 with sliding-window attention in its upper blocks: ``layer_types`` is cut with the blocks, so each
    kept block keeps its own attention (windows longer than the sliding window make the difference show)."""
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=4, max_window_layers=2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    before = list(model.config.layer_types)
    assert len(set(before)) == 2
    source = save_with_tokenizer(model, tmp_path / "source")
    record = depth_pruned(source, tmp_path / "out", windows(), tmp_path, sparsity=0.5)
    kept = [i for i in range(4) if i not in record["depth"]["removed"]]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert list(pruned.config.layer_types) == [before[i] for i in kept]
    reference = reference_without(source, record["depth"]["removed"])
    tokens = windows(seed=7)
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens), rtol=0, atol=1e-5)


def test_the_python_api_prunes_a_loaded_model_in_place_and_renumbers_the_kept_blocks(tmp_path):
    """In memory, each kept block answers to its new position (its KV-cache slot): greedy generation through a
    static cache (one slot per block of the config) equals the reference's."""
    source = save_with_tokenizer(deep_model(seed=3), tmp_path / "source")  # a seed whose choice moves a block
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    report = prune_depth(model, windows(), sparsity=0.4, progress=False)
    assert report.removed[0] < BLOCKS - 2  # a block before the last ones went: the kept ones moved
    assert len(decoder_blocks(model)) == BLOCKS - 2 == model.config.num_hidden_layers
    assert report.parameters["after"] < report.parameters["before"] and report.bytes["after"] < report.bytes["before"]
    numbers = {(position, module.layer_idx) for position, block in enumerate(decoder_blocks(model))
               for module in block.modules() if getattr(module, "layer_idx", None) is not None}
    assert numbers and all(position == index for position, index in numbers)
    prompt = windows(seed=7)[:2, :6]
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                    cache_implementation="static")
    reference = reference_without(source, report.removed)
    assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))
    assert set(DEPTH_SCORES) == {"bi", "ppl"}


def test_blocks_that_differ_are_refused_before_any_calibration():
    model = tiny_moe_model("qwen2_moe")
    model.config.mlp_only_layers = [1]
    different = AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(ModelError, match="block 1 differs from block 0"):
        depth_setup(different, 0.5)


def test_a_config_that_singles_out_blocks_by_index_is_refused():
    model = deep_model()
    model.config.first_k_dense_replace = 1
    with pytest.raises(ModelError, match="first_k_dense_replace"):
        depth_setup(model, 0.4)


# ----------------------------------------------------------------------------- the command line


def run(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def test_prune_command_removes_blocks_and_records_which(tmp_path):
    source = save_with_tokenizer(deep_model(), tmp_path / "source")
    torch.save(windows(), tmp_path / "calib.pt")
    out = tmp_path / "out"
    result = run("prune", source, "-o", out, "--structure", "depth", "--sparsity", 0.4, "--calib",
                 tmp_path / "calib.pt")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["blocks"] == [BLOCKS, 3] and len(summary["removed_blocks"]) == 2
    record = json.loads((out / "wandamerge.json").read_text())
    assert record["settings"]["structure"] == "depth" and record["settings"]["depth_score"] == "bi"
    assert "method" not in record["settings"] and "width_score" not in record["settings"]
    assert len(record["depth"]["scores"]) == BLOCKS and record["bytes"]["after"] < record["bytes"]["before"]
    assert "depth-pruned to 3 decoder blocks" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("args, message", [
    (["--structure", "depth"], "structure 'depth' needs sparsity"),
    (["--structure", "depth", "--sparsity", 0.4, "--method", "sparsegpt"], "leave out method"),
    (["--depth-score", "bi"], "only structure 'depth' uses depth_score"),
    (["--structure", "depth", "--sparsity", 0.4, "--width-score", "flap"], "only structure 'width' uses"),
    (["--structure", "depth", "--sparsity", 0.4, "--depth-score", "by"], "did you mean 'bi'"),
    (["--structure", "depth", "--sparsity", 0.4, "--low-memory"], "leave out low_memory and device_map"),
    (["--structure", "depth", "--sparsity", 0.95], "can remove at most 4 of 5"),
])
def test_bad_depth_settings_give_one_line_and_exit_2(tmp_path, args, message):
    source = save_with_tokenizer(deep_model(), tmp_path / "source")
    torch.save(windows(), tmp_path / "calib.pt")
    result = run("prune", source, "-o", tmp_path / "out", "--calib", tmp_path / "calib.pt", *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_ppl_scores_equal_the_perplexity_of_the_family_built_without_each_block(arch, tmp_path):
    """Shortened LLaMA's criterion against a brute force: for each block, the model built without it by hand,
    its next-token cross-entropy on the windows in float64, exponentiated (uneven batches: 3 + 1 windows)."""
    source = save_with_tokenizer(deep_model(arch), tmp_path / "source")
    model, calib = AutoModelForCausalLM.from_pretrained(source).eval(), windows()
    report = prune_depth(model, calib, sparsity=0.4, score="ppl", batch_size=3, progress=False)
    expected = []
    for index in range(BLOCKS):
        found = logits(reference_without(source, [index]), calib)[:, :-1].reshape(-1, VOCAB).double()
        expected.append(math.exp(float(torch.nn.functional.cross_entropy(found, calib[:, 1:].reshape(-1)))))
    assert report.scores == pytest.approx(expected, rel=1e-5)
    assert report.removed == sorted(sorted(range(BLOCKS), key=lambda i: (expected[i], -i))[:2])
    assert len(decoder_blocks(model)) == BLOCKS - 2
