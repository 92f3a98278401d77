"""Tests for the pure pruning functions: scores, masks, SparseGPT and the method registry.

Every check compares against an independent reference written here (python
loops over ``tolist()`` values, hand-worked small examples, least-squares
facts), never against the implementation itself. All tensors are small, so the
whole file runs in a few seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from wandamerge.core.selection import cumulative_alpha_keep, keep_after_pruning, keep_n_of_m, parse_pattern
from wandamerge.pruning.methods import PRUNE_METHODS, PruneTarget, get_prune_method
from wandamerge.core.scores import magnitude_score, wanda_score
from wandamerge.core.sparsegpt import sparsegpt_prune
from wandamerge.runner import InputStats, input_stats


# The selection functions return keep-masks (True = kept); these views give the pruned entries, which the
# references below describe.


def row_mask(score, sparsity):
    return ~keep_after_pruning(score, sparsity, "row")


def tensor_mask(score, sparsity):
    return ~keep_after_pruning(score, sparsity, "tensor")


def nm_mask(score, n, m):
    return ~keep_n_of_m(score, n, m)


def cumulative_alpha_mask(score, sparsity):
    keep, alpha = cumulative_alpha_keep(score, sparsity)
    return ~keep, alpha


# ----------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values; among ties the higher index is pruned first (the lower one kept)."""
    order = sorted(range(len(values)), key=lambda j: (values[j], -j))
    return set(order[:k])


def brute_row_mask(score: torch.Tensor, k: int) -> list[list[bool]]:
    rows = score.tolist()
    out = []
    for row in rows:
        low = brute_lowest(row, k)
        out.append([j in low for j in range(len(row))])
    return out


def brute_nm_mask(score: torch.Tensor, n: int, m: int) -> list[list[bool]]:
    out = []
    for row in score.tolist():
        mrow = []
        for g in range(0, len(row), m):
            low = brute_lowest(row[g:g + m], n)
            mrow.extend(j in low for j in range(m))
        out.append(mrow)
    return out


def recon_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    """||W X^T - W' X^T||_F in float64."""
    return torch.linalg.norm(w.double() @ x.double().T - w_new.double() @ x.double().T).item()


def correlated_inputs(seed: int, tokens: int = 512, width: int = 64) -> torch.Tensor:
    """X = Z @ A with a random mixing matrix A (identity + noise + a shared
    direction) and uneven channel scales: correlated columns (mean |corr| ~ 0.25)
    whose Gram matrix is still well conditioned (cond ~ 1e3) in float32."""
    g = gen(seed)
    z = torch.randn(tokens, width, generator=g)
    a = torch.eye(width) + 0.5 * torch.randn(width, width, generator=g) / math.sqrt(width)
    a = a + torch.randn(width, 1, generator=g) @ torch.randn(1, width, generator=g) / math.sqrt(width)
    scales = torch.exp(0.5 * torch.randn(width, generator=g))
    return (z @ a) * scales


# ----------------------------------------------------------------------------
# 1. scores and input statistics
# ----------------------------------------------------------------------------

def test_wanda_score_matches_double_loop():
    g = gen(1)
    w = torch.randn(7, 11, generator=g)
    x = torch.randn(40, 11, generator=g) * torch.linspace(0.1, 3.0, 11)
    sq = [0.0] * 11
    for row in x.tolist():
        for j, v in enumerate(row):
            sq[j] += v * v
    score = wanda_score(w, torch.tensor(sq))
    assert score.shape == (7, 11)
    assert score.dtype == torch.float32
    wl = w.tolist()
    for i in range(7):
        for j in range(11):
            expected = abs(wl[i][j]) * math.sqrt(sq[j])
            assert score[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_wanda_score_hand_example():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    sq = torch.tensor([4.0, 9.0])  # norms 2 and 3
    assert wanda_score(w, sq).tolist() == [[2.0, 6.0], [6.0, 1.5]]


def test_magnitude_score_is_abs():
    w = torch.tensor([[1.5, -2.0, 0.0]], dtype=torch.float16)
    s = magnitude_score(w)
    assert s.dtype == torch.float32
    assert s.tolist() == [[1.5, 2.0, 0.0]]


def test_input_stats_norms_and_gram_match_brute_force():
    g = gen(2)
    x = torch.randn(3, 10, 6, generator=g)  # (batch, seq, in): tokens are flattened
    stats = input_stats(x, {"norms", "gram"})
    assert isinstance(stats, InputStats)
    assert stats.tokens == 30
    rows = x.reshape(-1, 6).tolist()
    sq = [sum(r[j] ** 2 for r in rows) for j in range(6)]
    gram = [[sum(r[a] * r[b] for r in rows) for b in range(6)] for a in range(6)]
    assert stats.sq_norms.tolist() == pytest.approx(sq, rel=1e-5)
    for a in range(6):
        assert stats.gram[a].tolist() == pytest.approx(gram[a], rel=1e-4, abs=1e-4)


def test_input_stats_only_requested():
    x = torch.ones(4, 3)
    s = input_stats(x, {"norms"})
    assert s.gram is None
    assert s.sq_norms.tolist() == [4.0, 4.0, 4.0]
    s = input_stats(x, set())
    assert s.sq_norms is None and s.gram is None and s.tokens == 4


@pytest.mark.parametrize("bad_shape", [(5,), (4, 1), (1, 4), (3,)])
def test_wanda_score_wrong_norm_shape_raises(bad_shape):
    w = torch.randn(3, 4)
    with pytest.raises(ValueError):
        wanda_score(w, torch.ones(bad_shape))


# ----------------------------------------------------------------------------
# 2. row_mask
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.7, 0.99])
def test_row_mask_counts_and_lowest(sparsity):
    score = torch.rand(9, 23, generator=gen(3))
    mask = row_mask(score, sparsity)
    k = math.floor(23 * sparsity)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert mask.sum(dim=1).tolist() == [k] * 9
    assert mask.tolist() == brute_row_mask(score, k)


def test_row_mask_hand_worked_3x4():
    score = torch.tensor([
        [4.0, 1.0, 3.0, 2.0],
        [0.5, 0.7, 0.1, 0.9],
        [-1.0, 5.0, -2.0, 0.0],
    ])
    expected = [
        [False, True, False, True],   # 1.0, 2.0
        [True, False, True, False],   # 0.1, 0.5
        [True, False, True, False],   # -2.0, -1.0
    ]
    assert row_mask(score, 0.5).tolist() == expected
    assert row_mask(score, 0.25).tolist() == [
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, False],
    ]


def test_row_mask_sparsity_zero_prunes_nothing():
    score = torch.rand(5, 8, generator=gen(4))
    assert not row_mask(score, 0.0).any()
    # fewer than one column's worth also prunes nothing (floor)
    assert not row_mask(score, 0.1).any()


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.01, -1.0])
def test_row_mask_sparsity_out_of_range_raises(sparsity):
    with pytest.raises(ValueError):
        row_mask(torch.rand(2, 4), sparsity)


def test_row_mask_ties_keep_lower_column_first():
    score = torch.ones(3, 8)
    mask = row_mask(score, 0.5)
    assert mask.tolist() == [[False] * 4 + [True] * 4] * 3
    # the same scores always give the same mask
    assert torch.equal(row_mask(score, 0.5), mask)
    # partial ties: of columns 1 and 3, column 1 is kept
    score = torch.tensor([[5.0, 2.0, 0.0, 2.0, 9.0]])
    assert row_mask(score, 0.4).tolist() == [[False, False, True, True, False]]


# ----------------------------------------------------------------------------
# 3. tensor_mask
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_tensor_mask_global_lowest(sparsity):
    score = torch.rand(6, 13, generator=gen(5)) * torch.linspace(0.1, 5, 6).unsqueeze(1)
    mask = tensor_mask(score, sparsity)
    k = math.floor(score.numel() * sparsity)
    assert mask.shape == score.shape
    assert int(mask.sum()) == k
    flat = score.flatten().tolist()
    low = brute_lowest(flat, k)
    assert mask.flatten().tolist() == [i in low for i in range(len(flat))]
    # rows are not balanced: the low-scale rows lose more
    if k:
        per_row = mask.sum(dim=1).tolist()
        assert per_row[0] >= per_row[-1]


def test_tensor_mask_ties_and_range():
    mask = tensor_mask(torch.zeros(2, 3), 0.5)
    assert mask.tolist() == [[False, False, False], [True, True, True]]
    with pytest.raises(ValueError):
        tensor_mask(torch.zeros(2, 3), 1.0)


# ----------------------------------------------------------------------------
# 4. N:M masks
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
def test_nm_mask_groups(n, m):
    cols = m * 5
    score = torch.randn(7, cols, generator=gen(6))
    mask = nm_mask(score, n, m)
    assert mask.shape == score.shape
    ml = mask.tolist()
    for row in ml:
        for g in range(0, cols, m):
            assert sum(row[g:g + m]) == n
    assert ml == brute_nm_mask(score, n, m)


def test_nm_mask_hand_worked_and_ties():
    score = torch.tensor([[3.0, 1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, False, True, False, False, True, True]]


def test_nm_mask_invalid():
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 10), 2, 4)  # 10 not divisible by 4
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 8), 5, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 8), 0, 4)


@pytest.mark.parametrize("pattern", ["4:2", "2-4", "a:b", "2:2", "0:4", "2:4:8", "", "2:"])
def test_parse_pattern_rejects(pattern):
    with pytest.raises(ValueError):
        parse_pattern(pattern)


def test_parse_pattern_accepts():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern("1:3") == (1, 3)


# ----------------------------------------------------------------------------
# 5. cumulative alpha (Wanda variant)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_cumulative_alpha_mask(sparsity):
    score = torch.rand(32, 96, generator=gen(7)) ** 2 * torch.linspace(0.5, 2.0, 96)
    mask, alpha = cumulative_alpha_mask(score, sparsity)
    assert mask.shape == score.shape and mask.dtype == torch.bool
    assert 0.0 <= alpha <= 1.0
    achieved = mask.float().mean().item()
    assert abs(achieved - sparsity) <= 0.01
    sl, ml = score.tolist(), mask.tolist()
    for row, mrow in zip(sl, ml):
        pruned = [v for v, p in zip(row, mrow) if p]
        kept = [v for v, p in zip(row, mrow) if not p]
        # a prefix of the row sorted ascending
        if pruned and kept:
            assert max(pruned) <= min(kept)
        # running sum of the pruned within alpha of the row's total
        assert math.fsum(pruned) <= alpha * math.fsum(row) * (1 + 1e-5) + 1e-9
        # and maximal: adding the next-lowest kept score would exceed alpha * total
        if kept:
            assert math.fsum(pruned) + min(kept) > alpha * math.fsum(row) * (1 - 1e-5)


def test_cumulative_alpha_hand_example():
    # row sums 10; alpha such that overall half is pruned
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    mask, alpha = cumulative_alpha_mask(score, 0.5)
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert 0.3 <= alpha < 0.6


def test_cumulative_alpha_range():
    with pytest.raises(ValueError):
        cumulative_alpha_mask(torch.rand(2, 4), 1.0)


# ----------------------------------------------------------------------------
# 6. methods through the registry, PruneTarget
# ----------------------------------------------------------------------------

def test_registry_has_the_three_methods():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(PRUNE_METHODS)
    assert get_prune_method("wanda").needs == frozenset({"norms"})
    assert get_prune_method("sparsegpt").needs == frozenset({"gram"})
    assert get_prune_method("magnitude").needs == frozenset()
    assert get_prune_method("wanda").needs_for(PruneTarget(update=True)) == frozenset({"norms", "gram"})


def test_unknown_method_lists_available():
    with pytest.raises(ValueError) as info:
        get_prune_method("obs-magic")
    message = str(info.value)
    assert "obs-magic" in message
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert name in message


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("target", [
    PruneTarget(sparsity=0.5),
    PruneTarget(sparsity=0.3, group="tensor"),
    PruneTarget(pattern="2:4"),
    PruneTarget(sparsity=0.5, variant=True),
])
def test_methods_zero_only_keep_bits(method, target):
    g = gen(8)
    w = torch.randn(16, 32, generator=g, dtype=torch.float16)
    x = torch.randn(64, 32, generator=g) * torch.linspace(0.1, 4.0, 32)
    stats = input_stats(x, {"norms"})
    old = w.clone()
    new, keep = get_prune_method(method).fn(w, stats, target)
    mask = ~keep
    assert torch.equal(w, old)  # input untouched
    assert new.dtype == w.dtype and new.shape == w.shape
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(new[~mask].view(torch.int16), old[~mask].view(torch.int16))  # bit for bit
    assert (new[mask] == 0).all()
    # the mask is the one the score defines (independent reference)
    score = w.float().abs()
    if method == "wanda":
        score = score * x.pow(2).sum(0).sqrt()
    if target.pattern:
        assert mask.tolist() == brute_nm_mask(score, 2, 4)
    elif target.variant:
        assert abs(mask.float().mean().item() - 0.5) <= 0.01
        for row, mrow in zip(score.tolist(), mask.tolist()):
            pruned = [v for v, p in zip(row, mrow) if p]
            kept = [v for v, p in zip(row, mrow) if not p]
            assert not pruned or not kept or max(pruned) <= min(kept) * (1 + 1e-5)
    elif target.group == "tensor":
        k = math.floor(w.numel() * 0.3)
        assert int(mask.sum()) == k
        pruned = score[mask]
        kept = score[~mask]
        assert pruned.max().item() <= kept.min().item() * (1 + 1e-5)
    else:
        assert mask.sum(1).tolist() == [16] * 16
        for row, mrow in zip(score.tolist(), mask.tolist()):
            pruned = [v for v, p in zip(row, mrow) if p]
            kept = [v for v, p in zip(row, mrow) if not p]
            assert max(pruned) <= min(kept) * (1 + 1e-5)


def test_wanda_differs_from_magnitude_when_inputs_are_uneven():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    stats = InputStats(tokens=1, sq_norms=torch.tensor([100.0, 100.0, 0.01, 0.01]))
    _, mag = get_prune_method("magnitude").fn(w, None, PruneTarget(sparsity=0.5))
    _, wan = get_prune_method("wanda").fn(w, stats, PruneTarget(sparsity=0.5))
    assert mag.tolist() == [[False, False, True, True]]  # keep-masks: magnitude keeps 3 and 4
    assert wan.tolist() == [[True, True, False, False]]  # scores 10, 20, 0.3, 0.4


@pytest.mark.parametrize("kwargs", [
    dict(group="column"),
    dict(group="tensor", variant=True),
    dict(sparsity=1.0),
    dict(sparsity=-0.1),
    dict(pattern="2:4", variant=True),
    dict(pattern="4:2"),
    dict(pattern="2/4"),
    dict(blocksize=0),
    dict(percdamp=-0.01),
])
def test_prune_target_validation(kwargs):
    with pytest.raises(ValueError):
        PruneTarget(**kwargs)


def test_prune_target_properties():
    t = PruneTarget(pattern="2:4")
    assert t.nm == (2, 4) and t.expected_sparsity == 0.5
    t = PruneTarget(sparsity=0.7)
    assert t.nm is None and t.expected_sparsity == 0.7


# ----------------------------------------------------------------------------
# 7. SparseGPT
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer():
    """Correlated inputs (512 tokens x 64 features) and a 32x64 weight."""
    x = correlated_inputs(9)
    w = torch.randn(32, 64, generator=gen(10))
    return w, x, input_stats(x, {"norms", "gram"})


def test_sparsegpt_beats_zeroing_masks_unstructured(layer):
    w, x, stats = layer
    new, _ = sparsegpt_prune(w, stats.gram, sparsity=0.5)
    assert int((new == 0).sum()) >= 32 * 64 // 2
    sgpt = recon_error(w, new, x)
    mag = recon_error(w, w.masked_fill(row_mask(w.abs(), 0.5), 0), x)
    score = w.abs() * x.pow(2).sum(0).sqrt()
    wan = recon_error(w, w.masked_fill(row_mask(score, 0.5), 0), x)
    assert sgpt < wan and sgpt < mag, (sgpt, wan, mag)


def test_sparsegpt_beats_zeroing_masks_2_4(layer):
    w, x, stats = layer
    new, _ = sparsegpt_prune(w, stats.gram, n=2, m=4)
    sgpt = recon_error(w, new, x)
    mag = recon_error(w, w.masked_fill(nm_mask(w.abs(), 2, 4), 0), x)
    score = w.abs() * x.pow(2).sum(0).sqrt()
    wan = recon_error(w, w.masked_fill(nm_mask(score, 2, 4), 0), x)
    assert sgpt < wan and sgpt < mag, (sgpt, wan, mag)


@pytest.mark.parametrize("blocksize,sparsity", [(128, 0.5), (16, 0.5), (16, 0.3), (24, 0.6)])
def test_sparsegpt_exact_unstructured_sparsity(layer, blocksize, sparsity):
    w, x, stats = layer
    new, keep = sparsegpt_prune(w, stats.gram, sparsity=sparsity, blocksize=blocksize)
    mask = ~keep
    assert new.shape == w.shape and new.dtype == w.dtype and mask.shape == w.shape
    expected = sum(math.floor(32 * (min(s + blocksize, 64) - s) * sparsity) for s in range(0, 64, blocksize))
    assert int(mask.sum()) == expected
    for s in range(0, 64, blocksize):
        e = min(s + blocksize, 64)
        assert int(mask[:, s:e].sum()) == math.floor(32 * (e - s) * sparsity)
    # pruned weights are exactly zero, kept ones (generically) are not
    assert torch.equal(new == 0, mask)


def test_sparsegpt_2_4_structure(layer):
    w, x, stats = layer
    new, keep = sparsegpt_prune(w, stats.gram, n=2, m=4)
    mask = ~keep
    zeros = (new == 0).tolist()
    ml = mask.tolist()
    for zrow, mrow in zip(zeros, ml):
        for g in range(0, 64, 4):
            assert sum(zrow[g:g + 4]) >= 2
            assert sum(mrow[g:g + 4]) == 2
    assert torch.equal(new == 0, mask)


def test_sparsegpt_2_4_blocksize_not_multiple_of_m(layer):
    """A block size that does not split the columns into whole groups of M
    must either be refused or still give an exact 2:4 mask (the groups are
    groups of consecutive *global* input columns)."""
    w, x, stats = layer
    try:
        new, keep = sparsegpt_prune(w, stats.gram, n=2, m=4, blocksize=6)
        mask = ~keep
    except ValueError:
        return
    per_group = mask.view(32, 16, 4).sum(-1)
    assert (per_group == 2).all(), f"pruned per 4-group: {sorted(set(per_group.flatten().tolist()))}, " \
                                   f"sparsity {mask.float().mean().item():.3f}"


def test_sparsegpt_2_4_blocksize_not_multiple_of_m_via_registry(layer):
    """Same through the method registry: PruneTarget accepts pattern 2:4 with blocksize 2."""
    w, x, stats = layer
    try:
        target = PruneTarget(pattern="2:4", blocksize=2)
        new, _ = get_prune_method("sparsegpt").fn(w, stats, target)
    except ValueError:
        return
    sparsity = (new == 0).float().mean().item()
    assert sparsity == pytest.approx(0.5), f"2:4 with blocksize 2 gave sparsity {sparsity}"


def test_sparsegpt_fixed_mask_is_least_squares_update(layer):
    w, x, stats = layer
    score = w.abs() * x.pow(2).sum(0).sqrt()
    fixed = row_mask(score, 0.5)
    new, keep = sparsegpt_prune(w, stats.gram, keep=~fixed)
    mask = ~keep
    assert torch.equal(mask, fixed)
    assert torch.equal(new == 0, fixed)
    zeroed = w.masked_fill(fixed, 0)
    assert recon_error(w, new, x) <= recon_error(w, zeroed, x)
    # it cannot beat the exact per-row least-squares optimum over the kept columns
    optimum = lstsq_error(w, x, fixed)
    assert optimum <= recon_error(w, new, x) * (1 + 1e-6)


def lstsq_error(w: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Per row: min over the kept columns K of ||X_K v - X w_row||; combined Frobenius norm."""
    xd, wd = x.double(), w.double()
    total = 0.0
    for i in range(w.shape[0]):
        kept = (~mask[i]).nonzero().flatten()
        target = xd @ wd[i]
        sol = torch.linalg.lstsq(xd[:, kept], target.unsqueeze(1)).solution.squeeze(1)
        total += torch.sum((xd[:, kept] @ sol - target) ** 2).item()
    return math.sqrt(total)


@pytest.mark.parametrize("blocksize", [128, 8])
def test_sparsegpt_prefix_mask_is_exact_least_squares(layer, blocksize):
    """When the pruned columns are the first ones, every later column is still
    free when each is removed, so the sequential OBS update is the exact
    least-squares refit of the kept columns (up to the damping)."""
    w, x, stats = layer
    fixed = torch.zeros_like(w, dtype=torch.bool)
    fixed[:, :20] = True
    new, _ = sparsegpt_prune(w, stats.gram, keep=~fixed, percdamp=1e-7, blocksize=blocksize)
    assert torch.equal(new == 0, fixed)
    got = recon_error(w, new, x)
    optimum = lstsq_error(w, x, fixed)
    assert got == pytest.approx(optimum, rel=1e-3), (got, optimum)
    assert got < 0.9 * recon_error(w, w.masked_fill(fixed, 0), x)


def test_sparsegpt_sparsity_zero_is_identity(layer):
    w, x, stats = layer
    new, keep = sparsegpt_prune(w, stats.gram, sparsity=0.0, percdamp=1e-8, blocksize=16)
    mask = ~keep
    assert not mask.any()
    assert torch.allclose(new, w, atol=1e-5, rtol=0)


def test_sparsegpt_dtype_and_input_untouched(layer):
    w, x, stats = layer
    w16 = w.to(torch.bfloat16)
    old = w16.clone()
    new, keep = sparsegpt_prune(w16, stats.gram, sparsity=0.5)
    mask = ~keep
    assert torch.equal(w16, old)
    assert new.dtype == torch.bfloat16
    assert (new[mask] == 0).all()


def test_sparsegpt_dead_input_columns():
    g = gen(11)
    x = correlated_inputs(12, tokens=256, width=32)
    x[:, 3] = 0
    x[:, 17] = 0
    w = torch.randn(8, 32, generator=g)
    stats = input_stats(x, {"norms", "gram"})
    for kwargs in (dict(sparsity=0.5), dict(n=2, m=4), dict(keep=~row_mask(w.abs(), 0.5))):
        new, keep = sparsegpt_prune(w, stats.gram, **kwargs)
        mask = ~keep
        assert torch.isfinite(new).all()
        assert (new[:, 3] == 0).all() and (new[:, 17] == 0).all()
        assert (new[mask] == 0).all()
        # zeroing a dead column changes nothing on these inputs
        zeroed = w.clone()
        zeroed[mask] = 0
        assert recon_error(w, new, x) <= recon_error(w, zeroed, x) + 1e-6
    # Wanda scores dead inputs at zero, so they are pruned first
    _, wkeep = get_prune_method("wanda").fn(w, stats, PruneTarget(sparsity=0.25))
    wmask = ~wkeep
    assert wmask[:, 3].all() and wmask[:, 17].all()


def test_sparsegpt_wrong_hessian_shape(layer):
    w, x, stats = layer
    with pytest.raises(ValueError):
        sparsegpt_prune(w, stats.gram[:-1, :-1], sparsity=0.5)
    with pytest.raises(ValueError):
        sparsegpt_prune(w[:, :62], stats.gram[:62, :62], n=2, m=4)


@pytest.mark.parametrize("target", [PruneTarget(sparsity=0.5), PruneTarget(pattern="2:4"),
                                    PruneTarget(sparsity=0.5, group="tensor")])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_update_true_lowers_error_with_same_mask(layer, method, target):
    w, x, stats = layer
    fn = get_prune_method(method).fn
    zeroed, keep0 = fn(w, stats, target)
    updated, keep1 = fn(w, stats, PruneTarget(**{**target.__dict__, "update": True}))
    mask1 = ~keep1
    assert torch.equal(keep0, keep1)
    assert torch.equal(updated == 0, mask1)
    assert recon_error(w, updated, x) < recon_error(w, zeroed, x)
    assert not torch.equal(updated[~mask1], w[~mask1])  # kept weights were refit


def test_sparsegpt_through_registry(layer):
    w, x, stats = layer
    new, keep = get_prune_method("sparsegpt").fn(w, stats, PruneTarget(sparsity=0.5, blocksize=32))
    mask = ~keep
    assert int(mask.sum()) == 2 * math.floor(32 * 32 * 0.5)
    assert torch.equal(new == 0, mask)
    new, keep = get_prune_method("sparsegpt").fn(w, stats, PruneTarget(pattern="4:8"))
    mask = ~keep
    assert (mask.view(32, 8, 8).sum(-1) == 4).all()


# ----------------------------------------------------------------------------
# 8. property-style checks over seeds
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_property_row_and_nm_masks(seed):
    g = gen(100 + seed)
    rows = int(torch.randint(1, 9, (1,), generator=g))
    n, m = [(1, 2), (2, 4), (1, 3), (3, 8), (4, 8), (2, 5)][seed % 6]
    cols = m * int(torch.randint(1, 6, (1,), generator=g))
    # few distinct values so that ties are frequent
    score = torch.randint(0, 4, (rows, cols), generator=g).float()
    if seed % 2:
        score = score + torch.rand(rows, cols, generator=g)
    sparsity = float(torch.rand(1, generator=g)) * 0.95

    k = math.floor(cols * sparsity)
    mask = row_mask(score, sparsity)
    assert mask.sum(1).tolist() == [k] * rows
    assert mask.tolist() == brute_row_mask(score, k)

    nmm = nm_mask(score, n, m)
    assert nmm.tolist() == brute_nm_mask(score, n, m)
    assert nmm.view(rows, cols // m, m).sum(-1).eq(n).all()

    tm = tensor_mask(score, sparsity)
    kt = math.floor(score.numel() * sparsity)
    flat = score.flatten().tolist()
    low = brute_lowest(flat, kt)
    assert tm.flatten().tolist() == [i in low for i in range(len(flat))]
