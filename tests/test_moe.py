"""Mixture-of-experts models (transformers 5's fused experts): pruning each expert on the tokens routed to it.

The references are independent of the runner: the whole model's forward is hooked only at the MoE block's
input; routing (top-k of the router's logits), each expert's maps, gating and the Wanda mask are recomputed
by hand, expert by expert, from the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MORE_MOE_ARCHS, MOE_ARCHS, VOCAB, tiny_moe_model, word_tokenizer
from wandamerge.core.sparsegpt import sparsegpt_prune
from wandamerge.models import block_experts, block_linears, decoder_blocks
from wandamerge.pruning import prune


def windows(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def moe_block_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's MoE module input (tokens, hidden), from one forward of the whole model."""
    seen, handles = [], []
    for block in decoder_blocks(model):
        def hook(module, args):
            seen.append(args[0].reshape(-1, args[0].shape[-1]).double())
        handles.append(block.mlp.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


def router_top_k(mlp, x: torch.Tensor, k: int) -> torch.Tensor:
    """The experts each token goes to: the top k of the router's logits (softmax is monotone)."""
    router = getattr(mlp, "router", None) or mlp.gate
    logits = x @ router.weight.double().T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.double()
    return logits.topk(k, dim=-1).indices


def expert_weights(experts, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's up (with gate) and down maps as (out, in), float64."""
    up, down = experts.gate_up_proj[e].double(), experts.down_proj[e].double()
    return (up.T, down.T) if experts.is_transposed else (up, down)


def gated(experts, h: torch.Tensor) -> torch.Tensor:
    """The families' gating by hand: gpt-oss's clamped, interleaved SwiGLU, else SiLU(gate) * up."""
    if experts.is_transposed:  # gpt-oss
        gate, up = h[..., ::2].clamp(max=experts.limit), h[..., 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def wanda_keep(weight: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Brute force: per row, keep the highest |W_ij| * ||x_j||."""
    score = weight.abs() * x.norm(dim=0)
    keep = torch.zeros_like(weight, dtype=torch.bool)
    n_keep = weight.shape[1] - int(weight.shape[1] * sparsity)
    for row in range(weight.shape[0]):
        keep[row, score[row].argsort(descending=True)[:n_keep]] = True
    return keep


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_wanda_masks_per_expert_equal_brute_force(arch):
    """Every expert's up and down maps keep what Wanda keeps on the tokens routed to that expert; the
    routers are untouched and every other linear map of the block is pruned as in a dense model."""
    original = tiny_moe_model(arch)
    model = copy.deepcopy(original)
    ids = windows()
    report = prune(model, ids, method="wanda", sparsity=0.5, progress=False)
    inputs = moe_block_inputs(model, ids)  # the pruned model's own MoE inputs: sequential order
    k = model.config.num_experts_per_tok
    for index, (block, block0) in enumerate(zip(decoder_blocks(model), decoder_blocks(original))):
        experts, experts0 = block.mlp.experts, block0.mlp.experts
        top = router_top_k(block.mlp, inputs[index], k)
        for e in range(experts.num_experts):
            x = inputs[index][(top == e).any(-1)]
            up, down = expert_weights(experts, e)
            up0, down0 = expert_weights(experts0, e)
            assert torch.equal(up != 0, wanda_keep(up0, x, 0.5)), (index, e)
            h = gated(experts, x @ up.T + (experts.gate_up_proj_bias[e].double() if experts.has_bias else 0))
            assert torch.equal(down != 0, wanda_keep(down0, h, 0.5)), (index, e)
            assert report.expert_tokens[f"model.layers.{index}.mlp.experts.{e}"] == x.shape[0]
        router = getattr(block.mlp, "router", None) or block.mlp.gate
        router0 = getattr(block0.mlp, "router", None) or block0.mlp.gate
        assert torch.equal(router.weight, router0.weight)
    assert sum(report.expert_tokens[f"model.layers.0.mlp.experts.{e}"] for e in range(4)) == ids.numel() * k
    assert report.overall_sparsity == pytest.approx(0.5)


def test_shared_expert_pruned_and_its_gate_kept():
    """Qwen2-MoE: the shared expert is an ordinary MLP (pruned); its one-output gate routes (kept)."""
    original = tiny_moe_model("qwen2_moe")
    model = copy.deepcopy(original)
    prune(model, windows(), method="wanda", sparsity=0.5, progress=False)
    block, block0 = decoder_blocks(model)[0], decoder_blocks(original)[0]
    names = [lin.name for lin in block_linears(block)]
    assert "mlp.shared_expert.up_proj" in names and "mlp.shared_expert_gate" not in names
    assert torch.equal(block.mlp.shared_expert_gate.weight, block0.mlp.shared_expert_gate.weight)
    assert (block.mlp.shared_expert.up_proj.weight == 0).float().mean() == 0.5


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_calibrate_all_experts_uses_every_token(arch):
    """With every token for every expert, each expert's up map is scored on the whole block input."""
    original = tiny_moe_model(arch)
    model = copy.deepcopy(original)
    ids = windows()
    report = prune(model, ids, method="wanda", sparsity=0.5, progress=False, all_experts=True)
    x = moe_block_inputs(model, ids)[0]
    for e in range(4):
        up, _ = expert_weights(decoder_blocks(model)[0].mlp.experts, e)
        up0, _ = expert_weights(decoder_blocks(original)[0].mlp.experts, e)
        assert torch.equal(up != 0, wanda_keep(up0, x, 0.5))
        assert report.expert_tokens[f"model.layers.0.mlp.experts.{e}"] == ids.numel()


def test_sparsegpt_uses_each_experts_own_gram():
    """SparseGPT on an expert equals the solver run on the Gram of that expert's routed tokens (parallel
    order: the statistics of the unpruned block)."""
    original = tiny_moe_model("olmoe", experts=6)
    model = copy.deepcopy(original)
    ids = windows()
    prune(model, ids, method="sparsegpt", sparsity=0.5, progress=False, within_block="parallel")
    x = moe_block_inputs(original, ids)[0]  # block 0 sees the same inputs in both models
    top = router_top_k(decoder_blocks(original)[0].mlp, x, 2)
    experts, experts0 = decoder_blocks(model)[0].mlp.experts, decoder_blocks(original)[0].mlp.experts
    for e in range(6):
        routed = x[(top == e).any(-1)].float()
        expected = sparsegpt_prune(experts0.gate_up_proj[e].clone(), routed.T @ routed, sparsity=0.5)[0]
        torch.testing.assert_close(experts.gate_up_proj[e], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_two_four_and_magnitude_cover_every_expert(arch):
    model = tiny_moe_model(arch)
    prune(model, windows(), method="wanda", pattern="2:4", progress=False)
    for block in decoder_blocks(model):
        for experts in block_experts(block):
            for expert_map in experts.all_maps():
                w = expert_map.weight
                assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), expert_map.name
    model = tiny_moe_model(arch)
    prune(model, None, method="magnitude", sparsity=0.25, progress=False)
    for experts in block_experts(decoder_blocks(model)[1]):
        for expert_map in experts.all_maps():
            assert ((expert_map.weight == 0).sum(1) == expert_map.in_features // 4).all()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_saved_pruned_moe_reloads_with_identical_logits(arch, tmp_path):
    """The prune job's output loads in plain transformers and gives the pruned model's logits; the record
    says how many tokens each expert saw and its sparsity."""
    import json

    from wandamerge.jobs.prune import prune_to_directory

    source = tmp_path / "src"
    tiny_moe_model(arch).save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    calib = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "out"
    record = prune_to_directory(str(source), out, calib=str(tmp_path / "calib.pt"), nsamples=4, seqlen=24,
                                sparsity=0.5, progress=False, low_memory=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = copy.deepcopy(AutoModelForCausalLM.from_pretrained(source).eval())
    prune(expected, calib, method="wanda", sparsity=0.5, progress=False)
    ids = windows(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)
    saved = json.loads((out / "wandamerge.json").read_text())
    assert saved["per_expert"]["model.layers.1.mlp.experts.3"]["sparsity"] == pytest.approx(0.5)
    assert sum(saved["per_expert"][f"model.layers.0.mlp.experts.{e}"]["tokens"] for e in range(4)) == 4 * 24 * 2
    assert record["sparsity"]["overall"] == pytest.approx(0.5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_low_memory_prune_equals_in_memory(arch, tmp_path):
    """Block by block from the shards (fused experts assembled from their per-expert tensors and split back
    on write, Mixtral's block_sparse_moe renamed) gives the in-memory prune's checkpoint, tensor for tensor."""
    from conftest import tensors
    from wandamerge.jobs.prune import prune_to_directory

    source = tmp_path / "src"
    tiny_moe_model(arch).save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    torch.save(windows(4, 24, seed=1), tmp_path / "calib.pt")
    settings = dict(calib=str(tmp_path / "calib.pt"), nsamples=4, seqlen=24, sparsity=0.5, progress=False)
    prune_to_directory(str(source), tmp_path / "mem", low_memory=False, **settings)
    record = prune_to_directory(str(source), tmp_path / "low", low_memory=True, **settings)
    assert record["settings"]["low_memory"]
    streamed, in_memory = tensors(tmp_path / "low"), tensors(tmp_path / "mem")
    assert streamed.keys() == in_memory.keys() == tensors(source).keys()
    for name in in_memory:
        assert torch.equal(streamed[name], in_memory[name]), name
    AutoModelForCausalLM.from_pretrained(tmp_path / "low")


def routed_inputs(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden states, top-k expert indices) each block's experts module is called with, from one plain
    forward: the model's own routing, whatever its router does (grouped top-k, score-correction biases)."""
    from wandamerge.runner import experts_call

    seen, handles = [], []
    for block in decoder_blocks(model):
        for experts in block_experts(block):
            def hook(module, args, kwargs):
                hidden, index, _ = experts_call(module, args, kwargs)
                seen.append((hidden.double(), index))
            handles.append(experts.module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("arch", MORE_MOE_ARCHS)
def test_more_families_prune_per_expert_and_reload(arch, tmp_path):
    """The other fused-expert families: each expert's up map keeps what Wanda keeps on the tokens the model's
    own router sends it; routers (Hunyuan's mlp.gate.wg too) are untouched; the saved model reloads in plain
    transformers with identical logits and streams block by block to the same tensors."""
    from conftest import tensors
    from wandamerge.jobs.prune import prune_to_directory

    original = tiny_moe_model(arch)
    source = tmp_path / "src"
    original.save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    ids = windows()
    model = copy.deepcopy(original)
    prune(model, ids, method="wanda", sparsity=0.5, progress=False)
    for (x, top), block, block0 in zip(routed_inputs(model, ids), decoder_blocks(model), decoder_blocks(original)):
        experts, experts0 = block_experts(block)[0], block_experts(block0)[0]
        for e in range(experts.num_experts):
            up, up0 = experts.maps(e)[0].weight.double(), experts0.maps(e)[0].weight.double()
            assert torch.equal(up != 0, wanda_keep(up0, x[(top == e).any(-1)], 0.5)), (arch, e)
        kept = {n: p for n, p in block0.named_parameters() if any(r in n.split(".") for r in ("gate", "router"))
                and "experts" not in n}
        assert kept and all(torch.equal(dict(block.named_parameters())[n], p) for n, p in kept.items())
    torch.save(ids, tmp_path / "calib.pt")
    settings = dict(calib=str(tmp_path / "calib.pt"), nsamples=4, seqlen=24, sparsity=0.5, progress=False)
    prune_to_directory(str(source), tmp_path / "mem", low_memory=False, **settings)
    prune_to_directory(str(source), tmp_path / "low", low_memory=True, **settings)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    streamed, in_memory = tensors(tmp_path / "low"), tensors(tmp_path / "mem")
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[n], in_memory[n]) for n in in_memory)


def test_unsupported_moe_layouts_are_refused_in_one_line(tmp_path, monkeypatch):
    """An MoE family outside the table is refused naming its model_type, before any weight is read; an
    experts module with a norm after each expert (which the per-expert inputs would not reproduce) too."""
    import json

    from click.testing import CliRunner

    from wandamerge.cli import main
    from wandamerge.errors import ModelError

    folder = tmp_path / "next"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_next", "architectures": ["X"]}))
    result = CliRunner().invoke(main, ["-q", "prune", str(folder), "--method", "magnitude", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'qwen3_next'" in result.output and "unsupported architecture" in result.output
    assert len(result.output.strip().splitlines()) == 1
    model = tiny_moe_model("mixtral")
    monkeypatch.setattr(decoder_blocks(model)[0].mlp.experts, "has_post_expert_norm", True, raising=False)
    with pytest.raises(ModelError, match="MixtralExperts: experts with a norm after each expert"):
        prune(model, windows(), method="wanda", progress=False)


@pytest.mark.parametrize("arch", MOE_ARCHS + MORE_MOE_ARCHS)
def test_in_memory_moe_is_saved_as_save_pretrained_saves_it(arch, tmp_path):
    """The prune job writes an in-memory MoE model tensor by tensor (save_pretrained would clone every fused
    expert tensor it splits): the same names, shapes and values as save_pretrained's own output."""
    from conftest import tensors
    from wandamerge.jobs.prune import prune_to_directory

    source = tmp_path / "src"
    tiny_moe_model(arch).save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    prune_to_directory(str(source), tmp_path / "ours", method="magnitude", sparsity=0.5, progress=False,
                       low_memory=False)
    model = AutoModelForCausalLM.from_pretrained(source)
    prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    model.save_pretrained(tmp_path / "theirs")
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
