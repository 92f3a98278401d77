"""The default order and batch of a calibration pass (``within_block="auto"``), against sizes worked by hand."""

from __future__ import annotations

import pytest
import torch

import wandamerge
from wandamerge.core import pass_plan
from wandamerge.core.pass_plan import PassPlan, plan_pass
from wandamerge.models import block_linears, decoder_blocks
from wandamerge.runner import default_pass_plan

from conftest import VOCAB, tiny_model, tiny_moe_model

WINDOWS = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(7))


def test_smollm2_sized_pass_by_hand():
    """SmolLM2-135M on 128 x 512 windows in float32: per token, q 576 + k 192 + v 192 + o 576 + gate 1536 +
    up 1536 + down 576 outputs, plus 1536 again = 6720 floats, 512 * 6720 * 4 = 13,762,560 bytes per window;
    all 128 windows need 1.76 GB against the inputs' 128 * 512 * 576 * 4 = 150,994,944 bytes: parallel, and
    150,994,944 // 13,762,560 = 10 windows per forward."""
    assert plan_pass(128, 512, 576, 6720, 4) == PassPlan("parallel", 10)
    assert plan_pass(128, 512, 576, 6720, 2) == PassPlan("parallel", 10)  # both sides halve in bfloat16


def test_small_calibrations_keep_one_sequential_forward():
    # 16 windows of 64 tokens: 16 * 64 * 6720 * 4 = 27.5 MB, under the 64 MiB floor
    assert plan_pass(16, 64, 576, 6720, 4) == PassPlan("sequential", 16)
    assert plan_pass(16, 64, 576, 6720, 4, floor_bytes=0) == PassPlan("parallel", 1)  # 1.37 windows fit
    # exactly at the budget still runs at once: inputs 4 * 8 * 100 * 4 = 12,800 bytes = 4 * 8 * 100 * 4
    assert plan_pass(4, 8, 100, 100, 4, floor_bytes=0) == PassPlan("sequential", 4)
    assert plan_pass(4, 8, 100, 101, 4, floor_bytes=0) == PassPlan("parallel", 3)
    with pytest.raises(ValueError):
        plan_pass(0, 8, 100, 100, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_sizes_from_its_maps(arch):
    """The per-token count is every linear map's output width plus the widest once more, by hand from the weights."""
    model = tiny_model(arch)
    block = decoder_blocks(model)[0]
    widths = [lin.weight.shape[0] for lin in block_linears(block)]
    hidden = model.config.hidden_size
    got = default_pass_plan(block, (6, 24))
    assert got == plan_pass(6, 24, hidden, sum(widths) + max(widths), 4)
    assert default_pass_plan(block, (6, 24), batch_size=2) == PassPlan("parallel", 2)
    assert default_pass_plan(block, (6, 24), batch_size=9) == PassPlan("sequential", 6)


def test_moe_block_counts_one_experts_maps():
    model = tiny_moe_model("qwen3_moe")
    block = decoder_blocks(model)[0]
    from wandamerge.models import block_experts
    experts = block_experts(block)
    assert experts
    widths = [lin.weight.shape[0] for lin in block_linears(block)] + [m.weight.shape[0] for m in experts[0].maps(0)]
    assert default_pass_plan(block, (6, 24)) == plan_pass(6, 24, model.config.hidden_size,
                                                          sum(widths) + max(widths), 4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_auto_prunes_as_the_order_it_chose(monkeypatch, method):
    """With no floor the tiny model's pass goes parallel in batches; the result is bit for bit that order's,
    and the report says which order and batch ran."""
    monkeypatch.setattr(pass_plan, "SEQUENTIAL_FLOOR_BYTES", 0)
    auto, explicit = tiny_model("llama"), tiny_model("llama")
    plan = default_pass_plan(decoder_blocks(auto)[0], WINDOWS.shape)
    assert plan.order == "parallel" and 1 <= plan.batch_size < WINDOWS.shape[0]
    report = wandamerge.prune(auto, WINDOWS, method=method, sparsity=0.5, progress=False)
    wandamerge.prune(explicit, WINDOWS, method=method, sparsity=0.5, within_block="parallel",
                     batch_size=plan.batch_size, progress=False)
    assert (report.within_block, report.batch_size) == (plan.order, plan.batch_size)
    for (name, a), b in zip(auto.named_parameters(), explicit.parameters()):
        assert torch.equal(a, b), name


def test_auto_with_the_floor_is_the_sequential_order():
    auto, explicit = tiny_model("llama"), tiny_model("llama")
    report = wandamerge.prune(auto, WINDOWS, method="wanda", sparsity=0.5, progress=False)
    wandamerge.prune(explicit, WINDOWS, method="wanda", sparsity=0.5, within_block="sequential", progress=False)
    assert (report.within_block, report.batch_size) == ("sequential", WINDOWS.shape[0])
    for (name, a), b in zip(auto.named_parameters(), explicit.parameters()):
        assert torch.equal(a, b), name


def test_the_record_names_the_order_and_batch_that_ran(tmp_path, model_dir, text_file, monkeypatch):
    import json

    from wandamerge.jobs.prune import prune_to_directory

    monkeypatch.setattr(pass_plan, "SEQUENTIAL_FLOOR_BYTES", 0)
    out = tmp_path / "pruned"
    prune_to_directory(str(model_dir()), out, method="wanda", sparsity=0.5, calib=str(text_file), nsamples=6,
                       seqlen=24, progress=False)
    settings = json.loads((out / "wandamerge.json").read_text())["settings"]
    model = tiny_model("llama")
    assert (settings["within_block"], settings["batch_size"]) == tuple(
        vars(default_pass_plan(decoder_blocks(model)[0], (6, 24))).values())
    assert settings["within_block"] == "parallel"
