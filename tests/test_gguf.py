"""GGUF input: a tiny Llama written as GGUF (as llama.cpp's converter lays it out) loads back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import wandamerge
from wandamerge.cli import main

from conftest import VOCAB, tiny_model

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    tokens = ["[PAD]", "[BOS]", "[UNK]"] + [f"w{i}" for i in range(3, c.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_block.items()})
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        w = state[hf_name].float().numpy()
        if ".q_proj" in hf_name:
            w = llama_cpp_permute(w, c.num_attention_heads)
        if ".k_proj" in hf_name:
            w = llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_file(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    write_llama_gguf(model, path)
    return model, path


def test_gguf_loads_as_a_plain_model_with_the_same_logits(gguf_file, tmp_path):
    reference, path = gguf_file
    model, tokenizer = wandamerge.load_model(path)
    assert not hasattr(model.config, "quantization_config")
    x = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=1e-5)
    wandamerge.save_model(model, tokenizer, tmp_path / "saved")  # a GGUF-loaded model would refuse this
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_prune_command_accepts_a_gguf_path(gguf_file, tmp_path):
    _, path = gguf_file
    torch.save(torch.randint(3, VOCAB, (4, 16)), tmp_path / "calib.pt")
    result = CliRunner().invoke(main, ["-q", "prune", str(path), "-o", str(tmp_path / "out"),
                                       "--calib", str(tmp_path / "calib.pt"), "--pattern", "2:4"])
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    w = pruned.model.layers[0].self_attn.q_proj.weight
    assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output
