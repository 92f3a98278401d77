"""2:4 weights as semi-structured sparse tensors, and the GPU benchmark's CPU dry run."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import wandamerge
from wandamerge import export
from wandamerge.export import check_2of4, conversion_problem, to_semi_structured
from wandamerge.models import block_linears, decoder_blocks
from wandamerge.core.scores import magnitude_score
from wandamerge.core.selection import keep_n_of_m

from conftest import VOCAB, tiny_model

REPO = Path(__file__).resolve().parents[1]


def brute_force_2of4(w: torch.Tensor) -> bool:
    rows, cols = w.shape
    if cols % 4:
        return False
    for r in range(rows):
        for g in range(0, cols, 4):
            if sum(1 for j in range(g, g + 4) if w[r, j].item() == 0) < 2:
                return False
    return True


def pruned_2of4(w: torch.Tensor) -> torch.Tensor:
    return w * keep_n_of_m(magnitude_score(w), 2, 4)


def test_check_2of4_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    cases = []
    # every zero pattern of one group of 4, in a 1x4 and embedded in a larger 2:4 matrix
    for bits in itertools.product([0, 1], repeat=4):
        cases.append(torch.tensor([[1.0 if b else 0.0 for b in bits]]))
        base = pruned_2of4(torch.randn(3, 12, generator=g))
        base[1, 4:8] = torch.tensor([1.0 if b else 0.0 for b in bits])
        cases.append(base)
    for _ in range(30):  # random sparse matrices, some 2:4 by chance
        w = torch.randn(4, 8, generator=g)
        cases.append(w * (torch.rand(4, 8, generator=g) < 0.4))
    cases += [pruned_2of4(torch.randn(8, 16, generator=g)), torch.zeros(2, 6), torch.randn(2, 3, generator=g),
              pruned_2of4(torch.randn(4, 8, generator=g)).half()]
    results = [check_2of4(w) for w in cases]
    assert results == [brute_force_2of4(w.float()) for w in cases]
    assert any(results) and not all(results)


def test_check_2of4_is_pure_and_wants_a_matrix():
    w = pruned_2of4(torch.randn(4, 8))
    before = w.clone()
    assert check_2of4(w) and torch.equal(w, before)
    with pytest.raises(ValueError, match="2-D"):
        check_2of4(torch.zeros(4))


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{lin.name}": lin.module.weight
            for i, b in enumerate(decoder_blocks(model)) for lin in block_linears(b)}


def test_cpu_model_is_refused_with_one_clear_line_and_left_unchanged():
    model = tiny_model("llama")
    wandamerge.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    before = {k: (w, w.detach().clone()) for k, w in _weights(model).items()}
    with pytest.raises(ValueError) as info:
        to_semi_structured(model)
    message = str(info.value)
    assert "\n" not in message
    assert "need a CUDA device (sm80+) and float16/bfloat16 weights; got cpu float32" in message
    assert "strict=False" in message
    for name, (obj, copy) in before.items():
        now = _weights(model)[name]
        assert now is obj and type(now) is nn.Parameter and torch.equal(now, copy)

    converted = to_semi_structured(model, strict=False)
    assert list(converted) == []
    assert len(converted.skipped) == 2 * 7
    assert all("CUDA device" in reason for reason in converted.skipped.values())
    assert "model.layers.0.self_attn.q_proj.weight" in converted.skipped
    assert all(_weights(model)[k] is obj for k, (obj, _) in before.items())


def test_half_precision_on_cpu_names_the_device():
    w = pruned_2of4(torch.randn(64, 64)).half()
    assert conversion_problem(w).endswith("got cpu float16")
    with pytest.raises(ValueError, match="CUDA"):
        export.semi_structured_weight(w)


# --- the selection logic, exercised on the CPU: the device check is patched to accept the CPU,
# --- and the compression builds a CUTLASS-layout tensor with PyTorch's own (device-agnostic) packing.

def _llama_64(dtype=torch.float16):
    """Widths that meet both backends' shape limits (CUTLASS: rows % 32, cols % 64)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    def fake_compress(weight, cls):
        packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
        return Cutlass(weight.shape, packed, meta, None, None, None)

    monkeypatch.setattr(export, "_device_ok", lambda weight: True)
    monkeypatch.setattr(export, "_where", lambda weight: weight.device.type)
    monkeypatch.setattr(export, "_compress", fake_compress)
    monkeypatch.setattr(export, "_has_cusparselt", lambda: False)


@pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")
def test_conversion_replaces_2of4_linears_and_keeps_their_values(cpu_as_gpu):
    model = _llama_64()
    wandamerge.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    dense = {k: w.detach().clone() for k, w in _weights(model).items()}
    embed = model.model.embed_tokens.weight
    converted = to_semi_structured(model)
    assert len(converted) == 14 and converted.skipped == {}
    assert converted[0] == "model.layers.0.self_attn.q_proj.weight"
    for name, w in _weights(model).items():
        assert isinstance(w, torch.sparse.SparseSemiStructuredTensor) and isinstance(w, nn.Parameter)
        assert not w.requires_grad
        assert torch.equal(w.to_dense(), dense[name])
    assert model.model.embed_tokens.weight is embed and type(model.lm_head.weight) is nn.Parameter
    again = to_semi_structured(model)  # idempotent
    assert list(again) == [] and set(again.skipped.values()) == {"already semi-structured"}


@pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")
def test_a_weight_that_is_not_2of4_is_refused_or_skipped_never_densified(cpu_as_gpu):
    model = _llama_64()
    wandamerge.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    down = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 of 4 kept
    before = {k: w for k, w in _weights(model).items()}
    with pytest.raises(ValueError, match=r"not 2:4 sparse.*model\.layers\.1\.mlp\.down_proj\.weight"):
        to_semi_structured(model)
    assert all(_weights(model)[k] is w for k, w in before.items())  # nothing touched

    converted = to_semi_structured(model, strict=False)
    assert len(converted) == 13
    assert list(converted.skipped) == ["model.layers.1.mlp.down_proj.weight"]
    assert down.weight is before["1.mlp.down_proj"] and down.weight[3, 8:12].tolist() == [1.0, 2.0, 3.0, 0.0]


@pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")
def test_unsupported_dtype_shape_and_conv1d_are_reported(cpu_as_gpu):
    model = _llama_64(torch.float32)
    wandamerge.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    with pytest.raises(ValueError, match=r"float16/bfloat16 weights; got cpu float32 \(all 14 decoder linear maps"):
        to_semi_structured(model)

    small = tiny_model("llama").half()  # hidden 32: only down_proj (32x64) meets CUTLASS's 32x64
    wandamerge.prune(small, None, method="magnitude", pattern="2:4", progress=False)
    with pytest.raises(ValueError, match=r"multiple of 64; got 32x32 \(model\.layers\.0\.self_attn\.q_proj"
                                         r"\.weight and 11 more of 14 maps"):
        to_semi_structured(small)
    converted = to_semi_structured(small, strict=False)
    assert list(converted) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert len(converted.skipped) == 12 and all("multiple of" in r for r in converted.skipped.values())

    gpt2 = tiny_model("gpt2").half()
    wandamerge.prune(gpt2, None, method="magnitude", pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="Conv1D"):
        to_semi_structured(gpt2)
    assert all("Conv1D" in r for r in to_semi_structured(gpt2, strict=False).skipped.values())

    with pytest.raises(ValueError, match="backend"):
        to_semi_structured(model, backend="triton")


# --- the benchmark's CPU dry run, as a program (tests do not import benchmark scripts)

def _run_benchmark(*args: str):
    import subprocess

    return subprocess.run([sys.executable, "benchmarks/gpu_sparse.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_benchmark_dry_run_writes_json_and_markdown(tmp_path):
    done = _run_benchmark("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_sparse.json").read_text())
    assert data["meta"]["mode"] == "dry-run" and data["meta"]["versions"]["torch"] == torch.__version__
    assert data["meta"]["clock"] == "time.perf_counter" and data["meta"]["date"]
    assert data["meta"]["command"].startswith("python benchmarks/gpu_sparse.py --dry-run --out ")

    matmul = data["results"]["matmul"]
    assert [(r["out"], r["in"], r["tokens"]) for r in matmul] == [
        (128, 128, 1), (128, 128, 16), (256, 128, 1), (256, 128, 16), (128, 256, 1), (128, 256, 16)]
    for r in matmul:
        assert r["dense"]["median_ms"] > 0
        for backend in ("cusparselt", "cutlass"):
            assert r[backend]["status"].startswith("skipped: semi-structured sparse tensors need a CUDA device")

    model = data["results"]["model"]
    assert model["dense"]["prefill_ms"] > 0 and model["dense"]["decode_ms_per_token"] > 0
    assert model["config"]["sparsity"] == pytest.approx(0.5)
    assert "CUDA device" in model["cusparselt"]["status"]

    prune = data["results"]["prune"]
    assert [(r["method"], r["target"]) for r in prune] == [("wanda", "2:4"), ("sparsegpt", "2:4")]
    assert all(r["wall_s"] > 0 and r["sparsity"] == pytest.approx(0.5) for r in prune)

    md = (tmp_path / "gpu_sparse.md").read_text()
    assert "## (a)" in md and "## (b)" in md and "## (c)" in md
    assert "| float32 | 256x128 (gate/up proj (tiny)) | 16 |" in md
    assert "| dense |" in md and "| sparsegpt | 2:4 |" in md
    assert "skipped: semi-structured sparse tensors need a CUDA device" in md
    assert "wrote" in done.stdout


def test_benchmark_refuses_to_dry_run_into_real_results():
    done = _run_benchmark("--dry-run", "--out", "benchmarks/results")
    assert done.returncode == 2 and "never writes to benchmarks/results" in done.stderr
    done = _run_benchmark("--dry-run", "--parts", "matmul,bogus")
    assert done.returncode == 2 and "unknown part 'bogus'" in done.stderr


# --- on a GPU only

@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse tensors need a CUDA device of sm80 or newer")
@pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")
@pytest.mark.parametrize("backend", ["auto", "cutlass"])
def test_converted_model_gives_the_logits_of_the_dense_masked_one(backend):
    from wandamerge.evaluation.perplexity import perplexity

    model = _llama_64().cuda()
    wandamerge.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        dense_logits = model(input_ids=ids, use_cache=False).logits.float()
    dense_ppl = perplexity(model, ids, progress=False)
    problem = conversion_problem(model.model.layers[0].mlp.down_proj.weight, backend=backend)
    if problem:  # a backend this GPU or build lacks (CUTLASS on sm90, no cuSPARSELt)
        pytest.skip(f"{backend}: {problem}")
    converted = to_semi_structured(model, backend=backend)
    assert len(converted) == 14
    with torch.inference_mode():
        sparse_logits = model(input_ids=ids, use_cache=False).logits.float()
        out = model(input_ids=ids[:, :1], use_cache=True)  # a decode-sized step (1 token) works too
    assert out.logits.shape[1] == 1
    torch.testing.assert_close(sparse_logits, dense_logits, atol=2e-2, rtol=2e-2)
    assert perplexity(model, ids, progress=False) == pytest.approx(dense_ppl, rel=1e-2)
