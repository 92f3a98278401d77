"""End-to-end pruning of tiny models against a naive, independent reference."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import wandamerge
from wandamerge.models import ModelError, block_linears, decoder_blocks, save_model

from conftest import ARCHS, VOCAB, tiny_model

WINDOWS = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(5))


def linear_modules(block):
    kinds = (nn.Linear,) + _conv1d()
    return [(n, m) for n, m in block.named_modules() if isinstance(m, kinds)]


def _conv1d():
    from transformers.pytorch_utils import Conv1D
    return (Conv1D,)


def out_in(module) -> torch.Tensor:
    """Weight as (out, in): nn.Linear stores it so, Conv1D transposed."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.T


def inputs_of(model, module, windows) -> torch.Tensor:
    """Run the WHOLE model and record what `module` receives, as (tokens, in)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    return x


def naive_wanda_row_prune(weight: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Brute-force Wanda: loop over rows, score every weight, sort, zero the lowest."""
    rows, cols = weight.shape
    norms = [sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5 for j in range(cols)]
    k = int(cols * sparsity)
    pruned = weight.clone()
    for i in range(rows):
        scores = [(abs(float(weight[i, j])) * norms[j], j) for j in range(cols)]
        for _, j in sorted(scores)[:k]:
            pruned[i, j] = 0
    return pruned


def reference_prune(model, windows, sparsity, order):
    """Wanda the slow way: re-run the whole model to see each map's inputs.

    order "parallel": all maps of a block scored on the unpruned block (official code);
    order "sequential": maps pruned one at a time in execution order.
    """
    for block in decoder_blocks(model):
        maps = linear_modules(block)
        if order == "parallel":
            xs = {name: inputs_of(model, mod, windows) for name, mod in maps}
            for name, mod in maps:
                new = naive_wanda_row_prune(out_in(mod), xs[name], sparsity)
                out_in(mod).copy_(new)
        else:
            for name, mod in maps:
                new = naive_wanda_row_prune(out_in(mod), inputs_of(model, mod, windows), sparsity)
                out_in(mod).copy_(new)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_wanda_equals_naive_reference(arch, order):
    ours, ref = tiny_model(arch), tiny_model(arch)
    wandamerge.prune(ours, WINDOWS, method="wanda", sparsity=0.5, within_block=order,
                     batch_size=None if order == "sequential" else 4, progress=False)
    reference_prune(ref, WINDOWS, 0.5, order)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_every_row_has_the_asked_zeros_and_outside_blocks_is_untouched(arch, method):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = wandamerge.prune(model, WINDOWS, method=method, sparsity=0.5, progress=False)
    block_params = set()
    for index, block in enumerate(decoder_blocks(model)):
        for linear in block_linears(block):
            w = linear.weight
            block_params.add(id(linear.module.weight))
            zeros_per_row = (w == 0).sum(dim=1)
            if method == "sparsegpt":  # adaptive mask per column block: whole tensor at 50%
                assert (w == 0).sum().item() == pytest.approx(w.numel() * 0.5, abs=w.shape[0])
            else:
                assert torch.all(zeros_per_row == w.shape[1] // 2), linear.name
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    # embeddings, LM head, norms, biases: exactly as before
    for name, param in model.named_parameters():
        if id(param) not in block_params:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_n_m_pattern_holds_in_every_group(arch, pattern, method):
    n, m = map(int, pattern.split(":"))
    model = tiny_model(arch)
    wandamerge.prune(model, WINDOWS, method=method, pattern=pattern, progress=False)
    for block in decoder_blocks(model):
        for linear in block_linears(block):
            w = linear.weight
            groups = (w == 0).reshape(w.shape[0], -1, m).sum(dim=2)
            assert torch.all(groups >= n), linear.name


def test_kept_weights_are_untouched_without_update_and_changed_with_it():
    dense = tiny_model("llama")
    plain, updated = tiny_model("llama"), tiny_model("llama")
    wandamerge.prune(plain, WINDOWS, method="wanda", sparsity=0.5, progress=False)
    wandamerge.prune(updated, WINDOWS, method="wanda", sparsity=0.5, update=True, progress=False)
    for (name, d), p, u in zip(dense.named_parameters(), plain.parameters(), updated.parameters()):
        kept = p != 0
        assert torch.equal(p[kept], d[kept]), name
        if "layers" in name and d.ndim == 2:
            assert not torch.equal(u[u != 0], d[u != 0]), f"{name}: update changed nothing"


def test_save_and_reload_give_identical_logits(tmp_path):
    model = tiny_model("llama")
    wandamerge.prune(model, WINDOWS, method="wanda", pattern="2:4", progress=False)
    save_model(model, None, tmp_path / "out", max_shard_size="20KB")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1  # sharded
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        a = model(WINDOWS).logits
        b = reloaded(WINDOWS).logits
    assert torch.equal(a, b)


def test_same_seed_same_masks_different_seed_different(model_dir, text_file, tmp_path):
    from wandamerge.jobs.prune import prune_to_directory

    src = model_dir("llama")
    outs = {}
    for tag, seed in [("a", 3), ("b", 3), ("c", 4)]:
        prune_to_directory(str(src), tmp_path / tag, calib=str(text_file), nsamples=4, seqlen=16, seed=seed,
                           progress=False)
        outs[tag] = AutoModelForCausalLM.from_pretrained(tmp_path / tag).state_dict()
    masks = {tag: {k: v == 0 for k, v in sd.items()} for tag, sd in outs.items()}
    assert all(torch.equal(masks["a"][k], masks["b"][k]) for k in masks["a"])
    assert all(torch.equal(outs["a"][k], outs["b"][k]) for k in outs["a"])
    assert not all(torch.equal(masks["a"][k], masks["c"][k]) for k in masks["a"])


def test_pipeline_writes_a_complete_transformers_directory(model_dir, text_file, tmp_path):
    from wandamerge.jobs.prune import prune_to_directory

    src = model_dir("gpt2")
    out = tmp_path / "pruned"
    record = prune_to_directory(str(src), out, method="wanda", sparsity=0.5, calib=str(text_file),
                                nsamples=4, seqlen=16, eval_ppl=str(text_file), progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "wandamerge.json", "README.md", "tokenizer.json", "generation_config.json"} <= names
    saved = json.loads((out / "wandamerge.json").read_text())
    assert saved["settings"]["method"] == "wanda" and saved["settings"]["seed"] == 0
    assert set(saved["seconds"]) >= {"load", "calibration_data", "prune", "save"}
    assert saved["peak_memory"]["rss_bytes"] > 0
    assert len(saved["sparsity"]["per_block"]) == 2
    assert all(v == pytest.approx(0.5) for v in saved["sparsity"]["per_matrix"].values())
    assert saved["perplexity"]["pruned"] > 1 and saved["perplexity"]["dense"] > 1
    assert saved["versions"]["torch"] == torch.__version__
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.transformer.h[0].attn.c_attn.weight.eq(0).float().mean().item() == pytest.approx(0.5)
    assert record["sparsity"]["overall"] == pytest.approx(0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]  # no temp dirs left


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ModelError, match="supported model types: .*llama"):
        wandamerge.prune(model, WINDOWS, progress=False)


def test_conv1d_weights_are_seen_as_out_by_in():
    model = tiny_model("gpt2")
    linear = {l.name: l for l in block_linears(decoder_blocks(model)[0])}["attn.c_attn"]
    assert linear.transposed and linear.weight.shape == (96, 32)  # 3 * n_embd outputs, n_embd inputs
    new = torch.arange(96 * 32, dtype=torch.float32).reshape(96, 32)
    linear.set_weight(new)
    assert torch.equal(linear.module.weight, new.T)
