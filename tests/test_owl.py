"""Layer-wise sparsity: OWL's per-block allocation and the per-module sparsity map, against references
computed independently (hooked inputs of the dense model, the formula worked by hand, naive pruning)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import wandamerge
from wandamerge.core.allocation import outlier_ratio, owl_sparsities
from wandamerge.errors import ConfigError
from wandamerge.jobs.prune import PruneConfig, prune_to_directory
from wandamerge.models import block_linears, block_prefix, decoder_blocks
from wandamerge.pruning import SparsityMap

from conftest import VOCAB, linear_inputs, tiny_model, word_tokenizer
from test_prune_end_to_end import inputs_of, linear_modules, naive_wanda_row_prune, out_in
from test_streaming import DISK_MAP, assert_same_model

WINDOWS = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(5))


def saved_model(tmp_path, arch: str, layers: int = 4):
    """A tiny model of ``layers`` blocks with the word tokenizer, as a transformers directory."""
    path = tmp_path / f"{arch}-{layers}"
    tiny_model(arch, num_layers=layers).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def oriented(module) -> torch.Tensor:
    """A hooked module's weight as (out, in): nn.Linear stores it so, GPT-2's Conv1D transposed."""
    return module.weight.detach() if isinstance(module, torch.nn.Linear) else module.weight.detach().T


def brute_force_outlier_ratios(path, windows, m: float) -> list[float]:
    """OWL's D per block, the official way: every linear's |W_ij| * ||X_j|| from a whole-model forward of the
    dense model, flattened and concatenated per block; the fraction above m times the block's mean."""
    inputs = linear_inputs(path, windows)
    model = AutoModelForCausalLM.from_pretrained(path)
    modules = dict(model.named_modules())
    per_block: dict[int, list[torch.Tensor]] = {}
    for name, x in inputs.items():
        module_name = name.removesuffix(".weight")
        index = int(module_name.split(".h." if ".h." in module_name else ".layers.")[1].split(".")[0])
        score = oriented(modules[module_name]).double().abs() * x.pow(2).sum(0).sqrt()
        per_block.setdefault(index, []).append(score.flatten())
    ratios = []
    for index in sorted(per_block):
        scores = torch.cat(per_block[index])
        ratios.append(float((scores > m * scores.mean()).sum()) / scores.numel())
    return ratios


def by_hand(ratios: list[float], target: float, lam: float) -> list[float]:
    """The official mapping: ratios scaled to [0, 2 lam], density = scaled - mean + (1 - target)."""
    low, high = min(ratios), max(ratios)
    scaled = [(r - low) / (high - low) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (s - mean + (1 - target)) for s in scaled]


# ----------------------------------------------------------------------------- the pure functions by hand


def test_outlier_ratio_and_owl_sparsities_worked_by_hand():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 10.0]]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    # mean over the 8 entries together: 17 / 8 = 2.125; above 2 x 2.125 = 4.25: only the 10
    assert outlier_ratio(scores, 2.0) == 1 / 8
    assert outlier_ratio(scores, 4.0) == 1 / 8 and outlier_ratio(scores, 5.0) == 0.0
    # ratios 0.1, 0.3, 0.2 -> scaled to [0, 0.2]: 0, 0.2, 0.1 (mean 0.1) -> sparsity 0.5 - (scaled - 0.1)
    assert owl_sparsities([0.1, 0.3, 0.2], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5], abs=1e-12)
    assert owl_sparsities([0.2, 0.2], 0.5, 0.08) == [0.5, 0.5]  # equal ratios: every block at the target
    assert owl_sparsities([0.0, 1.0], 0.5, 0.0) == [0.5, 0.5]


# ----------------------------------------------------------------------------- OWL on tiny models


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_owl_ratios_and_targets_equal_a_brute_force_from_the_dense_model(tmp_path, arch):
    path = saved_model(tmp_path, arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    report = wandamerge.prune(model, WINDOWS, method="wanda", sparsity=0.5, sparsity_profile="owl", owl_m=3.0,
                              owl_lambda=0.08, progress=False)
    expected = brute_force_outlier_ratios(path, WINDOWS, 3.0)
    assert len(set(expected)) > 1  # distinct ratios: the allocation is not trivially uniform
    assert report.allocation["outlier_ratios"] == pytest.approx(expected, abs=1e-12)
    assert report.block_targets == pytest.approx(by_hand(expected, 0.5, 0.08), abs=1e-12)
    assert sum(report.block_targets) / len(report.block_targets) == pytest.approx(0.5, abs=1e-12)
    assert max(report.block_targets) - min(report.block_targets) == pytest.approx(0.16, abs=1e-12)
    assert report.allocation | {"outlier_ratios": None} == {"profile": "owl", "owl_m": 3.0, "owl_lambda": 0.08,
                                                             "outlier_ratios": None}


def naive_owl_reference(model, windows, sparsities):
    """Wanda in the official (parallel) order with each block's own sparsity, the slow way."""
    for block, sparsity in zip(decoder_blocks(model), sparsities):
        maps = linear_modules(block)
        xs = {name: inputs_of(model, module, windows) for name, module in maps}
        for name, module in maps:
            out_in(module).copy_(naive_wanda_row_prune(out_in(module), xs[name], sparsity))


def test_owl_wanda_equals_naive_pruning_at_the_allocated_sparsities():
    ours, ref = tiny_model("llama", num_layers=4), tiny_model("llama", num_layers=4)
    report = wandamerge.prune(ours, WINDOWS, method="wanda", sparsity=0.6, sparsity_profile="owl", owl_m=3.0,
                              within_block="parallel", batch_size=3, progress=False)
    naive_owl_reference(ref, WINDOWS, report.block_targets)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_each_block_reaches_its_own_target_and_their_mean_is_the_target(method, arch):
    model = tiny_model(arch, num_layers=4)
    report = wandamerge.prune(model, WINDOWS, method=method, sparsity=0.5, sparsity_profile="owl", owl_m=3.0,
                              owl_lambda=0.1, progress=False)
    assert sum(report.block_targets) / 4 == pytest.approx(0.5, abs=1e-12)
    assert len(set(report.block_targets)) > 1
    for block, target in zip(decoder_blocks(model), report.block_targets):
        for linear in block_linears(block):
            w = linear.weight
            if method == "sparsegpt":  # an adaptive mask per column block: the tensor as a whole
                assert int((w == 0).sum()) == pytest.approx(w.numel() * target, abs=w.shape[0]), linear.name
            else:  # per row (Wanda's comparison group, and magnitude's default)
                assert torch.all((w == 0).sum(1) == int(w.shape[1] * target)), linear.name
    achieved = sum(report.block_sparsity) / 4  # every block has the same size here
    assert report.overall_sparsity == pytest.approx(achieved, abs=1e-12)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_uniform_and_owl_without_spread_give_todays_tensors_bit_for_bit(method):
    today, uniform, flat = (tiny_model("llama", num_layers=3) for _ in range(3))
    wandamerge.prune(today, WINDOWS, method=method, sparsity=0.5, progress=False)
    report = wandamerge.prune(uniform, WINDOWS, method=method, sparsity=0.5, sparsity_profile="uniform",
                              progress=False)
    wandamerge.prune(flat, WINDOWS, method=method, sparsity=0.5, sparsity_profile="owl", owl_lambda=0.0,
                     progress=False)
    for (name, a), b, c in zip(today.named_parameters(), uniform.parameters(), flat.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    assert report.block_targets == [0.5] * 3 and report.allocation == {"profile": "uniform"}


def test_uniform_wanda_equals_the_naive_reference_exactly():
    ours, ref = tiny_model("llama"), tiny_model("llama")
    wandamerge.prune(ours, WINDOWS, method="wanda", sparsity=0.5, sparsity_profile="uniform",
                     within_block="parallel", batch_size=2, progress=False)
    naive_owl_reference(ref, WINDOWS, [0.5, 0.5])
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


def test_the_dense_pass_changes_no_weight_when_owl_is_refused_after_it():
    model = tiny_model("llama")  # 2 blocks: OWL gives exactly target - lambda and target + lambda
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"OWL .* gives block \d sparsity 1.0200, outside \[0, 1\)"):
        wandamerge.prune(model, WINDOWS, sparsity=0.9, sparsity_profile="owl", owl_m=3.0, owl_lambda=0.12,
                         progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- the sparsity map


HAND_MAP = {"model.layers.0.*": 0.25, "*.mlp.down_proj": 0.75, r"re:.*\.self_attn\.[qk]_proj": 0.125}


def test_sparsity_map_first_match_wins_on_a_hand_example():
    rules = SparsityMap.of(HAND_MAP)
    assert rules.sparsity_of("model.layers.0.mlp.down_proj") == 0.25  # the first of two matches
    assert rules.sparsity_of("model.layers.1.mlp.down_proj") == 0.75
    # a pattern may name the parameter as the record's per_matrix does
    assert SparsityMap.of({"*.down_proj.weight": 0.5}).sparsity_of("model.layers.1.mlp.down_proj") == 0.5
    assert rules.sparsity_of("model.layers.1.self_attn.k_proj") == 0.125  # a regex matches the whole name
    assert rules.sparsity_of("model.layers.1.self_attn.v_proj") is None
    assert SparsityMap.of({"re:self_attn": 0.5}).sparsity_of("model.layers.1.self_attn.q_proj") is None
    assert rules.unmatched(["model.layers.1.mlp.up_proj"]) == list(HAND_MAP)


def test_sparsity_map_prunes_each_map_at_its_own_sparsity():
    model = tiny_model("llama")
    report = wandamerge.prune(model, WINDOWS, method="wanda", sparsity=0.5, sparsity_map=HAND_MAP, progress=False)
    expected = {"0.self_attn.q_proj": 0.25, "0.mlp.down_proj": 0.25, "0.mlp.up_proj": 0.25,
                "1.self_attn.q_proj": 0.125, "1.self_attn.k_proj": 0.125, "1.self_attn.v_proj": 0.5,
                "1.mlp.down_proj": 0.75, "1.mlp.up_proj": 0.5}
    prefix, checked = block_prefix(model), set()
    for index, block in enumerate(decoder_blocks(model)):
        for linear in block_linears(block):
            key = f"{index}.{linear.name}"
            if key in expected:
                w = linear.weight
                assert torch.all((w == 0).sum(1) == int(w.shape[1] * expected[key])), key
                assert report.matrix_targets[f"{prefix}.{key}.weight"] == expected[key]
                checked.add(key)
    assert checked == set(expected)
    assert report.block_targets[0] == 0.25
    assert report.allocation == {"profile": "uniform", "sparsity_map": HAND_MAP}


def test_a_misspelt_pattern_is_named_in_a_warning(caplog):
    wandamerge.prune(tiny_model("llama"), WINDOWS, sparsity_map={"*.mlp.down_prj": 0.5}, progress=False)
    assert "'*.mlp.down_prj' match no linear map" in caplog.text


# ----------------------------------------------------------------------------- refusals, in one line


@pytest.mark.parametrize("settings, message", [
    (dict(pattern="2:4", sparsity_profile="owl"), "an N:M pattern prunes every block at N/M"),
    (dict(pattern="2:4", sparsity_map={"*": 0.5}), "an N:M pattern prunes every block at N/M"),
    (dict(sparsity_map={"*.mlp.*": 1.0}), "sparsity map: '*.mlp.*': sparsity 1.0 is outside [0, 1)"),
    (dict(sparsity_map={"*.mlp.*": "half"}), "sparsity must be a number"),
    (dict(sparsity_map={"re:(": 0.5}), "not a valid regular expression"),
    (dict(sparsity_map={}), "non-empty mapping"),
    (dict(sparsity_profile="owll"), "unknown sparsity profile 'owll'; did you mean 'owl'?"),
    (dict(owl_m=3.0), "owl_m is an option of sparsity profile 'owl', not of 'uniform'"),
    (dict(sparsity_profile="owl", owl_lambda=0.5), "owl_lambda must be in [0, 0.5)"),
    (dict(sparsity_profile="owl", owl_m=0), "owl_m must be positive"),
    (dict(sparsity_profile="owl", sparsity_map={"*": 0.5}), "leave out sparsity profile 'owl'"),
])
def test_refusals_through_the_api_and_the_config(settings, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        wandamerge.prune(model, WINDOWS, progress=False, **settings)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        PruneConfig.of(model="unused", **settings)
    assert "\n" not in str(caught.value)


def test_owl_needs_calibration_even_for_magnitude():
    with pytest.raises(ConfigError, match="needs calibration windows"):
        wandamerge.prune(tiny_model("llama"), None, method="magnitude", sparsity_profile="owl", progress=False)


@pytest.mark.parametrize("text, message", [
    ("{not: [valid", "is not valid YAML or JSON"),
    ("- 0.5\n- 0.6\n", "must hold a mapping"),
    ('{"model.layers.*": 1.5}', r"sparsity 1.5 is outside \[0, 1\)"),
])
def test_a_bad_map_file_is_refused_before_any_model_loads(tmp_path, text, message):
    (tmp_path / "map.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        PruneConfig.of(model=str(tmp_path / "no-model"), sparsity_map=str(tmp_path / "map.yaml"))
    with pytest.raises(ConfigError, match="is not a file"):
        PruneConfig.of(model="unused", sparsity_map=str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- the job: record, low memory


def pruned(src, out, calib, **settings) -> dict:
    return prune_to_directory(str(src), out, calib=str(calib), nsamples=4, seqlen=16, progress=False, **settings)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("allocation", ["owl", "map", "owl-magnitude"])
def test_low_memory_equals_in_memory_and_the_record_lists_the_targets(tmp_path, text_file, arch, allocation):
    src = saved_model(tmp_path, arch, layers=3)
    settings = {"owl": dict(sparsity_profile="owl", owl_m=3.0),
                "owl-magnitude": dict(method="magnitude", sparsity_profile="owl", owl_m=3.0),
                "map": dict(sparsity_map={"*.mlp.*": 0.7, "*.1.*": 0.2})}[allocation]
    plain = pruned(src, tmp_path / "plain", text_file, low_memory=False, **settings)
    low = pruned(src, tmp_path / "low", text_file, low_memory=True, max_shard_size="20KB", **settings)
    assert_same_model(tmp_path / "plain", tmp_path / "low")
    assert low["sparsity"] == plain["sparsity"]
    record = json.loads((tmp_path / "low" / "wandamerge.json").read_text())["sparsity"]
    assert len(record["per_block_target"]) == len(record["per_block"]) == 3
    if allocation == "map":
        assert record["allocation"] == {"profile": "uniform", "sparsity_map": {"*.mlp.*": 0.7, "*.1.*": 0.2}}
        assert set(record["per_matrix_target"].values()) == {0.7, 0.2, 0.5}
    else:
        assert sum(record["per_block_target"]) / 3 == pytest.approx(0.5, abs=1e-12)
        assert len(record["allocation"]["outlier_ratios"]) == 3 and "per_matrix_target" not in record


def test_owl_and_a_sparsity_map_on_a_mixture_of_experts_model():
    from conftest import tiny_moe_model
    from wandamerge.models import block_experts

    model = tiny_moe_model("qwen3_moe")
    report = wandamerge.prune(model, WINDOWS, sparsity=0.5, sparsity_profile="owl", owl_m=3.0, progress=False)
    assert sum(report.block_targets) / 2 == pytest.approx(0.5, abs=1e-12) and len(set(report.block_targets)) == 2
    for block, target in zip(decoder_blocks(model), report.block_targets):
        for expert_map in [m for experts in block_experts(block) for m in experts.all_maps()]:
            w = expert_map.weight
            assert torch.all((w == 0).sum(1) == int(w.shape[1] * target)), expert_map.name
    model = tiny_moe_model("qwen3_moe")
    report = wandamerge.prune(model, WINDOWS, sparsity=0.5, sparsity_map={"*.experts.1.*": 0.75}, progress=False)
    assert {v for k, v in report.matrix_targets.items() if ".experts.1." in k} == {0.75}
    assert {v for k, v in report.matrix_targets.items() if ".experts.1." not in k} == {0.5}


def test_expert_structure_refuses_the_allocation_settings():
    with pytest.raises(ConfigError, match="leave out sparsity_profile"):
        PruneConfig.of(model="unused", structure="experts", experts_kept=2, sparsity_profile="owl")


def test_owl_with_blocks_placed_by_accelerate_on_disk_equals_the_plain_run(model_dir, text_file, tmp_path,
                                                                            monkeypatch):
    import hashlib

    from wandamerge import loaders

    stored, store = [], loaders._store
    monkeypatch.setattr(loaders, "_store", lambda module, name, value: (stored.append(name),
                                                                       store(module, name, value)))
    src = model_dir("llama")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")}
    plain = pruned(src, tmp_path / "plain", text_file, sparsity_profile="owl", owl_m=3.0)
    placed = pruned(src, tmp_path / "placed", text_file, sparsity_profile="owl", owl_m=3.0, device_map=DISK_MAP,
                    offload_folder=str(tmp_path / "offload"))
    assert_same_model(tmp_path / "plain", tmp_path / "placed")
    stores_with_owl = len(stored)
    pruned(src, tmp_path / "uniform", text_file, device_map=DISK_MAP, offload_folder=str(tmp_path / "offload2"))
    assert stores_with_owl == len(stored) - stores_with_owl > 0  # the dense pass wrote nothing back
    assert placed["sparsity"] == plain["sparsity"] and len(set(plain["sparsity"]["per_block_target"])) == 2
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")} == before
