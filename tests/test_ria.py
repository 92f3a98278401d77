"""RIA and its N:M input-channel permutation, against references computed independently: the score by loops
over i and j, masks from the hooked inputs of the whole model, the permutation folded in by hand, the kept
score by loops over the groups, and every assignment round against all the permutations of a small case."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

import wandamerge
from wandamerge.core.permutation import nm_permutation, reallocated_order, reassign_position
from wandamerge.core.scores import RIA_A, ria_score
from wandamerge.errors import ConfigError
from wandamerge.jobs.prune import PruneConfig, prune_to_directory
from wandamerge.models import block_linears, decoder_blocks, permutable_inputs
from wandamerge.pruning.permutation import reorder_for_nm

from conftest import ARCHS, VOCAB, linear_inputs, tiny_model, tiny_moe_model, word_tokenizer
from test_cli import run
from test_prune_end_to_end import inputs_of, linear_modules, out_in
from test_streaming import assert_same_model

WINDOWS = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------- brute-force references


def brute_ria(weight: torch.Tensor, x: torch.Tensor, a: float = RIA_A) -> torch.Tensor:
    """RIA entry by entry in float64: (|W_ij| / sum_j' |W_ij'| + |W_ij| / sum_i' |W_i'j|) * ||X_j||_2 ** a,
    with ||X_j||_2 over the tokens (rows) of ``x``; a share of a zero sum is 0."""
    rows, cols = weight.shape
    w = [[abs(float(weight[i, j])) for j in range(cols)] for i in range(rows)]
    row_sums = [sum(w[i]) for i in range(rows)]
    col_sums = [sum(w[i][j] for i in range(rows)) for j in range(cols)]
    norms = [sum(float(v) ** 2 for v in x[:, j].tolist()) ** 0.5 for j in range(cols)]
    share = (lambda v, total: v / total if total else 0.0)
    return torch.tensor([[(share(w[i][j], row_sums[i]) + share(w[i][j], col_sums[j])) * norms[j] ** a
                          for j in range(cols)] for i in range(rows)], dtype=torch.float64)


def lowest(entries: list[tuple[float, int]], k: int) -> list[int]:
    """The indices of the ``k`` entries (score, index) dropped first: lowest score, then the higher index."""
    return [index for _, index in sorted(entries, key=lambda e: (e[0], -e[1]))[:k]]


def brute_drop(score: torch.Tensor, sparsity: float = 0.5, group: str = "tensor",
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """The pruned entries (True = dropped): n of every m in a row, floor(sparsity * n) of each row, or of the
    whole tensor."""
    rows, cols = score.shape
    drop = torch.zeros(rows, cols, dtype=torch.bool)
    s = score.tolist()
    if nm:
        n, m = nm
        for i in range(rows):
            for start in range(0, cols, m):
                for j in lowest([(s[i][j], j) for j in range(start, start + m)], n):
                    drop[i, j] = True
    elif group == "row":
        for i in range(rows):
            for j in lowest([(s[i][j], j) for j in range(cols)], int(cols * sparsity)):
                drop[i, j] = True
    else:
        for flat in lowest([(s[i][j], i * cols + j) for i in range(rows) for j in range(cols)],
                           int(rows * cols * sparsity)):
            drop[flat // cols, flat % cols] = True
    return drop


def kept_by_loops(score: torch.Tensor, n: int, m: int) -> float:
    """The total an N:M mask keeps, group by group: the m - n largest of every m consecutive entries."""
    total = 0.0
    for row in score.double().tolist():
        for start in range(0, len(row), m):
            total += sum(sorted(row[start:start + m], reverse=True)[:m - n])
    return total


def fold_by_hand(block, name: str, score: torch.Tensor, n: int, m: int, config) -> torch.Tensor:
    """A Llama block's down_proj or o_proj reordered by hand: the rows of gate_proj and up_proj (or, per value
    head, of v_proj: query head q reads value head q // (heads / kv_heads)) and the consumer's columns, by
    nm_permutation of its score (every query head of a value head stacked). Returns the score reordered."""
    mlp, attn = block.mlp, block.self_attn
    if name == "mlp.down_proj":
        perm = nm_permutation(score, n, m)
        for producer in (mlp.gate_proj, mlp.up_proj):
            producer.weight.data = producer.weight.data[perm]
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, perm]
        return score[:, perm]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim, shared = config.hidden_size // heads, heads // kv_heads
    score = score.clone()
    for h in range(kv_heads):
        queries = [range(q * head_dim, (q + 1) * head_dim) for q in range(h * shared, (h + 1) * shared)]
        perm = nm_permutation(torch.cat([score[:, list(cols)] for cols in queries]), n, m)
        values = torch.arange(h * head_dim, (h + 1) * head_dim)
        attn.v_proj.weight.data[values] = attn.v_proj.weight.data[values[perm]]
        for cols in queries:
            cols = torch.tensor(list(cols))
            attn.o_proj.weight.data[:, cols] = attn.o_proj.weight.data[:, cols[perm]]
            score[:, cols] = score[:, cols[perm]]
    return score


def reference_ria(model, windows, order: str, nm=None, sparsity=0.5, group="tensor", permute=False) -> None:
    """RIA the slow way: every map's inputs from a whole-model forward (of the unpruned block for
    ``parallel``; after every earlier map is pruned for ``sequential``), scored and masked by brute force,
    down_proj and o_proj reordered by hand first with ``permute``."""
    for block in decoder_blocks(model):
        maps = linear_modules(block)
        xs = {name: inputs_of(model, mod, windows) for name, mod in maps} if order == "parallel" else {}
        for name, mod in maps:
            x = xs[name] if order == "parallel" else inputs_of(model, mod, windows)
            score = brute_ria(out_in(mod), x)
            if permute and name in ("mlp.down_proj", "self_attn.o_proj"):
                score = fold_by_hand(block, name, score, *nm, model.config)
            with torch.no_grad():
                out_in(mod)[brute_drop(score, sparsity, group, nm)] = 0


# ----------------------------------------------------------------------------- the score


def test_ria_score_equals_the_formula_entry_by_entry():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, generator=g)
    weight[2] = 0  # a row of zeros and a column of zeros: shares of 0, not NaN
    weight[:, 4] = 0
    x = torch.randn(11, 7, generator=g)
    sq_norms = (x.double() ** 2).sum(0).float()
    for a in (RIA_A, 0.0, 1.0):
        got = ria_score(weight, sq_norms, a) if a != RIA_A else ria_score(weight, sq_norms)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), brute_ria(weight, x, a), rtol=1e-5, atol=1e-7)


def test_ria_score_worked_by_hand():
    weight = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
    # row sums 4, 2; column sums 3, 3; norms 2 and 1 (a = 0.5: sqrt 2 and 1)
    expected = torch.tensor([[(1 / 4 + 1 / 3) * 2 ** 0.5, (3 / 4 + 3 / 3) * 1.0],
                             [(2 / 2 + 2 / 3) * 2 ** 0.5, 0.0]])
    torch.testing.assert_close(ria_score(weight, torch.tensor([4.0, 1.0])), expected)


# ----------------------------------------------------------------------------- masks of a tiny model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("shape", [{}, {"group": "row"}, {"pattern": "2:4"}, {"sparsity": 0.3}])
def test_first_block_masks_equal_brute_force_from_the_hooked_inputs(model_dir, arch, shape):
    path = model_dir(arch)
    inputs = linear_inputs(path, WINDOWS)
    model = AutoModelForCausalLM.from_pretrained(path)
    dense = {name: out_in(mod).clone() for name, mod in linear_modules(decoder_blocks(model)[0])}
    report = wandamerge.prune(model, WINDOWS, method="ria", within_block="parallel", progress=False, **shape)
    assert report.target["group"] == shape.get("group", "tensor")  # RIA's own default: per tensor
    nm = tuple(map(int, shape["pattern"].split(":"))) if "pattern" in shape else None
    prefix = "transformer.h.0." if arch == "gpt2" else "model.layers.0."
    for name, mod in linear_modules(decoder_blocks(model)[0]):
        score = brute_ria(dense[name], inputs[f"{prefix}{name}.weight"])
        expected = brute_drop(score, shape.get("sparsity", 0.5), shape.get("group", "tensor"), nm)
        assert torch.equal(out_in(mod) == 0, expected), name


@pytest.mark.parametrize("order", ["sequential", "parallel"])
@pytest.mark.parametrize("permute", [False, True])
def test_every_block_equals_the_slow_reference(order, permute):
    """N:M RIA over both blocks of a GQA Llama (4 query heads, 2 value heads), with and without the channel
    permutation; in the sequential order the reference recomputes every map's inputs through the model as
    it is (reordered, partly pruned), which also checks that the pass feeds a reordered map its input in the
    new order."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    wandamerge.prune(model, WINDOWS, method="ria", pattern="2:4", permute=permute, within_block=order,
                     progress=False)
    reference_ria(reference, WINDOWS, order, nm=(2, 4), permute=permute)
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(got, want), name


def matched_rows(saved: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Which dense row every saved (reordered, pruned) row is: the one equal to it where it is not zero."""
    kept = saved != 0
    return torch.tensor([int(((dense - row) * keep).abs().sum(1).argmin()) for row, keep in zip(saved, kept)])


def test_update_refits_a_reordered_map_on_its_reordered_inputs(model_dir):
    """The least-squares refit of a reordered down_proj uses X^T X in the new order: the first block of the
    parallel order equals SparseGPT's fixed-mask sweep of the dense weight's reordered columns on the
    hooked dense inputs' reordered Gram matrix (the order read off the saved gate_proj's rows)."""
    from wandamerge.core.sparsegpt import sparsegpt_prune

    path = model_dir("llama")
    x = linear_inputs(path, WINDOWS)["model.layers.0.mlp.down_proj.weight"].float()
    model = AutoModelForCausalLM.from_pretrained(path)
    mlp = decoder_blocks(model)[0].mlp
    dense_gate, dense_down = mlp.gate_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()
    wandamerge.prune(model, WINDOWS, method="ria", pattern="2:4", permute=True, update=True,
                     within_block="parallel", progress=False)
    order = matched_rows(mlp.gate_proj.weight.detach(), dense_gate)
    assert sorted(order.tolist()) == list(range(64)) and not torch.equal(order, torch.arange(64))
    xo = x[:, order]
    want, _ = sparsegpt_prune(dense_down[:, order], xo.T @ xo, keep=mlp.down_proj.weight != 0)
    torch.testing.assert_close(mlp.down_proj.weight.detach(), want, rtol=1e-4, atol=1e-5)


def test_update_keeps_the_mask_and_refits_the_kept_weights():
    plain, updated = tiny_model("llama"), tiny_model("llama")
    for model, update in ((plain, False), (updated, True)):
        wandamerge.prune(model, WINDOWS, method="ria", pattern="2:4", permute=True, update=update,
                         within_block="parallel", progress=False)
    for (name, a), (_, b) in zip(linear_modules(decoder_blocks(plain)[0]), linear_modules(decoder_blocks(updated)[0])):
        assert torch.equal(out_in(a) == 0, out_in(b) == 0), name  # the first block: the same statistics
        assert not torch.equal(out_in(a), out_in(b)), name


# ----------------------------------------------------------------------------- the permutation, pure


def test_reallocation_lays_the_ranked_channels_out_as_the_official_code():
    # column sums rank the channels 5, 2, 7, 0, 3, 6, 1, 4 (ascending); two groups of four: ranges
    # [5, 2], [7, 0], [3, 6], [1, 4]; position 1 and 3 take their range backwards
    ranked = [5, 2, 7, 0, 3, 6, 1, 4]
    score = torch.zeros(1, 8)
    for rank, channel in enumerate(ranked):
        score[0, channel] = rank
    assert reallocated_order(score, 4).tolist() == [5, 0, 3, 4, 2, 7, 6, 1]


@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (3, 4), (1, 2)])
def test_each_assignment_round_is_the_best_over_all_permutations(nm):
    n, m = nm
    for seed in range(5):
        score = torch.rand(3, 4 * m, generator=torch.Generator().manual_seed(seed))
        for position in range(m):
            def kept_after(taken):
                order = torch.arange(4 * m)
                order[position::m] = order[position::m][torch.tensor(taken)]
                return kept_by_loops(score[:, order], n, m)
            best = max(kept_after(list(p)) for p in itertools.permutations(range(4)))
            assert kept_after(reassign_position(score, n, m, position).tolist()) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "heavy", "ties"])
def test_the_permutation_never_keeps_less_than_no_permutation(kind):
    improved = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        n, m = [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8)][seed % 6]
        rows, groups = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
        raw = {"uniform": torch.rand(rows, groups * m, generator=g),
               "heavy": torch.randn(rows, groups * m, generator=g).abs() ** 3,
               "ties": torch.randint(0, 3, (rows, groups * m), generator=g).float()}[kind]
        order = nm_permutation(raw, n, m)
        assert sorted(order.tolist()) == list(range(groups * m))
        before, after = kept_by_loops(raw, n, m), kept_by_loops(raw[:, order], n, m)
        assert after >= before - 1e-9 * max(1.0, before)
        improved += after > before + 1e-9
    assert improved >= 20  # and it does reorder: most cases keep strictly more


# ----------------------------------------------------------------------------- the permutation, folded in


def _models():
    gqa = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {**{arch: lambda arch=arch: _spread(tiny_model(arch)) for arch in ARCHS},
            "llama-mqa": lambda: _spread(AutoModelForCausalLM.from_config(LlamaConfig(num_key_value_heads=1, **gqa))),
            "phi3": lambda: _spread(AutoModelForCausalLM.from_config(Phi3Config(num_key_value_heads=2, **gqa)))}


def _spread(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim == 2 else p.add_(torch.randn_like(p) * 0.1)  # biases and norms too
    return model.eval()


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_a_permuted_model_gives_the_same_logits_before_pruning(name, nm):
    model = _models()[name]()
    with torch.no_grad():
        before = model(WINDOWS).logits
    changed = []
    for block in decoder_blocks(model):
        maps = {linear.name: linear for linear in block_linears(block)}
        dense = {key: linear.weight.clone() for key, linear in maps.items()}
        for key, groups in permutable_inputs(block, model.config).items():
            score = torch.rand(maps[key].weight.shape, generator=torch.Generator().manual_seed(len(changed)))
            reorder_for_nm(block, maps[key], groups, score, *nm)
        changed += [key for key in maps if not torch.equal(maps[key].weight, dense[key])]
    with torch.no_grad():
        after = model(WINDOWS).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert len(changed) >= 8  # consumers and producers of both blocks moved: the check is not vacuous


def test_the_reorderable_maps_of_a_gqa_llama():
    model = tiny_model("llama")  # 4 query heads of 8 channels sharing 2 value heads; MLP width 64
    found = permutable_inputs(decoder_blocks(model)[0], model.config)
    assert set(found) == {"mlp.down_proj", "self_attn.o_proj"}  # never q, k, v, gate, up: the residual stream
    (mlp,) = found["mlp.down_proj"]
    assert (mlp.width, mlp.columns, mlp.rows) == (64, (0,), (("mlp.gate_proj", 0), ("mlp.up_proj", 0)))
    heads = found["self_attn.o_proj"]
    assert [(h.width, h.columns, h.rows) for h in heads] == [(8, (0, 8), (("self_attn.v_proj", 0),)),
                                                             (8, (16, 24), (("self_attn.v_proj", 8),))]


# ----------------------------------------------------------------------------- the job, saved models, refusals


def _saved(tmp_path, arch="llama"):
    path = tmp_path / arch
    tiny_model(arch).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    torch.save(WINDOWS, tmp_path / "calib.pt")
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_output_loads_with_plain_transformers_and_is_n_m_as_stored(tmp_path, arch):
    path = _saved(tmp_path, arch)
    record = prune_to_directory(str(path), tmp_path / "out", method="ria", pattern="2:4", permute=True,
                                calib=str(tmp_path / "calib.pt"), progress=False)
    assert record["settings"]["permute"] and record["settings"]["group"] == "tensor"
    in_memory = tiny_model(arch)
    wandamerge.prune(in_memory, WINDOWS, method="ria", pattern="2:4", permute=True, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for block in decoder_blocks(loaded):
        for linear in block_linears(block):
            zeros = (linear.weight == 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
            assert torch.all(zeros >= 2), linear.name
    with torch.no_grad():
        assert torch.equal(loaded(WINDOWS).logits, in_memory(WINDOWS).logits)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "input channels reordered" in card
    assert json.loads((tmp_path / "out" / "wandamerge.json").read_text())["settings"]["method"] == "ria"


def test_low_memory_gives_the_same_permuted_model(tmp_path):
    path = _saved(tmp_path)
    for low_memory in (False, True):
        prune_to_directory(str(path), tmp_path / f"out-{low_memory}", method="ria", pattern="2:4", permute=True,
                           calib=str(tmp_path / "calib.pt"), low_memory=low_memory, progress=False)
    assert_same_model(tmp_path / "out-False", tmp_path / "out-True")


def test_group_defaults_to_the_method_s_own():
    assert PruneConfig.of(model="m", method="ria").target().group == "tensor"
    assert PruneConfig.of(model="m", method="ria", group="row").target().group == "row"
    assert PruneConfig.of(model="m", method="wanda").target().group == "row"


@pytest.mark.parametrize("settings, words", [
    ({"method": "ria", "permute": True}, "--permute reorders input channels for an N:M pattern"),
    ({"method": "sparsegpt", "pattern": "2:4", "permute": True}, "--permute reorders channels by a score"),
    ({"method": "ria", "variant": True}, "per-row"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(settings, words):
    with pytest.raises(ConfigError) as info:
        PruneConfig.of(model="m", **settings)
    assert words in str(info.value) and "\n" not in str(info.value).strip()


def test_models_that_cannot_be_reordered_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="no map of a 'mixtral' model"):
        wandamerge.prune(tiny_moe_model("mixtral"), WINDOWS, method="ria", pattern="2:4", permute=True,
                         progress=False)
    with pytest.raises(ConfigError, match="self_attn.o_proj reads channels in runs of 8, not a multiple of 16"):
        wandamerge.prune(tiny_model("llama"), WINDOWS, method="ria", pattern="2:16", permute=True, progress=False)


def test_the_command_line_refuses_in_one_line_before_calibrating(tmp_path):
    path = _saved(tmp_path)
    result = run("prune", path, "-o", tmp_path / "out", "--method", "ria", "--permute")
    assert result.exit_code == 2 and "--permute reorders input channels" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = run("prune", path, "-o", tmp_path / "out", "--method", "ria", "--pattern", "2:16", "--permute",
                 "--calib", "no-such-file.txt")
    assert result.exit_code == 2 and "not a multiple of 16" in result.output  # before the calibration file
    result = run("prune", path, "-o", tmp_path / "out", "--method", "ria", "--pattern", "2:4", "--permute",
                 "--calib", tmp_path / "calib.pt")
    assert result.exit_code == 0, result.output
