"""Structured width pruning: whole GQA groups of heads and MLP channels removed, the model saved smaller.

Tiny random models of each supported family (transformers' own config classes), against independent references:
scores by brute force from the inputs hooked in a whole-model forward of the unmodified model (conftest's
``linear_inputs``), the saved model loaded by plain ``transformers`` (no project code on that path) against the
original model with the removed heads' and channels' columns of ``o_proj`` and ``down_proj`` zeroed (and the
compensation bias, from the hooked inputs, added), parameter counts worked out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from conftest import VOCAB, linear_inputs, tiny_model, tiny_moe_model, word_tokenizer
from conftest import model_logits as logits
from conftest import random_windows as windows
from wandamerge.cli import main
from wandamerge.core.width import (UnitCost, fluctuation_score, group_scores, kept_units, wanda_sp_score,
                                   width_plan)
from wandamerge.errors import ConfigError, ModelError
from wandamerge.jobs.prune import prune_to_directory
from wandamerge.models import width_layout
from wandamerge.pruning import WIDTH_SCORES, prune_width, width_setup
from wandamerge.pruning.width import block_costs, width_statistics
from wandamerge.runner import MOMENTS, NORMS

FAMILIES = ["llama", "llama_biased", "mistral", "qwen2", "qwen3"]
HEADS, KV_HEADS, HEAD_DIM, CHANNELS = 6, 3, 8, 64  # three GQA groups of two query heads


def family_config(family: str):
    """2 blocks, hidden 48, 6 heads / 3 key-value heads of 8, 64 MLP channels."""
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=CHANNELS, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "llama_biased":  # every map already has a bias: the compensation adds to o_proj's and down_proj's
        return LlamaConfig(attention_bias=True, mlp_bias=True, **common)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":  # q, k and v have biases
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=HEAD_DIM, **common)
    raise KeyError(family)


def family_model(family: str, seed: int = 0):
    """A seeded tiny model; every parameter spread (norms around 1) so that scores and biases are decisive."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture
def saved(tmp_path):
    """A saved tiny model of a family with its tokenizer, and its calibration windows as a token file."""
    def make(family: str = "llama"):
        path = tmp_path / family
        family_model(family).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        torch.save(windows(), tmp_path / "calib.pt")
        return path
    return make


def width_pruned(source, out, calib, **settings) -> dict:
    return prune_to_directory(str(source), out, structure="width", calib=str(calib), progress=False, **settings)


# ----------------------------------------------------------------------------- pure functions, by hand


def test_channel_scores_group_sums_and_kept_units_worked_by_hand():
    weight = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])  # columns: ||W_:,j||^2 = 10, 5, 1; |W|_1 = 4, 3, 1
    assert fluctuation_score(weight, torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)).tolist() == [5.0, 10.0, 4.0]
    assert wanda_sp_score(weight, torch.tensor([4.0, 9.0, 16.0])).tolist() == [8.0, 9.0, 4.0]  # |W|_1 * ||X||
    channels = torch.arange(12, dtype=torch.float32)  # 6 heads of 2 channels, 2 heads per group
    assert group_scores(channels, head_dim=2, heads_per_group=2).tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7,
                                                                             8 + 9 + 10 + 11]
    assert kept_units(torch.tensor([3.0, 1.0, 3.0, 2.0]), 2).tolist() == [0, 2]
    assert kept_units(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1).tolist() == [1]  # a tie keeps the lower index
    with pytest.raises(ConfigError, match="cannot keep 0 of 4"):
        kept_units(torch.ones(4), 0)


def test_the_plan_removes_the_same_share_of_heads_and_channels_rounded_as_documented():
    """conftest's tiny llama: hidden 32, 4 heads / 2 key-value heads of 8, 64 channels, two norms of 32."""
    block = tiny_model("llama").model.layers[0]
    config = tiny_model("llama").config
    heads, channels, fixed = block_costs(block, width_layout(tiny_model("llama")), config, 8)
    # a group: q rows 2 * 8 * 32, k and v rows 8 * 32 each, o columns 2 * 8 * 32; its new q/k/v biases 4 * 8
    assert heads == UnitCost(units=2, per_unit=1536, bias_per_unit=32, bias_fixed=32)
    assert channels == UnitCost(units=64, per_unit=96, bias_per_unit=2, bias_fixed=32)
    assert fixed == 64
    total = 64 + 2 * 1536 + 64 * 96  # 9280
    plan = width_plan(heads, channels, fixed, 0.3)
    # f = 0.3 * 9280 / 9216 = 0.302; 0.604 groups -> 1; the MLP gets (0.7 * 9280 - 64 - 1536) / 96 = 51.0 channels
    assert (plan.groups_kept, plan.channels_kept, plan.before) == (1, 51, total)
    assert plan.fraction == pytest.approx(0.3 * total / 9216)
    assert plan.after == 64 + 1536 + 51 * 96
    biased = width_plan(heads, channels, fixed, 0.3, (True, True))
    # with the new biases: (6496 - 64 - (1536 + 32 + 32) - 32) / (96 + 2) = 48.98 -> 49 channels
    assert (biased.groups_kept, biased.channels_kept) == (1, 49)
    assert biased.after == 64 + (1536 + 32 + 32) + 49 * 98 + 32
    nothing = width_plan(heads, channels, fixed, 0.0, (True, True))  # nothing removed: no bias either
    assert (nothing.groups_kept, nothing.channels_kept, nothing.after) == (2, 64, total)
    small = width_plan(heads, channels, fixed, 0.1)  # 0.2 groups -> none: the MLP carries it all
    assert (small.groups_kept, small.channels_kept) == (2, round((0.9 * total - 64 - 3072) / 96))
    with pytest.raises(ConfigError, match="at most 0.817 of the decoder blocks' parameters"):
        width_plan(heads, channels, fixed, 0.82)  # (1536 + 63 * 96) / 9280 = 0.8172: one group, one channel kept


# ----------------------------------------------------------------------------- scores against brute force


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("score", sorted(WIDTH_SCORES))
def test_scores_equal_a_brute_force_from_hooked_inputs(family, score, saved):
    path = saved(family)
    tokens = windows()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    inputs = linear_inputs(path, tokens)  # the unmodified model, one whole forward
    layout = width_layout(model)
    stats = width_statistics(model, tokens, layout, set(WIDTH_SCORES[score].needs), progress=False)
    for index, block in enumerate(model.model.layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            x = inputs[f"model.layers.{index}.{name}.weight"]
            weight = block.get_submodule(name).weight.double()
            if score == "flap":
                expected = x.var(0) * weight.pow(2).sum(0)
            else:
                expected = (weight.abs() * x.norm(dim=0)).sum(0)
            found = WIDTH_SCORES[score].fn(block.get_submodule(name).weight, stats[index][name])
            torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("score", sorted(WIDTH_SCORES))
def test_kept_groups_and_channels_are_the_best_of_a_brute_force_score(score, saved, tmp_path):
    path = saved("llama")
    record = width_pruned(path, tmp_path / "out", tmp_path / "calib.pt", sparsity=0.3, width_score=score)
    inputs = linear_inputs(path, windows())
    original = AutoModelForCausalLM.from_pretrained(path)
    width = record["width"]
    for layer in width["per_layer"]:
        block = original.model.layers[layer["block"]]
        per_map = {}
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            x, weight = inputs[f"model.layers.{layer['block']}.{name}.weight"], block.get_submodule(name).weight.double()
            per_map[name] = x.var(0) * weight.pow(2).sum(0) if score == "flap" else \
                (weight.abs() * x.norm(dim=0)).sum(0)
        groups = per_map["self_attn.o_proj"].reshape(KV_HEADS, 2 * HEAD_DIM).sum(1)  # two query heads a group
        torch.testing.assert_close(torch.tensor(layer["group_scores"], dtype=torch.float64), groups, rtol=1e-5,
                                   atol=1e-7)
        keep_groups = len(layer["kept_key_value_heads"])
        assert layer["kept_key_value_heads"] == sorted(groups.argsort(descending=True)[:keep_groups].tolist())
        keep = width["channels"]["after"]
        best = per_map["mlp.down_proj"].argsort(descending=True)[:keep]
        assert layer["kept_channels"] == sorted(best.tolist())


# ----------------------------------------------------------------------------- saved models, plain transformers


def test_removing_nothing_gives_the_original_logits_after_save_and_reload(saved, tmp_path):
    path = saved("llama")
    record = width_pruned(path, tmp_path / "out", tmp_path / "calib.pt", sparsity=0.0)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(path)
    tokens = windows(seed=7)
    assert torch.equal(logits(pruned, tokens), logits(original, tokens))
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads,
            pruned.config.intermediate_size) == (HEADS, KV_HEADS, CHANNELS)
    assert not pruned.config.attention_bias and not pruned.config.mlp_bias  # no bias where nothing went
    assert record["parameters"]["after"] == record["parameters"]["before"] and record["width"]["achieved"] == 0


def masked_reference(source, record: dict, calib: torch.Tensor):
    """The original model with the removed heads' columns of ``o_proj`` and the removed channels' columns of
    ``down_proj`` zeroed, and, where the record says the compensation is on, ``W_:,removed @ mean(x_removed)``
    (from the hooked inputs on the calibration windows) added to those maps' outputs."""
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    inputs = linear_inputs(source, calib)
    compensated = record["width"]["bias_compensation"]
    for layer in record["width"]["per_layer"]:
        block = model.model.layers[layer["block"]]
        kept_heads = torch.tensor(layer["kept_heads"])
        kept = {"self_attn.o_proj": (kept_heads.unsqueeze(1) * HEAD_DIM + torch.arange(HEAD_DIM)).reshape(-1),
                "mlp.down_proj": torch.tensor(layer["kept_channels"])}
        for name, columns in kept.items():
            linear = block.get_submodule(name)
            removed = torch.ones(linear.in_features, dtype=torch.bool)
            removed[columns] = False
            if compensated[name.split(".")[-1]]:
                mean = inputs[f"model.layers.{layer['block']}.{name}.weight"].mean(0)
                bias = (linear.weight.double()[:, removed] @ mean[removed]).float()
                linear.register_forward_hook(lambda module, args, out, bias=bias: out + bias)
            with torch.no_grad():
                linear.weight[:, removed] = 0
    return model


@pytest.mark.parametrize("family, compensation", [(f, None) for f in FAMILIES] + [("llama", False)])
def test_the_saved_model_equals_the_original_with_the_removed_heads_and_channels_masked(family, compensation, saved,
                                                                                       tmp_path):
    path = saved(family)
    settings = {} if compensation is None else {"bias_compensation": compensation}
    record = width_pruned(path, tmp_path / "out", tmp_path / "calib.pt", sparsity=0.3, **settings)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and config["head_dim"] == HEAD_DIM
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain transformers
    assert type(pruned).__module__.startswith("transformers.")
    expected_bias = {"llama": (True, True), "llama_biased": (True, True), "qwen3": (True, False)}.get(family, (False,
                                                                                                         False))
    if compensation is False:
        expected_bias = (False, False)
    assert tuple(record["width"]["bias_compensation"].values()) == expected_bias
    reference = masked_reference(path, record, windows())
    tokens = windows(seed=5)  # not the calibration windows
    torch.testing.assert_close(logits(pruned, tokens), logits(reference, tokens), rtol=1e-5, atol=1e-5)
    assert pruned.num_parameters() < reference.num_parameters()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_heads_go_in_whole_gqa_groups_and_head_dim_is_kept(family, saved, tmp_path):
    path = saved(family)
    record = width_pruned(path, tmp_path / "out", tmp_path / "calib.pt", sparsity=0.4)
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    assert config.num_key_value_heads < KV_HEADS and config.num_attention_heads % config.num_key_value_heads == 0
    assert config.num_attention_heads // config.num_key_value_heads == HEADS // KV_HEADS
    assert config.head_dim == HEAD_DIM
    for layer in record["width"]["per_layer"]:
        assert layer["kept_heads"] == [2 * kv + i for kv in layer["kept_key_value_heads"] for i in range(2)]
        assert len(layer["kept_key_value_heads"]) == config.num_key_value_heads
        assert len(layer["kept_channels"]) == config.intermediate_size


def test_the_parameter_count_equals_the_hand_computed_one(model_dir, tmp_path):
    """conftest's tiny llama (hidden 32, 4 heads / 2 key-value heads of 8, 64 channels, 96 tokens, untied head):
    at 0.3 one group and 15 channels go; with the compensation's biases 49 channels stay (see the plan test)."""
    path = model_dir("llama")
    torch.save(windows(), tmp_path / "calib.pt")
    record = width_pruned(path, tmp_path / "out", tmp_path / "calib.pt", sparsity=0.3)
    outside = 2 * 96 * 32 + 32  # embeddings, LM head, final norm
    block = 64 + (2 * 8 * 32 + 8 * 32 + 8 * 32 + 32 * 2 * 8) + (2 * 8 + 8 + 8 + 32) + 49 * (3 * 32 + 2) + 32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.num_parameters() == outside + 2 * block == record["parameters"]["after"]
    assert record["parameters"]["blocks_after"] == 2 * block
    assert record["bytes"]["after"] == 4 * (outside + 2 * block)
    assert record["width"]["achieved"] == pytest.approx(1 - block / (64 + 2 * 1536 + 64 * 96))
    assert all(layer["parameters"] == {"before": 9280, "after": block} for layer in record["width"]["per_layer"])


def block_io(model, tokens: torch.Tensor) -> dict[int, tuple]:
    """Each block's (args, kwargs) and output in a whole-model forward."""
    seen, handles = {}, []
    for index, block in enumerate(model.model.layers):
        def pre(module, args, kwargs, index=index):
            seen[index] = [args, dict(kwargs)]

        def post(module, args, kwargs, out, index=index):
            seen[index].append(out[0] if isinstance(out, tuple) else out)
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def test_the_bias_compensation_lowers_the_block_output_error_on_the_calibration_data(saved, tmp_path):
    path = saved("llama")
    width_pruned(path, tmp_path / "out", tmp_path / "calib.pt", sparsity=0.3)
    compensated = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # the same cut, its biases zeroed
    with torch.no_grad():
        for block in plain.model.layers:
            block.self_attn.o_proj.bias.zero_()
            block.mlp.down_proj.bias.zero_()
    dense = block_io(AutoModelForCausalLM.from_pretrained(path).eval(), windows())
    for index, (args, kwargs, expected) in dense.items():
        errors = []
        for model in (compensated, plain):
            with torch.no_grad():
                out = model.model.layers[index](*args, **kwargs)
            errors.append(((out[0] if isinstance(out, tuple) else out) - expected).pow(2).mean().item())
        assert errors[0] < errors[1], (index, errors)


def test_the_python_api_prunes_a_loaded_model_in_place():
    model = family_model("mistral")
    report = prune_width(model, windows(), sparsity=0.25, score="wanda_sp", progress=False)
    assert model.config.intermediate_size == report.channels["after"] < CHANNELS
    assert report.notes == ["no bias compensation on o_proj and down_proj: mistral's config has no flag that gives "
                            "them a bias"]
    assert logits(model, windows(seed=3)).shape == (4, 16, VOCAB)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_other_families_are_refused_in_one_line(arch):
    with pytest.raises(ModelError, match=f"width pruning supports llama, mistral, qwen2, qwen3 models, not '{arch}'"):
        width_setup(tiny_model(arch), 0.3)


def test_a_mixture_of_experts_model_is_refused():
    with pytest.raises(ModelError, match="not 'qwen3_moe'"):
        width_setup(tiny_moe_model("qwen3_moe"), 0.3)


def test_bias_compensation_asked_of_a_family_without_the_flag_is_refused():
    with pytest.raises(ConfigError, match="mistral models have no config flag that gives o_proj or down_proj"):
        width_setup(family_model("mistral"), 0.3, bias_compensation=True)
    assert width_setup(family_model("qwen3"), 0.3, bias_compensation=True).compensate == (True, False)


def run(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def test_prune_command_cuts_width_and_records_what_it_kept(saved, tmp_path):
    path = saved("llama")
    out = tmp_path / "out"
    result = run("prune", path, "-o", out, "--structure", "width", "--sparsity", 0.3, "--width-score", "wanda_sp",
                 "--no-bias-compensation", "--calib", tmp_path / "calib.pt")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["heads"][0] == HEADS and summary["channels"][1] < CHANNELS
    record = json.loads((out / "wandamerge.json").read_text())
    assert record["settings"]["structure"] == "width" and record["settings"]["sparsity"] == 0.3
    assert "method" not in record["settings"] and "experts_kept" not in record["settings"]
    assert record["settings"]["bias_compensation"] is False and record["width"]["score"] == "wanda_sp"
    assert [layer["block"] for layer in record["width"]["per_layer"]] == [0, 1]
    assert record["bytes"]["after"] < record["bytes"]["before"]
    assert "width-pruned" in (out / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--structure", "width"], "structure 'width' needs sparsity"),
    (["--structure", "width", "--sparsity", 0.3, "--method", "sparsegpt"], "leave out method"),
    (["--width-score", "flap"], "only structure 'width' uses width_score"),
    (["--structure", "experts", "--experts-kept", 2, "--no-bias-compensation"],
     "only structure 'width' uses bias_compensation"),
    (["--structure", "width", "--sparsity", 0.3, "--width-score", "flop"], "did you mean 'flap'"),
    (["--structure", "width", "--sparsity", 0.3, "--low-memory"], "leave out low_memory and device_map"),
    (["--structure", "width", "--sparsity", 0.9], "can remove at most"),
])
def test_bad_width_settings_give_one_line_and_exit_2(saved, tmp_path, args, message):
    result = run("prune", saved("llama"), "-o", tmp_path / "out", "--calib", tmp_path / "calib.pt", *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, args, message", [
    ("mistral", ["--bias-compensation"], "mistral models have no config flag"),
])
def test_refusals_of_the_model_give_one_line_and_exit_2(family, args, message, saved, tmp_path):
    result = run("prune", saved(family), "-o", tmp_path / "out", "--calib", tmp_path / "calib.pt", "--structure",
                 "width", "--sparsity", 0.3, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_prune_command_refuses_width_pruning_of_gpt2(model_dir, tmp_path):
    torch.save(windows(), tmp_path / "calib.pt")
    result = run("prune", model_dir("gpt2"), "-o", tmp_path / "out", "--structure", "width", "--sparsity", 0.3,
                 "--calib", tmp_path / "calib.pt")
    assert result.exit_code == 2 and "not 'gpt2'" in result.output, result.output


def test_moments_are_a_statistic_of_the_runner():
    """The runner's moments pool batches exactly (Chan's update), as one pass over every token would."""
    from wandamerge.runner import InputStats, input_stats

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3 + 100
    total = InputStats()
    for part in x.split(13):
        total.add(input_stats(part, {MOMENTS, NORMS}))
    torch.testing.assert_close(total.means, x.double().mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(total.m2 / (total.tokens - 1), x.double().var(0), rtol=1e-5, atol=1e-5)
