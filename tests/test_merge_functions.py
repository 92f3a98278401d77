"""Tests for the pure merging functions: sparsifiers, merge methods, the registries.

References are independent of the implementation: hand-worked examples (the
arithmetic is in the comments), python loops over ``tolist()`` values, the
expectation of a random drop, and mergekit 0.1.5 itself (in the test extra; run
in a subprocess so its imports stay out of this process). Tensors are tiny; the file runs
in seconds on a CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from wandamerge.merging import (MERGE_METHODS, SPARSIFIERS, breadcrumbs_trim, dare_drop, della_magprune, elect_sign,
                                magnitude_trim,
                                merge_tensor, merge_tensor_detailed, register_sparsifier, score_trim, sparsify,
                                wanda_delta_score)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(t: torch.Tensor) -> set[int]:
    """Flat indices of the nonzero entries."""
    return {i for i, v in enumerate(t.flatten().tolist()) if v != 0}


# ----------------------------------------------------------------------------
# hand-computed examples
# ----------------------------------------------------------------------------

def test_ties_hand_computed():
    base = torch.ones(2, 3)
    d1 = torch.tensor([[3.0, -1.0, 2.0], [-4.0, 0.5, 1.5]])
    d2 = torch.tensor([[-2.0, 1.25, 1.0], [-0.75, 3.0, -0.5]])
    # Trim at density 0.5: keep int(0.5 * 6) = 3 largest |delta| of each tensor.
    #   d1: |4| (flat 3), |3| (0), |2| (2)       -> t1 = [3, 0, 2, -4, 0, 0]
    #   d2: |3| (4), |2| (0), |1.25| (1)        -> t2 = [-2, 1.25, 0, 0, 3, 0]
    # Weights 1 and 2:   w1 t1 = [3, 0, 2, -4, 0, 0],  w2 t2 = [-4, 2.5, 0, 0, 6, 0]
    # Elect sign of the summed mass [-1, 2.5, 2, -4, 6, 0] -> [-, +, +, -, +, + (0 elects +)]
    # Disjoint mean, divided by the weights of the agreeing models:
    #   0: only w2 t2 = -4 agrees -> -4 / 2 = -2      1: 2.5 / 2 = 1.25
    #   2: only w1 t1 = 2 -> 2 / 1 = 2                3: -4 / 1 = -4
    #   4: 6 / 2 = 3                                  5: nobody agrees -> 0 / (0 -> 1) = 0
    merged_delta = torch.tensor([[-2.0, 1.25, 2.0], [-4.0, 3.0, 0.0]])
    out = merge_tensor("ties", base, [base + d1, base + d2], [1.0, 2.0], [0.5, 0.5])
    assert torch.equal(out, base + merged_delta)
    # the trim alone
    assert torch.equal(magnitude_trim(d1, 0.5), torch.tensor([[3.0, 0, 2], [-4, 0, 0]]))
    # the sign election alone
    weighted = torch.stack([torch.tensor([3.0, 0, 2, -4, 0, 0]), torch.tensor([-4.0, 2.5, 0, 0, 6, 0])])
    assert elect_sign(weighted).tolist() == [-1, 1, 1, -1, 1, 1]
    # lambda scales the merged delta; normalize=False keeps the plain sum of the agreeing entries
    assert torch.equal(merge_tensor("ties", base, [base + d1, base + d2], [1.0, 2.0], [0.5, 0.5], lambda_=0.5),
                       base + 0.5 * merged_delta)
    summed = torch.tensor([[-4.0, 2.5, 2.0], [-4.0, 6.0, 0.0]])
    assert torch.equal(merge_tensor("ties", base, [base + d1, base + d2], [1.0, 2.0], [0.5, 0.5], normalize=False),
                       base + summed)


def test_task_arithmetic_hand_computed():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d1 = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    d2 = torch.tensor([[0.5, 0.5], [-1.0, 1.0]])
    # 0.5 d1 + 2 d2 = [[0.5 + 1, 0 + 1], [0 - 2, -1 + 2]] = [[1.5, 1], [-2, 1]]
    out = merge_tensor("task_arithmetic", base, [base + d1, base + d2], [0.5, 2.0])
    assert torch.equal(out, torch.tensor([[2.5, 3.0], [1.0, 5.0]]))
    # lambda 2: base + [[3, 2], [-4, 2]]
    out = merge_tensor("task_arithmetic", base, [base + d1, base + d2], [0.5, 2.0], lambda_=2.0)
    assert torch.equal(out, torch.tensor([[4.0, 4.0], [-1.0, 6.0]]))
    # normalize: divided by 0.5 + 2 = 2.5 -> [[0.6, 0.4], [-0.8, 0.4]]
    out = merge_tensor("task_arithmetic", base, [base + d1, base + d2], [0.5, 2.0], normalize=True)
    assert torch.allclose(out, base + torch.tensor([[0.6, 0.4], [-0.8, 0.4]]), atol=1e-6)


def test_linear_hand_computed():
    a = torch.tensor([1.0, 2.0, -4.0])
    b = torch.tensor([3.0, 0.0, 4.0])
    # (1 a + 3 b) / 4 = [10, 2, 8] / 4
    assert torch.equal(merge_tensor("linear", torch.zeros(3), [a, b], [1.0, 3.0]), torch.tensor([2.5, 0.5, 2.0]))
    # normalize=False: the plain weighted sum; the base is not an input of linear
    assert torch.equal(merge_tensor("linear", torch.full((3,), 9.0), [a, b], [1.0, 3.0], normalize=False),
                       torch.tensor([10.0, 2.0, 8.0]))


# ----------------------------------------------------------------------------
# random drops
# ----------------------------------------------------------------------------

def test_dare_expectation_is_the_delta():
    delta = torch.randn(4, 5, generator=gen(0))
    draws, density = 4000, 0.3
    # one call over a stack of copies: every entry is an independent draw
    dropped = dare_drop(delta.expand(draws, 4, 5).contiguous(), density, generator=gen(1), rescale="density")
    mean = dropped.mean(dim=0)
    sigma = delta.abs() * math.sqrt((1 - density) / density / draws)
    assert ((mean - delta).abs() <= 5 * sigma + 1e-7).all()
    # every entry is either dropped or scaled by exactly 1 / density
    ratio = dropped[0][dropped[0] != 0] / delta[dropped[0] != 0]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / density))


def test_dare_through_merge_expectation():
    base = torch.randn(3, 4, generator=gen(2))
    ft = base + torch.randn(3, 4, generator=gen(3))
    g = gen(4)
    runs = [merge_tensor("dare_linear", base, [ft], [1.0], [0.5], rescale="density", generator=g)
            for _ in range(600)]
    mean = torch.stack(runs).mean(dim=0)
    sigma = (ft - base).abs() * math.sqrt(1.0 / 600)
    assert ((mean - ft).abs() <= 5 * sigma + 1e-6).all()


def test_default_rescale_keeps_the_l1_norm():
    # mergekit 0.1.5: rescale=True matches the L1 norm of the delta, not 1 / density
    delta = torch.randn(6, 7, generator=gen(5))
    for out in (dare_drop(delta, 0.4, generator=gen(6)), della_magprune(delta, 0.4, 0.1, generator=gen(7)),
                magnitude_trim(delta, 0.4, rescale=True)):
        assert (out == 0).any()
        assert math.isclose(out.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)


def test_random_sparsifiers_are_reproducible_with_a_generator():
    delta = torch.randn(5, 6, generator=gen(8))
    assert torch.equal(dare_drop(delta, 0.5, generator=gen(9)), dare_drop(delta, 0.5, generator=gen(9)))
    assert torch.equal(della_magprune(delta, 0.5, 0.2, generator=gen(9)), della_magprune(delta, 0.5, 0.2, generator=gen(9)))


def test_della_keep_probability_follows_the_rank():
    # one row 0, 1, ..., 9: rank r keeps with probability 0.5 - 0.4 + 0.8 r / 9
    row = torch.arange(10.0).expand(20000, 10).contiguous()
    keep_rate = (della_magprune(row, 0.5, 0.4, generator=gen(10), rescale=False) != 0).float().mean(dim=0)
    expected = torch.tensor([0.1 + 0.8 * r / 9 for r in range(10)])
    expected[0] = 0.0  # the entry 0 stays 0 whatever is drawn
    assert torch.allclose(keep_rate[1:], expected[1:], atol=0.015)


# ----------------------------------------------------------------------------
# Wanda-scored deltas against brute force
# ----------------------------------------------------------------------------

def brute_wanda_keep(delta: torch.Tensor, norms: torch.Tensor, density: float, group: str | None,
                     pattern: tuple[int, int] | None) -> set[int]:
    rows, cols = delta.shape
    d, x = delta.tolist(), norms.tolist()
    score = [[abs(d[i][j]) * math.sqrt(x[j]) for j in range(cols)] for i in range(rows)]
    keep = set()
    if pattern:
        n, m = pattern
        for i in range(rows):
            for start in range(0, cols, m):
                cells = sorted(range(start, start + m), key=lambda j: (-score[i][j], j))
                keep |= {i * cols + j for j in cells[:m - n]}
    elif group == "row":
        k = max(1, int(density * cols))
        for i in range(rows):
            cells = sorted(range(cols), key=lambda j: (-score[i][j], j))
            keep |= {i * cols + j for j in cells[:k]}
    else:
        k = max(1, int(density * rows * cols))
        flat = sorted(((i, j) for i in range(rows) for j in range(cols)), key=lambda c: (-score[c[0]][c[1]], c))
        keep = {i * cols + j for i, j in flat[:k]}
    return keep


@pytest.mark.parametrize("density,group,pattern", [(0.5, "row", None), (0.3, "row", None), (0.5, "tensor", None),
                                                   (0.3, "tensor", None), (0.5, "row", (2, 4)),
                                                   (0.5, "row", (1, 4))])
def test_wanda_delta_masks_match_brute_force(density, group, pattern):
    delta = torch.randn(5, 8, generator=gen(11))
    norms = torch.rand(8, generator=gen(12)) * 10 + 0.1
    pattern_str = f"{pattern[0]}:{pattern[1]}" if pattern else None
    score = wanda_delta_score(delta, norms)
    out = score_trim(delta, score, density, group=group, pattern=pattern_str)
    assert kept(out) == brute_wanda_keep(delta, norms, density, group, pattern)
    # kept entries are untouched
    assert torch.equal(out[out != 0], delta[out != 0])
    # the registry entry computes the same, and merging with score="wanda" uses it
    via_registry = sparsify("wanda", delta, density=density, input_sq_norms=norms, group=group, pattern=pattern_str)
    assert via_registry.sparsifier == "wanda" and torch.equal(via_registry.delta, out)


def test_wanda_score_is_delta_times_input_norm():
    delta = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    norms = torch.tensor([4.0, 9.0])
    assert torch.equal(wanda_delta_score(delta, norms), torch.tensor([[2.0, 6.0], [1.0, 0.0]]))


def test_wanda_falls_back_to_magnitude_where_it_cannot_apply():
    base = torch.zeros(8)
    fts = [torch.randn(8, generator=gen(13)), torch.randn(8, generator=gen(14))]
    res = merge_tensor_detailed("ties", base, fts, [1.0, 1.0], [0.5, 0.5], score="wanda", group="row",
                                input_sq_norms=None)
    assert res.requested_sparsifier == "wanda" and res.sparsifier == "magnitude"
    assert "matrix" in res.fallback_reason
    assert torch.equal(res.tensor, merge_tensor("ties", base, fts, [1.0, 1.0], [0.5, 0.5]))
    # a matrix without input norms
    mat = merge_tensor_detailed("ties", torch.zeros(2, 4), [f.view(2, 4) for f in fts], [1.0, 1.0], [0.5, 0.5],
                                score="wanda")
    assert mat.sparsifier == "magnitude" and "input norms" in mat.fallback_reason
    # with norms it is Wanda, row-wise by default
    norms = torch.tensor([1.0, 100.0, 1.0, 100.0])
    ok = merge_tensor_detailed("ties", torch.zeros(2, 4), [f.view(2, 4) for f in fts], [1.0, 1.0], [0.5, 0.5],
                               score="wanda", input_sq_norms=norms)
    assert ok.sparsifier == "wanda" and ok.fallback_reason is None
    # an N:M pattern cannot apply to a vector: its trim is tensor-wise, and the result says so
    vec = merge_tensor_detailed("ties", base, fts, [1.0, 1.0], [0.5, 0.5], pattern="2:4")
    assert vec.sparsifier == "magnitude" and "pattern 2:4" in vec.fallback_reason
    assert torch.equal(vec.tensor, merge_tensor("ties", base, fts, [1.0, 1.0], [0.5, 0.5]))


# ----------------------------------------------------------------------------
# identities
# ----------------------------------------------------------------------------

# the weighted methods (mergekit's on whole tensors take their own parameters: tests/test_mergekit_parity_recipes.py)
@pytest.mark.parametrize("method", sorted(name for name, row in MERGE_METHODS.items() if row.on != "tensors"))
def test_one_finetune_at_density_one_comes_back(method):
    base = torch.randn(4, 6, generator=gen(15))
    ft = base + torch.randn(4, 6, generator=gen(16))
    out = merge_tensor(method, base, [ft], [1.0], generator=gen(17))
    assert out.dtype == base.dtype
    assert torch.allclose(out, ft, atol=1e-6, rtol=0)


def test_result_has_the_base_dtype():
    base = torch.randn(4, 8, generator=gen(18)).to(torch.bfloat16)
    fts = [(base.float() + 0.1 * torch.randn(4, 8, generator=gen(s))).to(torch.bfloat16) for s in (19, 20)]
    for method in ("linear", "ties", "dare_ties"):
        assert merge_tensor(method, base, fts, [0.5, 0.5], generator=gen(21)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------
# deterministic ties at the cut-off, exact counts
# ----------------------------------------------------------------------------

def test_ties_at_the_magnitude_cut_off_keep_the_lower_index():
    # |delta| = 2 1 1 1 1 3 1 0; keep int(0.5 * 8) = 4: 3 (index 5), 2 (index 0), then two of the five 1s,
    # the lowest indices 1 and 2
    delta = torch.tensor([2.0, 1.0, -1.0, 1.0, -1.0, 3.0, 1.0, 0.0])
    for _ in range(3):
        assert kept(magnitude_trim(delta, 0.5)) == {0, 1, 2, 5}
    # all equal: the first k by flat index, row-wise the first k of every row
    flat = torch.ones(4, 5)
    assert kept(magnitude_trim(flat, 0.5)) == set(range(10))
    assert kept(magnitude_trim(flat, 0.4, group="row")) == {0, 1, 5, 6, 10, 11, 15, 16}
    # breadcrumbs ranks ties the same way: the lower index counts as larger, so it is the outlier removed
    # 10 equal values, density 0.5 -> keep 5; gamma 0.2 -> remove 2 outliers (0, 1) and 3 smallest (7, 8, 9)
    assert kept(breadcrumbs_trim(torch.ones(10), 0.5, gamma=0.2)) == {2, 3, 4, 5, 6}


def test_magnitude_trim_matches_a_full_sort_without_ties():
    delta = torch.randn(7, 9, generator=gen(22))
    values = delta.abs().flatten().tolist()
    assert len(set(values)) == len(values)
    for density in (0.1, 0.29, 0.5, 0.77):
        k = max(1, int(density * 63))
        expected = set(sorted(range(63), key=lambda i: -values[i])[:k])
        out = magnitude_trim(delta, density)
        assert kept(out) == expected and len(kept(out)) == k


def test_kept_counts_follow_mergekit():
    delta = torch.randn(100, generator=gen(23))
    assert len(kept(magnitude_trim(delta, 0.29))) == int(0.29 * 100) == 28  # the float product, floored
    assert len(kept(magnitude_trim(torch.randn(10, generator=gen(24)), 0.01))) == 1  # never fewer than one
    assert len(kept(breadcrumbs_trim(delta, 0.3, gamma=0.05))) == 30
    # breadcrumbs removes the gamma largest, then the smallest
    order = sorted(range(100), key=lambda i: -abs(delta[i].item()))
    assert kept(breadcrumbs_trim(delta, 0.3, gamma=0.05)) == set(order[5:35])


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------

def test_errors_name_the_closest_choice():
    base, fts = torch.zeros(2, 2), [torch.ones(2, 2)]
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        merge_tensor("tie", base, fts, [1.0])
    with pytest.raises(ValueError, match="did you mean 'dare_linear'"):
        merge_tensor("dare-linear", base, fts, [1.0])
    with pytest.raises(ValueError, match="did you mean 'wanda'"):
        merge_tensor("ties", base, fts, [1.0], score="wandda")
    with pytest.raises(ValueError, match="unknown sparsifier 'zzz'"):
        sparsify("zzz", base, density=0.5)


def test_errors_on_bad_arguments():
    base, fts = torch.zeros(2, 2), [torch.ones(2, 2), torch.ones(2, 2)]
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            merge_tensor("ties", base, fts, [1.0, 1.0], [density, 0.5])
    with pytest.raises(ValueError, match="1 weights for 2"):
        merge_tensor("ties", base, fts, [1.0])
    with pytest.raises(ValueError, match="3 densities for 2"):
        merge_tensor("ties", base, fts, [1.0, 1.0], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="shape mismatch"):
        merge_tensor("ties", base, [torch.ones(2, 2), torch.ones(2, 3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        merge_tensor("ties", base, [], [])
    # options that would be ignored are refused
    with pytest.raises(ValueError, match="takes no score"):
        merge_tensor("linear", base, fts, [1.0, 1.0], score="magnitude")
    with pytest.raises(ValueError, match="sparsifies nothing"):
        merge_tensor("task_arithmetic", base, fts, [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="takes no gamma"):
        merge_tensor("ties", base, fts, [1.0, 1.0], gamma=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        merge_tensor("della", base, fts, [1.0, 1.0], [0.9, 0.9])  # 0.9 + 0.15 >= 1
    with pytest.raises(ValueError, match="group"):
        merge_tensor("ties", base, fts, [1.0, 1.0], [0.5, 0.5], group="rows")
    with pytest.raises(ValueError, match="divisible"):
        magnitude_trim(torch.ones(2, 6), 0.5, pattern="2:4")


def test_registering_a_sparsifier_is_a_short_function():
    name = "test_keep_positive"

    @register_sparsifier(name)
    def _keep_positive(delta, **_):
        return delta.clamp_min(0)

    try:
        base = torch.zeros(3)
        out = merge_tensor("task_arithmetic", base, [torch.tensor([1.0, -1.0, 2.0])], [1.0], score=name)
        assert out.tolist() == [1.0, 0.0, 2.0]
        with pytest.raises(ValueError, match="already registered"):
            register_sparsifier(name)(_keep_positive)
    finally:
        SPARSIFIERS.pop(name)


def test_method_records_carry_mergekit_defaults():
    mergekit = {
        "linear": (None, True, False),
        "task_arithmetic": (None, False, False),
        "ties": ("magnitude", True, False),
        "dare_linear": ("random", False, True),
        "dare_ties": ("random", False, True),
        "breadcrumbs": ("breadcrumbs", False, False),
        "breadcrumbs_ties": ("breadcrumbs", False, False),
        "della": ("della", True, True),
        "della_linear": ("della", False, True),
    }
    assert {name: (MERGE_METHODS[name].score, MERGE_METHODS[name].normalize, MERGE_METHODS[name].rescale)
            for name in mergekit} == mergekit


# ----------------------------------------------------------------------------
# agreement with mergekit 0.1.5, run in its own venv
# ----------------------------------------------------------------------------

def _mergekit_python() -> Path:
    """mergekit 0.1.5 is in the test extra; a separate venv can be named instead."""
    if "WANDAMERGE_MERGEKIT_PYTHON" in os.environ:
        return Path(os.environ["WANDAMERGE_MERGEKIT_PYTHON"])
    import importlib.util
    import sys

    if importlib.util.find_spec("mergekit") is not None:
        return Path(sys.executable)
    return Path.home() / ".cache" / "wandamerge" / "bench" / "mergekit-venv" / "bin" / "python"


MERGEKIT_PYTHON = _mergekit_python()

MERGEKIT_PROGRAM = Path(__file__).parent / "programs" / "mergekit_merge_tensors.py"



def mergekit_cases() -> list[dict]:
    """(method, our kwargs, mergekit parameters) on random float32 tensors without ties."""
    cases = []

    def add(method, shape, weights, densities=None, seed=0, ours=None, theirs=None):
        g = gen(100 + len(cases))
        base = torch.randn(shape, generator=g)
        fts = [base + torch.randn(shape, generator=g) * s for s in (1.0, 0.5, 2.0)[:len(weights)]]
        params = {"weight": list(weights)}
        if densities is not None:
            params["density"] = list(densities)
        params.update(theirs or {})
        cases.append(dict(method=method, base=base, finetuned=fts, weights=list(weights), densities=densities,
                          ours=ours or {}, parameters=params, seed=seed))

    add("linear", (6, 8), [0.7, 0.5, 0.2])
    add("linear", (6, 8), [1.0, 3.0], ours={"normalize": False}, theirs={"normalize": False})
    add("linear", (16,), [0.3, 0.9])
    add("task_arithmetic", (6, 8), [0.7, 0.5, -0.3])
    add("task_arithmetic", (6, 8), [0.7, 0.5], ours={"lambda_": 0.8, "normalize": True},
        theirs={"lambda": 0.8, "normalize": True})
    add("ties", (6, 8), [0.7, 0.5, 0.3], [0.5, 0.3, 0.7])
    add("ties", (6, 8), [1.0, -0.5], [0.2, 0.9], ours={"normalize": False, "rescale": True, "lambda_": 1.3},
        theirs={"normalize": False, "rescale": True, "lambda": 1.3})
    add("ties", (24,), [0.6, 0.6, 0.6], [0.4, 0.4, 0.4])
    add("ties", (5, 7), [1.0, 1.0], None)  # density defaults to 1 in both
    add("breadcrumbs", (8, 8), [0.7, 0.5, 0.3], [0.5, 0.3, 0.8], ours={"gamma": [0.05, 0.1, 0.0]},
        theirs={"gamma": [0.05, 0.1, 0.0]})
    add("breadcrumbs", (8, 8), [0.7, 0.5], [0.9, 0.6], ours={"gamma": 0.2}, theirs={"gamma": 0.2})
    add("breadcrumbs", (40,), [1.0, 0.5], [0.5, 0.5])  # gamma defaults to 0.01 in both
    add("breadcrumbs_ties", (8, 8), [0.7, 0.5, 0.3], [0.5, 0.3, 0.8], ours={"gamma": 0.05},
        theirs={"gamma": 0.05})
    add("breadcrumbs_ties", (8, 8), [0.7, -0.5], [0.4, 0.6], ours={"normalize": True, "rescale": True},
        theirs={"normalize": True, "rescale": True})
    # the random ones: the same seed draws the same masks (one bernoulli call per fine-tune, in order)
    add("dare_linear", (6, 8), [0.7, 0.5, 0.3], [0.5, 0.3, 0.7], seed=7)
    add("dare_ties", (6, 8), [0.7, 0.5, 0.3], [0.5, 0.3, 0.7], seed=8)
    add("della", (6, 8), [0.7, 0.5, 0.3], [0.5, 0.3, 0.7], seed=9, ours={"epsilon": 0.1}, theirs={"epsilon": 0.1})
    add("della_linear", (6, 8), [0.7, 0.5], [0.5, 0.4], seed=10)
    return cases


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory):
    if not MERGEKIT_PYTHON.exists():
        pytest.skip(f"mergekit 0.1.5 reference venv not found at {MERGEKIT_PYTHON} (create it with: "
                    f"python3 -m venv DIR && DIR/bin/pip install torch==2.13.0 && DIR/bin/pip install "
                    f"mergekit==0.1.5; or set WANDAMERGE_MERGEKIT_PYTHON)")
    cases = mergekit_cases()
    folder = tmp_path_factory.mktemp("mergekit")
    torch.save(cases, folder / "cases.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(MERGEKIT_PYTHON), str(MERGEKIT_PROGRAM), str(folder / "cases.pt"),
                           str(folder / "out.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, torch.load(folder / "out.pt")


def test_cases_have_no_magnitude_ties():
    for case in mergekit_cases():
        for ft in case["finetuned"]:
            values = (ft - case["base"]).abs().flatten().tolist()
            assert len(set(values)) == len(values)


@pytest.mark.parametrize("index", range(len(mergekit_cases())))
def test_agrees_with_mergekit(mergekit_results, index):
    cases, results = mergekit_results
    case = cases[index]
    ours = merge_tensor(case["method"], case["base"], case["finetuned"], case["weights"], case["densities"],
                        generator=gen(case["seed"]), **case["ours"])
    assert ours.shape == results[index].shape and ours.dtype == results[index].dtype
    assert (ours - results[index]).abs().max().item() <= 1e-6, case["method"]
