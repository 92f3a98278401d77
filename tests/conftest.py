"""Tiny random models built from configs, and a word-level tokenizer, for fast tests."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from collections.abc import Sequence

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          OPTConfig, PreTrainedTokenizerFast, Qwen2Config)

VOCAB = 96


def tiny_config(arch: str):
    """A 2-block model of each supported family, widths divisible by 8 (for 4:8)."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=32, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=128, **common)
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox"]
MOE_ARCHS = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "qwen2_moe"]
MORE_MOE_ARCHS = ["deepseek_v3", "glm4_moe", "dots1", "phimoe", "minimax", "granitemoe", "hunyuan_v1_moe"]


def tiny_moe_config(arch: str, experts: int = 4):
    """A 2-block mixture-of-experts model of each fused-expert family transformers 5 ships that we test:
    ``experts`` experts, top-2 routing, widths divisible by 8."""
    from transformers import GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32,
                  intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=2)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=experts, **common)
    if arch == "gpt_oss":
        return GptOssConfig(num_local_experts=experts, head_dim=8, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=16, head_dim=8, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(num_experts=experts, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                              **common)
    if arch == "olmoe":
        return OlmoeConfig(num_experts=experts, **common)
    if arch in MORE_MOE_ARCHS:  # the other fused-expert families, through AutoConfig (each reads its own keys)
        from transformers import AutoConfig

        common.update(num_key_value_heads=4, head_dim=8, moe_intermediate_size=16, num_experts=experts,
                      num_local_experts=experts, n_routed_experts=experts, first_k_dense_replace=0, n_group=1,
                      topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                      v_head_dim=8, n_shared_experts=1)
        return AutoConfig.for_model(arch, **common)
    raise KeyError(arch)


def tiny_moe_model(arch: str, seed: int = 0, experts: int = 4):
    """A tiny random MoE model, its matrices and expert tensors spread N(0, 0.2) so that masks are decisive."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, experts)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    return model


def tiny_model(arch: str, seed: int = 0, num_layers: int | None = None):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:  # one entry per block, as the config made them
            config.layer_types = [config.layer_types[0]] * num_layers
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-identical tiny weights; spread them so masks are decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def finetune_of(base, seed: int, scale: float = 0.05):
    """A 'fine-tune': the base plus a random, seeded change of every tensor."""
    model = AutoModelForCausalLM.from_config(base.config).eval()
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def save(model, path):
    """The model and the word tokenizer in a transformers directory."""
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def save_with_tokens(model, path, tokens=(), special=(), seed: int = 0, chat_template: str | None = None):
    """The model with ``tokens`` (and ``special`` tokens) added to the word tokenizer, its embeddings and LM
    head resized to match, the new rows seeded N(0, 1); saved as a transformers directory. (Make every
    fine-tune of a base before resizing one: :func:`finetune_of`'s models share the base's config.)"""
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(list(tokens))
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    tokenizer.chat_template = chat_template
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weight[old:] = torch.randn(weight[old:].shape, generator=g)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mergekit_yaml(recipe_path, out, *flags: str) -> None:
    """mergekit 0.1.5 through its own command line (the module behind ``mergekit-yaml``), on one thread;
    ``flags`` replace the default ``--no-copy-tokenizer``."""
    pytest.importorskip("mergekit")
    done = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(recipe_path), str(out),
                           *(flags or ("--no-copy-tokenizer",)), "--no-lazy-unpickle", "--quiet"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def track_reads(monkeypatch) -> list[tuple[str, str]]:
    """Record every (checkpoint path, tensor name) read from now on, and fail a read of an input's tensor while
    an earlier tensor of the same input is still held (the merge streams one tensor per input)."""
    import gc
    import weakref

    from wandamerge.io.safetensors import Checkpoint

    live: list[tuple[str, str, weakref.ref]] = []
    reads: list[tuple[str, str]] = []
    read = Checkpoint.tensor

    def tracked(self, name):
        gc.collect()
        held = [(path, held_name) for path, held_name, ref in live if path == str(self.path) and ref() is not None]
        assert not held, f"reading {name} of {self.path} while {held} is held"
        tensor = read(self, name)
        live.append((str(self.path), name, weakref.ref(tensor)))
        reads.append((str(self.path), name))
        return tensor

    monkeypatch.setattr(Checkpoint, "tensor", tracked)
    return reads


def tensors(path) -> dict:
    """Every tensor of a saved model, by name."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Words w3..w{V-1} map to their number; [PAD]=0, [BOS]=1, [UNK]=2."""
    import tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[UNK]": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[UNK]")


def random_text(nwords: int, seed: int = 0, vocab_size: int = VOCAB) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (nwords,), generator=g)
    return " ".join(f"w{i}" for i in ids.tolist())


def random_windows(seed: int = 1, n: int = 4, length: int = 16) -> torch.Tensor:
    """Seeded calibration-like token windows ``(n, length)``, no special tokens."""
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture
def model_dir(tmp_path):
    """Save a tiny model of the given family with its tokenizer; returns the directory."""
    def make(arch: str = "llama", seed: int = 0):
        path = tmp_path / f"{arch}-{seed}"
        tiny_model(arch, seed).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        return path
    return make


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(4000, seed=1))
    return path


def linear_inputs(model_dir, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent reference: hook every linear of the UNMODIFIED model, whole-model forward; its
    inputs ``(tokens, in)`` in float64, keyed by the weight's name."""
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and (".layers." in name or ".h." in name):
            def hook(mod, args, name=name):
                seen[name + ".weight"] = args[0].reshape(-1, args[0].shape[-1]).double()
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return seen


def saved_family(tmp_path, arch: str = "llama", finetunes: int = 2) -> list:
    """A saved tiny base (first) and its seeded fine-tunes, as transformers directories."""
    base = tiny_model(arch)
    return [save(base, tmp_path / "base")] + [save(finetune_of(base, seed=i), tmp_path / f"ft{i}")
                                              for i in range(1, finetunes + 1)]


def own_calibration_windows(tmp_path, count: int, seed: int) -> list:
    """``count`` token files ``calib{i}.pt`` of 3 x 12 windows: one calibration per fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    windows = [torch.randint(3, VOCAB, (3, 12), generator=gen) for _ in range(count)]
    for i, w in enumerate(windows):
        torch.save(w, tmp_path / f"calib{i}.pt")
    return windows


class LoadedWhenIndexed(Sequence):
    """A sequence of tensors, each a fresh copy made when indexed (as the merge job's Grams, loaded from their
    files), that counts how many of its copies were alive at once (``most_alive``)."""

    def __init__(self, tensors):
        self.tensors, self.alive, self.most_alive = list(tensors), [], 0

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, index):
        self.alive = [ref for ref in self.alive if ref() is not None]
        made = self.tensors[index].clone()
        self.alive.append(weakref.ref(made))
        self.most_alive = max(self.most_alive, len(self.alive))
        return made
