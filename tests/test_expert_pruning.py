"""Expert pruning of mixture-of-experts models: expert scores, dropped experts, saved models and refusals.

Tiny random models of every supported MoE family, built from transformers' own config classes, against
independent references: scores worked out token by token from the fused weights, the pruned model against
the original model with the dropped experts masked out of its routers, and saved models loaded back by plain
``transformers`` (no project code on that path).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from transformers import (AutoModelForCausalLM, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                          Qwen3MoeConfig)
from transformers.activations import ACT2FN

from conftest import tiny_model, word_tokenizer
from wandamerge.cli import main
from wandamerge.core.experts import expert_sums, frequency_score, kept_experts, reap_score
from wandamerge.errors import ConfigError, ModelError
from wandamerge.models import save_model
from wandamerge.pruning import prune_experts

FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "qwen2_moe"]
VOCAB = 64


def moe_config(family: str, experts: int = 4):
    """2 blocks, hidden 32, expert width 16, 4 heads / 2 KV heads of 8, top-2 routing."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts_per_tok=2,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        return MixtralConfig(num_local_experts=experts, **common)
    if family == "gpt_oss":
        return GptOssConfig(num_local_experts=experts, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                            **common)
    if family == "olmoe":
        return OlmoeConfig(num_experts=experts, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=16, **common)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(num_experts=experts, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                              **common)
    raise KeyError(family)


def moe_model(family: str, experts: int = 4, seed: int = 0):
    """A seeded tiny model; every weight spread to N(0, 0.3) so that routing is decisive."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, experts)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def windows(seed: int = 1, n: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def router_of(mlp):
    return mlp.router if hasattr(mlp, "router") else mlp.gate


# ----------------------------------------------------------------------------- pure functions, by hand


def test_expert_sums_and_scores_worked_by_hand():
    index = torch.tensor([[0, 2], [2, 1], [0, 2]])  # three tokens, top-2 of 4 experts (3 never chosen)
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    norms = torch.tensor([[2.0, 4.0], [1.0, 3.0], [6.0, 2.0]])
    stats = expert_sums(index, weights, norms, 4)
    assert stats.tokens.tolist() == [2, 1, 3, 0]
    assert stats.norm_sums.tolist() == [8.0, 3.0, 7.0, 0.0]
    assert stats.weighted_norm_sums.tolist() == [4.5, 1.5, 2.5, 0.0]  # 0.75*2+0.5*6, 0.5*3, 0.25*4+0.5*1+0.5*2
    assert reap_score(stats.tokens, stats.weighted_norm_sums).tolist() == pytest.approx([2.25, 1.5, 2.5 / 3, 0.0])
    assert frequency_score(stats.tokens, stats.norm_sums).tolist() == [8.0, 3.0, 7.0, 0.0]


def test_kept_experts_are_the_best_in_index_order_and_ties_keep_the_lower_index():
    assert kept_experts(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    assert kept_experts(torch.tensor([1.0, 2.0, 1.0, 1.0]), 2).tolist() == [0, 1]


# ----------------------------------------------------------------------------- scores against a brute force


def expert_by_hand(config, experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output for one token ``x``, from the fused weights (gpt-oss: stored (in, out), biases,
    gate and up interleaved, its clamped SwiGLU; the others: (out, in), gate then up halves)."""
    if config.model_type == "gpt_oss":
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[::2].clamp(max=config.swiglu_limit), gate_up[1::2].clamp(-config.swiglu_limit,
                                                                                     config.swiglu_limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * config.swiglu_alpha)
        return hidden @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
    return experts.down_proj[e] @ (ACT2FN[config.hidden_act](gate) * up)


def brute_force_scores(model, tokens: torch.Tensor) -> list[dict]:
    """Per block: REAP and frequency scores and token counts, looping over tokens, slots and experts, with
    the router's own top-k on the hidden states a whole-model forward brings to each MoE module."""
    caught, handles = {}, []
    for index, block in enumerate(model.model.layers):
        handles.append(block.mlp.register_forward_pre_hook(
            lambda module, args, index=index: caught.__setitem__(index, args[0].reshape(-1, args[0].shape[-1]))))
    logits(model, tokens)
    for handle in handles:
        handle.remove()
    out = []
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            x = caught[index]
            _, weights, chosen = router_of(block.mlp)(x)
            products = {e: [] for e in range(block.mlp.experts.num_experts)}
            for t in range(x.shape[0]):
                for slot in range(chosen.shape[1]):
                    e = int(chosen[t, slot])
                    norm = torch.linalg.vector_norm(expert_by_hand(model.config, block.mlp.experts, e, x[t]))
                    products[e].append((float(weights[t, slot]), float(norm)))
            out.append({
                "tokens": [len(products[e]) for e in products],
                "reap": [sum(g * n for g, n in p) / len(p) if p else 0.0 for p in products.values()],
                "frequency": [len(p) * (sum(n for _, n in p) / len(p)) if p else 0.0 for p in products.values()],
            })
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("score", ["reap", "frequency"])
def test_expert_scores_equal_a_token_by_token_brute_force(family, score):
    model, tokens = moe_model(family), windows()
    reference = brute_force_scores(model, tokens)
    report = prune_experts(model, tokens, keep=4, score=score, progress=False)  # keeps all: only scores
    for layer, expected in zip(report.layers, reference, strict=True):
        assert layer["tokens"] == expected["tokens"]
        assert sum(layer["tokens"]) == tokens.numel() * 2  # top-2
        torch.testing.assert_close(torch.tensor(layer["scores"]), torch.tensor(expected[score]), rtol=1e-5,
                                   atol=1e-6)


# ----------------------------------------------------------------------------- dropped experts


def per_expert_parameters(model) -> int:
    """One expert's share of an MoE module: its slices of the fused experts and its router row(s)."""
    mlp = model.model.layers[0].mlp
    experts = mlp.experts.num_experts
    tensors = [*mlp.experts.parameters(), *router_of(mlp).parameters()]
    return sum(t.numel() for t in tensors) // experts


@pytest.mark.parametrize("family, experts, keep", [("mixtral", 6, 3), ("qwen3_moe", 4, 2), ("olmoe", 4, 3),
                                                   ("gpt_oss", 4, 2), ("qwen2_moe", 4, 2)])
def test_pruned_model_loads_with_plain_transformers_smaller_and_with_the_count_rewritten(family, experts, keep,
                                                                                          tmp_path):
    model, tokens = moe_model(family, experts), windows()
    before = sum(p.numel() for p in model.parameters())
    share = per_expert_parameters(model)
    report = prune_experts(model, tokens, keep=keep, progress=False)
    save_model(model, None, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    key = "num_experts" if family in ("olmoe", "qwen2_moe") else "num_local_experts"
    assert config[key] == keep
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    after = sum(p.numel() for p in loaded.parameters())
    assert after == before - 2 * (experts - keep) * share == report.parameters["after"]
    assert [len(layer["kept"]) for layer in report.layers] == [keep, keep]
    torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_expert_gives_the_original_logits_after_save_and_reload(family, tmp_path):
    model, tokens = moe_model(family), windows()
    original = logits(model, tokens)
    report = prune_experts(model, tokens, keep=4, progress=False)
    assert all(layer["kept"] == [0, 1, 2, 3] for layer in report.layers)
    save_model(model, None, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(loaded, tokens), original, rtol=0, atol=0)


@contextmanager
def dropped_from_routing(model, dropped: list[list[int]]):
    """The model whose routers give the ``dropped`` experts of each block logit -inf: every router computes its
    logits with one ``F.linear``, masked here, and then applies its family's own softmax and top-k."""
    linear = torch.nn.functional.linear
    saved = []
    for block, drop in zip(model.model.layers, dropped, strict=True):
        router = router_of(block.mlp)
        original = router.forward

        def masked_linear(*args, drop=drop, **kwargs):
            out = linear(*args, **kwargs)
            out[..., drop] = float("-inf")
            return out

        def forward(hidden, original=original, masked_linear=masked_linear):
            with mock.patch.object(torch.nn.functional, "linear", masked_linear):
                return original(hidden)

        router.forward = forward
        saved.append(router)
    try:
        yield model
    finally:
        for router in saved:
            del router.forward


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_experts_equals_masking_them_out_of_the_routers(family, tmp_path):
    """Exact in every family, whether or not its router renormalizes the top-k weights (Mixtral and gpt-oss
    do; Qwen-MoE and OLMoE by default do not): a logit of -inf before the softmax is the same as no row at all,
    so the weights of the kept experts are the same softmax over the kept logits either way. (What would
    differ without renormalization is zeroing the dropped experts' probabilities after the softmax.)"""
    model, tokens = moe_model(family, experts=4), windows()
    save_model(model, None, tmp_path / "original")
    original = logits(model, tokens)
    report = prune_experts(model, tokens, keep=2, progress=False)
    save_model(model, None, tmp_path / "pruned")
    pruned = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval(), tokens)
    dropped = [sorted(set(range(4)) - set(layer["kept"])) for layer in report.layers]
    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path / "original").eval()
    with dropped_from_routing(reference_model, dropped):
        reference = logits(reference_model, tokens)
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned, original, atol=1e-3)  # the reference is not the original model


def test_the_kept_experts_are_the_best_scored_of_each_layer():
    model = moe_model("mixtral", experts=6)
    report = prune_experts(model, windows(), keep=3, score="frequency", progress=False)
    for layer in report.layers:
        best = sorted(range(6), key=lambda e: -layer["scores"][e])[:3]
        assert layer["kept"] == sorted(best)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("keep, message", [(1, "num_experts_per_tok"), (5, "the model has 4")])
def test_a_kept_count_the_model_cannot_run_with_is_refused_before_calibration(keep, message):
    with pytest.raises(ConfigError, match=message):
        prune_experts(moe_model("mixtral"), None, keep=keep)


def test_a_dense_model_and_an_unknown_score_are_refused():
    with pytest.raises(ModelError, match="no fused experts"):
        prune_experts(tiny_model("llama"), windows(), keep=2)
    with pytest.raises(ConfigError, match="did you mean 'reap'"):
        prune_experts(moe_model("mixtral"), windows(), keep=2, score="reaps")


# ----------------------------------------------------------------------------- the prune job and its command line


def run(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


@pytest.fixture
def mixtral_dir(tmp_path):
    path = tmp_path / "mixtral"
    moe_model("mixtral", experts=4).save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    torch.save(windows(), tmp_path / "calib.pt")
    return path


def test_prune_command_drops_experts_and_records_what_it_kept(mixtral_dir, tmp_path):
    out = tmp_path / "out"
    result = run("prune", mixtral_dir, "-o", out, "--structure", "experts", "--experts-kept", 2,
                 "--calib", tmp_path / "calib.pt")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["experts_kept"], summary["experts_of"]) == (2, 4)
    record = json.loads((out / "wandamerge.json").read_text())
    assert record["settings"]["structure"] == "experts" and "method" not in record["settings"]
    assert record["experts"]["score"] == "reap"
    layers = record["experts"]["per_layer"]
    assert [layer["block"] for layer in layers] == [0, 1]
    assert all(len(layer["kept"]) == 2 and len(layer["scores"]) == 4 and sum(layer["tokens"]) == 36 * 2
               for layer in layers)
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert "2 of 4 experts" in (out / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 2


@pytest.mark.parametrize("args, message", [
    (["--structure", "experts"], "needs experts_kept"),
    (["--structure", "experts", "--experts-kept", 2, "--pattern", "2:4"], "leave out pattern"),
    (["--experts-kept", 2], "only structure 'experts' uses experts_kept"),
    (["--structure", "experts", "--experts-kept", 2, "--expert-score", "reep"], "did you mean 'reap'"),
    (["--structure", "experts", "--experts-kept", 1], "num_experts_per_tok"),
    (["--structure", "experts", "--experts-kept", 5], "the model has 4"),
])
def test_bad_expert_settings_give_one_line_and_exit_2(mixtral_dir, tmp_path, args, message):
    result = run("prune", mixtral_dir, "-o", tmp_path / "out", "--calib", tmp_path / "calib.pt", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_prune_command_refuses_expert_pruning_of_a_dense_model(model_dir, tmp_path):
    torch.save(torch.randint(3, 96, (2, 8)), tmp_path / "calib.pt")
    result = run("prune", model_dir("llama"), "-o", tmp_path / "out", "--structure", "experts", "--experts-kept", 2,
                 "--calib", tmp_path / "calib.pt")
    assert result.exit_code == 2 and "no fused experts" in result.output, result.output
