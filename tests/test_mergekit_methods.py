"""The interpolating and selecting merges against mergekit 0.1.5's own code, on tiny random tensors.

Every reference is mergekit's: its per-tensor API ``mergekit.merge_methods.merge_tensors(tensors,
method, parameters=..., base_index=...)``, which binds and validates the parameters and runs the
method's own kernel as a mergekit merge does, and, for the helpers, the plain functions those kernels
call (``slerp.slerp``, ``nuslerp.nuslerp``, ``karcher.karcher_merge_tensors``, ``sce.sce_mask``,
``sce.sce_weight``, ``arcee_fusion._compute_importance`` and ``DynamicThresholdFusion``,
``ram._prepare_ram_vectors``). Our functions repeat mergekit's arithmetic in float32 (float64), so on
float32/float64 inputs the comparisons are exact (``rtol=atol=0``). The top-k of ``sce`` and the
quantile cut-off of ``arcee_fusion`` are computed from the same values in the same way on both sides,
so equal values at a cut-off would not break agreement either; the random tensors have no such ties
anyway (checked where it matters). mergekit is imported in this process: ``mergekit.merge_methods``
loads no model code (no transformers). Tensors are tiny; the file runs in about a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from wandamerge.errors import ConfigError
from wandamerge.merging.interpolation import (karcher_mean, multislerp, nearswap, nuslerp, nuslerp_interpolate,
                                              nuslerp_t, slerp)
from wandamerge.merging.selection_merges import (arcee_fusion, fusion_importance, fusion_threshold, model_stock,
                                                 passthrough, ram, ram_contributions, ramplus_tl, sce,
                                                 sce_model_weights, sce_select_mask)

mk = pytest.importorskip("mergekit.merge_methods")
from importlib.metadata import version  # noqa: E402

if version("mergekit") != "0.1.5":
    pytest.skip(f"these references are mergekit 0.1.5's, found {version('mergekit')}", allow_module_level=True)

from mergekit.merge_methods import arcee_fusion as mk_arcee  # noqa: E402
from mergekit.merge_methods import karcher as mk_karcher  # noqa: E402
from mergekit.merge_methods import nuslerp as mk_nuslerp  # noqa: E402
from mergekit.merge_methods import ram as mk_ram  # noqa: E402
from mergekit.merge_methods import sce as mk_sce  # noqa: E402
from mergekit.merge_methods import slerp as mk_slerp  # noqa: E402


def rand(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def family(shape, n: int, seed: int, spread: float = 0.5, dtype=torch.float32):
    """A base and ``n`` fine-tunes of it (base + a random change of each entry)."""
    base = rand(*shape, seed=seed, dtype=dtype)
    return base, [base + rand(*shape, seed=seed + 1 + i, scale=spread, dtype=dtype) for i in range(n)]


def sparse_family(shape, n: int, seed: int, keep: float = 0.5):
    """A base and ``n`` fine-tunes that each change about ``keep`` of the entries (the rest exactly the base)."""
    base = rand(*shape, seed=seed)
    fts = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + 10 + i)
        mask = torch.rand(shape, generator=g) < keep
        fts.append(torch.where(mask, base + rand(*shape, seed=seed + 1 + i, scale=0.5), base))
    return base, fts


def theirs(method: str, tensors, base_index: int | None = 0, **parameters) -> torch.Tensor:
    """mergekit 0.1.5's merge of one tensor, through its public per-tensor API."""
    return mk.merge_tensors(list(tensors), method, parameters=parameters, base_index=base_index)


def same(ours: torch.Tensor, reference: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Same dtype and shape, and the same values (exactly unless a tolerance is given)."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=atol, equal_nan=False)


MATRIX, VECTOR = (4, 6), (10,)


# ----------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR, (2, 3, 4)])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0, -0.25, 1.5])
def test_slerp(shape, t):
    base, (other,) = family(shape, 1, seed=1, spread=1.0)
    same(slerp(base, other, t), theirs("slerp", [base, other], t=t))


def test_slerp_t_as_a_list_of_one_group():
    """mergekit's plain function takes a batch (outputs, *shape) and one t per output."""
    base, (other,) = family(MATRIX, 1, seed=2)
    reference = mk_slerp.slerp(torch.tensor([0.4]), base.unsqueeze(0), other.unsqueeze(0))[0]
    same(slerp(base, other, 0.4), reference)


@pytest.mark.parametrize("case", ["identical", "colinear", "antiparallel", "nearly_colinear", "zero_base",
                                  "both_zero", "orthogonal"])
def test_slerp_edge_cases(case):
    base = rand(*MATRIX, seed=3)
    other = {
        "identical": base.clone(),
        "colinear": 2.5 * base,
        "antiparallel": -0.5 * base,
        "nearly_colinear": base + 1e-3 * rand(*MATRIX, seed=4),  # cos > 0.9995: the line
        "zero_base": rand(*MATRIX, seed=5),
        "both_zero": torch.zeros(MATRIX),
        "orthogonal": None,
    }[case]
    if case == "orthogonal":
        base, other = torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([0.0, 3.0, 0.0, 0.0])
    if case in ("zero_base", "both_zero"):
        base = torch.zeros(MATRIX)
    for t in (0.0, 0.25, 0.7, 1.0):
        ours = slerp(base, other, t)
        same(ours, theirs("slerp", [base, other], t=t))
        assert torch.isfinite(ours).all()


def test_slerp_float64_and_bfloat16():
    base, (other,) = family(MATRIX, 1, seed=6, dtype=torch.float64)
    same(slerp(base, other, 0.35), theirs("slerp", [base, other], t=0.35))
    # bfloat16: both compute in float32 and round once, so they agree exactly here too
    base, other = base.to(torch.bfloat16), other.to(torch.bfloat16)
    same(slerp(base, other, 0.35), theirs("slerp", [base, other], t=0.35))


def test_slerp_base_second_in_the_input_order():
    base, (other,) = family(MATRIX, 1, seed=7)
    same(slerp(base, other, 0.2), theirs("slerp", [other, base], base_index=1, t=0.2))


# ----------------------------------------------------------------------------
# nuslerp
# ----------------------------------------------------------------------------

NUSLERP_OPTIONS = [dict(row_wise=False, flatten=True), dict(row_wise=False, flatten=False),
                   dict(row_wise=True, flatten=False), dict(row_wise=True, flatten=True)]


@pytest.mark.parametrize("shape", [MATRIX, VECTOR, (2, 3, 4)])
@pytest.mark.parametrize("options", NUSLERP_OPTIONS)
@pytest.mark.parametrize("weights", [[0.7, 0.3], [1.0, 2.0], [0.5, -0.5], [2.0, 0.0]])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(shape, options, weights, with_base):
    base, fts = family(shape, 2, seed=11, spread=1.0)
    params = dict(weight=weights, nuslerp_row_wise=options["row_wise"], nuslerp_flatten=options["flatten"])
    if with_base:
        reference = theirs("nuslerp", [base, *fts], **params)
        ours = nuslerp(fts, weights, base, **options)
    else:
        reference = theirs("nuslerp", fts, base_index=None, **params)
        ours = nuslerp(fts, weights, **options)
    same(ours, reference)


@pytest.mark.parametrize("dim, flatten", [(-1, False), (0, False), (-1, True), (1, False)])
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0, 1.4])
def test_nuslerp_interpolate_is_mergekits_function(dim, flatten, t):
    v0, v1 = rand(*MATRIX, seed=12), rand(*MATRIX, seed=13)
    # rows 1 and 2 colinear and antiparallel, row 3 of v0 zero: the line, and the zero-norm clamp
    v1[1], v1[2], v0[3] = 3 * v0[1], -v0[2], 0.0
    same(nuslerp_interpolate(t, v0, v1, dim=dim, flatten=flatten),
         mk_nuslerp.nuslerp(t, v0, v1, dim=dim, flatten=flatten))


def test_nuslerp_t_matches_the_method():
    assert nuslerp_t([1.0, 3.0]) == 0.75 and nuslerp_t([0.5, -0.5]) == 0.5 and nuslerp_t([1e-7, 0.0]) == 0.5


@pytest.mark.parametrize("case", ["identical", "colinear_rows", "zeros"])
def test_nuslerp_edge_cases(case):
    base = rand(*MATRIX, seed=14)
    first = base + rand(*MATRIX, seed=15)
    second = {"identical": first.clone(), "colinear_rows": base + 2 * (first - base),
              "zeros": base.clone()}[case]
    for options in NUSLERP_OPTIONS:
        params = dict(weight=[0.4, 0.6], nuslerp_row_wise=options["row_wise"], nuslerp_flatten=options["flatten"])
        same(nuslerp([first, second], [0.4, 0.6], base, **options), theirs("nuslerp", [base, first, second], **params))


# ----------------------------------------------------------------------------
# multislerp
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 2.0, 0.5], [0.6, -0.2, 0.4]])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp(shape, weights, normalize_weights, with_base):
    base, fts = family(shape, 3, seed=21, spread=1.0)
    params = dict(weight=weights, normalize_weights=normalize_weights)
    if with_base:
        same(multislerp(fts, weights, base, normalize_weights=normalize_weights),
             theirs("multislerp", [base, *fts], **params))
    else:
        same(multislerp(fts, weights, normalize_weights=normalize_weights),
             theirs("multislerp", fts, base_index=None, **params))


def test_multislerp_eps_two_and_one_tensor_and_float64():
    base, fts = family(MATRIX, 2, seed=22, dtype=torch.float64)
    same(multislerp(fts, [0.3, 0.7], base, eps=1e-3), theirs("multislerp", [base, *fts], weight=[0.3, 0.7], eps=1e-3))
    same(multislerp(fts[:1], [2.0], base), theirs("multislerp", [base, fts[0]], weight=[2.0]))
    same(multislerp(fts[:1], [2.0]), theirs("multislerp", fts[:1], base_index=None, weight=[2.0]))


def test_multislerp_antipodal_pair_falls_back_to_the_line_and_more_raise():
    a = rand(*MATRIX, seed=23)
    same(multislerp([a, -a], [0.5, 0.5]), theirs("multislerp", [a, -a], base_index=None, weight=[0.5, 0.5]))
    base = rand(*MATRIX, seed=24)
    same(multislerp([base + a, base - a], [1.0, 1.0], base),
         theirs("multislerp", [base, base + a, base - a], weight=[1.0, 1.0]))
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        theirs("multislerp", [a, -a, a, -a], base_index=None, weight=[1.0] * 4)
    with pytest.raises(ConfigError, match="cancel out"):
        multislerp([a, -a, a, -a], [1.0] * 4)


def test_multislerp_identical_inputs():
    base, (ft,) = family(MATRIX, 1, seed=25)
    same(multislerp([ft, ft.clone(), ft.clone()], [0.2, 0.3, 0.5], base),
         theirs("multislerp", [base, ft, ft.clone(), ft.clone()], weight=[0.2, 0.3, 0.5]))


def test_multislerp_zero_weight_sum_is_an_error_where_mergekit_gives_nan():
    base, fts = family(MATRIX, 2, seed=26)
    assert not torch.isfinite(theirs("multislerp", [base, *fts], weight=[0.5, -0.5])).all()
    with pytest.raises(ConfigError, match="sum to zero"):
        multislerp(fts, [0.5, -0.5], base)


# ----------------------------------------------------------------------------
# karcher
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (1, 1e-5), (0, 1e-5), (50, 1e-7), (10, 1e-2)])
def test_karcher(shape, n, max_iter, tol):
    _, fts = family(shape, n, seed=31, spread=1.0)
    same(karcher_mean(fts, max_iter=max_iter, tol=tol),
         theirs("karcher", fts, base_index=None, max_iter=max_iter, tol=tol))


def test_karcher_a_base_is_one_more_input_to_mergekit():
    """karcher ignores the base role: a base given to mergekit is averaged like any input."""
    base, fts = family(MATRIX, 2, seed=32)
    same(karcher_mean([base, *fts]), theirs("karcher", [base, *fts], base_index=0))


@pytest.mark.parametrize("alphas", [[0.2, 0.5, 0.3], [1.0, 1.0, 2.0], [0.5, 0.0, 0.5]])
def test_karcher_weights_are_mergekits_helper_alphas(alphas):
    _, fts = family(MATRIX, 3, seed=33, spread=1.0)
    same(karcher_mean(fts, alphas, max_iter=20), mk_karcher.karcher_merge_tensors(fts, alphas, max_iter=20))


@pytest.mark.parametrize("case", ["identical", "one_zero", "all_zero", "antiparallel", "single", "float64"])
def test_karcher_edge_cases(case):
    a, b = rand(*MATRIX, seed=34), rand(*MATRIX, seed=35)
    tensors = {"identical": [a, a.clone(), a.clone()], "one_zero": [a, torch.zeros(MATRIX), b],
               "all_zero": [torch.zeros(MATRIX)] * 3, "antiparallel": [a, -a], "single": [a],
               "float64": [a.double(), b.double(), (a - b).double()]}[case]
    ours = karcher_mean(tensors)
    same(ours, theirs("karcher", tensors, base_index=None))
    assert torch.isfinite(ours).all()


# ----------------------------------------------------------------------------
# nearswap
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR])
@pytest.mark.parametrize("t", [0.0, 1e-4, 0.1, 0.5, 10.0, -0.3])
def test_nearswap(shape, t):
    base, (other,) = family(shape, 1, seed=41, spread=0.5)
    same(nearswap(base, other, t), theirs("nearswap", [base, other], t=t))


def test_nearswap_identical_and_float64():
    base = rand(*MATRIX, seed=42)
    same(nearswap(base, base.clone(), 0.01), theirs("nearswap", [base, base.clone()], t=0.01))
    base, (other,) = family(MATRIX, 1, seed=43, dtype=torch.float64)
    same(nearswap(base, other, 0.2), theirs("nearswap", [base, other], t=0.2))


# ----------------------------------------------------------------------------
# model stock
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR, (2, 3, 4)])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, n, filter_wise):
    base, fts = family(shape, n, seed=51)
    same(model_stock(base, fts, filter_wise=filter_wise), theirs("model_stock", [base, *fts], filter_wise=filter_wise))


@pytest.mark.parametrize("case", ["identical", "all_base", "opposite", "correlated", "float64"])
def test_model_stock_edge_cases(case):
    base, fts = family(MATRIX, 2, seed=52)
    d = fts[0] - base
    fts = {"identical": [fts[0], fts[0].clone()], "all_base": [base.clone(), base.clone()],
           "opposite": [base + d, base - d],  # 1 + (k-1) cos = 0: keep the base
           "correlated": [base + d, base + d + 0.1 * rand(*MATRIX, seed=53)],
           "float64": None}[case]
    if case == "float64":
        base, fts = family(MATRIX, 3, seed=54, dtype=torch.float64)
    for filter_wise in (False, True):
        same(model_stock(base, fts, filter_wise=filter_wise),
             theirs("model_stock", [base, *fts], filter_wise=filter_wise))


# ----------------------------------------------------------------------------
# sce
# ----------------------------------------------------------------------------

def assert_no_variance_ties(base, fts):
    var = torch.var(torch.stack([f - base for f in fts]), dim=0, unbiased=False).flatten().tolist()
    assert len(set(var)) == len(var)


@pytest.mark.parametrize("shape", [MATRIX, VECTOR, (2, 3, 4)])
@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.5, 0.3, 0.1, 0.0])
@pytest.mark.parametrize("n", [2, 3])
def test_sce(shape, select_topk, n):
    base, fts = family(shape, n, seed=61)
    assert_no_variance_ties(base, fts)
    same(sce(base, fts, select_topk=select_topk), theirs("sce", [base, *fts], select_topk=select_topk))
    # int8_mask only changes the masks' storage dtype in mergekit
    same(sce(base, fts, select_topk=select_topk),
         theirs("sce", [base, *fts], select_topk=select_topk, int8_mask=True))


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.25, -1.0, 2.0])
def test_sce_helpers_are_mergekits(select_topk):
    base, fts = sparse_family(MATRIX, 3, seed=62)  # exact zeros: entries no model changes have variance 0
    deltas = torch.stack([f - base for f in fts])
    same(sce_select_mask(deltas, select_topk), mk_sce.sce_mask(deltas, select_topk))
    same(sce_model_weights(deltas), mk_sce.sce_weight(deltas))
    same(sce(base, fts, select_topk=select_topk), theirs("sce", [base, *fts], select_topk=select_topk))


def test_sce_edge_cases():
    base, fts = family(MATRIX, 2, seed=63, dtype=torch.float64)
    same(sce(base, fts, select_topk=0.5), theirs("sce", [base, *fts], select_topk=0.5))
    base = rand(*MATRIX, seed=64)
    same(sce(base, [base.clone(), base.clone()]), theirs("sce", [base, base.clone(), base.clone()]))
    same(sce(base, [base + 1.0, base + 1.0], select_topk=0.5),
         theirs("sce", [base, base + 1.0, base + 1.0], select_topk=0.5))
    same(sce(base, []), theirs("sce", [base]))


# ----------------------------------------------------------------------------
# arcee fusion
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR, (8, 16), (2, 3, 4)])
@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_arcee_fusion(shape, spread):
    base, (other,) = family(shape, 1, seed=71, spread=spread)
    same(arcee_fusion(base, other), theirs("arcee_fusion", [base, other]))


def test_arcee_fusion_helpers_are_mergekits():
    base, (other,) = family((8, 16), 1, seed=72)
    importance = fusion_importance(other, base)
    same(importance, mk_arcee._compute_importance(other, base))
    mask, threshold = mk_arcee.DynamicThresholdFusion().compute_fusion_mask(importance)
    same(fusion_threshold(importance), threshold)
    assert torch.equal(importance >= fusion_threshold(importance), mask.bool())


def test_arcee_fusion_sampled_threshold_draws_mergekits_sample(monkeypatch):
    """Over the sample size both draw the quantiles' sample from torch's global generator: with the
    same seed, the same sample (mergekit's 1,000,000 lowered to 16 on both sides to keep this tiny)."""
    monkeypatch.setattr(mk_arcee, "_QUANTILE_SAMPLE_SIZE", 16)
    base, (other,) = family((8, 16), 1, seed=73)
    torch.manual_seed(5)
    reference = theirs("arcee_fusion", [base, other])
    torch.manual_seed(5)
    same(arcee_fusion(base, other, sample_size=16), reference)
    torch.manual_seed(5)
    same(arcee_fusion(base, other, sample_size=16, generator=torch.Generator().manual_seed(5)), reference)


def test_arcee_fusion_edge_cases():
    base = rand(*MATRIX, seed=74)
    same(arcee_fusion(base, base.clone()), theirs("arcee_fusion", [base, base.clone()]))
    same(arcee_fusion(base, base + 0.5), theirs("arcee_fusion", [base, base + 0.5]))  # KL 0: shift-invariant softmax
    zeros = torch.zeros(MATRIX)
    same(arcee_fusion(zeros, base), theirs("arcee_fusion", [zeros, base]))
    base, (other,) = family(MATRIX, 1, seed=75, dtype=torch.float64)
    same(arcee_fusion(base, other), theirs("arcee_fusion", [base, other]))


# ----------------------------------------------------------------------------
# RAM and RAM+ (tensor-local)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [MATRIX, VECTOR, (2, 3, 4)])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("keep", [0.3, 0.7, 1.0])
def test_ram(shape, n, keep):
    base, fts = sparse_family(shape, n, seed=81, keep=keep)
    same(ram(base, fts), theirs("ram", [base, *fts]))
    same(ram(base, fts, epsilon=0.2), theirs("ram", [base, *fts], epsilon=0.2))


@pytest.mark.parametrize("shape", [MATRIX, VECTOR])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("r, alpha, epsilon", [(0.1, 0.2, 1e-5), (0.5, 1.0, 1e-5), (1.0, 0.05, 0.3), (0.0, 0.2, 1e-5),
                                               (-0.4, 2.0, 1e-5)])
def test_ramplus_tl(shape, n, r, alpha, epsilon):
    base, fts = sparse_family(shape, n, seed=82, keep=0.6)
    same(ramplus_tl(base, fts, r=r, alpha=alpha, epsilon=epsilon),
         theirs("ramplus_tl", [base, *fts], r=r, alpha=alpha, epsilon=epsilon))


def test_ram_contributions_are_mergekits():
    base, fts = sparse_family(MATRIX, 3, seed=83)
    flat = torch.stack([f - base for f in fts]).view(3, -1)
    tv, *masks = mk_ram._prepare_ram_vectors(fts, base, 1e-5)
    assert torch.equal(tv, flat)
    for ours, reference in zip(ram_contributions(flat, 1e-5), masks):
        assert torch.equal(ours, reference)


def test_ram_edge_cases():
    base = rand(*MATRIX, seed=84)
    for fts in ([], [base.clone()], [base.clone(), base.clone()], [base + 1.0, base + 1.0]):
        same(ram(base, fts), theirs("ram", [base, *fts]))
        same(ramplus_tl(base, fts), theirs("ramplus_tl", [base, *fts]))
    base, fts = sparse_family(MATRIX, 3, seed=85)
    base, fts = base.double(), [f.double() for f in fts]
    same(ram(base, fts), theirs("ram", [base, *fts]))
    same(ramplus_tl(base, fts, r=0.3, alpha=0.5), theirs("ramplus_tl", [base, *fts], r=0.3, alpha=0.5))


# ----------------------------------------------------------------------------
# passthrough
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [None, 2.5, -0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_passthrough(scale, dtype):
    tensor = rand(*MATRIX, seed=91, dtype=dtype)
    same(passthrough(tensor, scale), theirs("passthrough", [tensor], base_index=None, scale=scale))
    assert scale is not None or passthrough(tensor) is tensor


# ----------------------------------------------------------------------------
# dtypes and errors
# ----------------------------------------------------------------------------

def test_results_have_the_base_dtype_and_bfloat16_stays_close_to_mergekit():
    """bfloat16: mergekit rounds every step to bfloat16, we round the float32 result once; here they
    differ by at most one bfloat16 step (2**-7 at magnitudes near 2)."""
    base, fts = family(MATRIX, 3, seed=95, dtype=torch.bfloat16)
    pairs = [
        (nuslerp(fts[:2], [0.4, 0.6], base), theirs("nuslerp", [base, *fts[:2]], weight=[0.4, 0.6])),
        (multislerp(fts, [0.2, 0.3, 0.5], base), theirs("multislerp", [base, *fts], weight=[0.2, 0.3, 0.5])),
        (karcher_mean(fts), theirs("karcher", fts, base_index=None)),
        (model_stock(base, fts), theirs("model_stock", [base, *fts])),
        (nearswap(base, fts[0], 0.3), theirs("nearswap", [base, fts[0]], t=0.3)),
        (ram(base, fts), theirs("ram", [base, *fts])),
    ]
    for ours, reference in pairs:
        same(ours, reference, atol=1e-2, rtol=1e-2)


def test_invalid_inputs_raise_config_errors():
    base, fts = family(MATRIX, 3, seed=96)
    wrong = rand(3, 6, seed=97)
    calls = [
        (lambda: slerp(base, wrong, 0.5), "one shape"),
        (lambda: slerp(base, fts[0], math.nan), "finite t"),
        (lambda: nuslerp(fts, [1.0, 1.0, 1.0], base), "exactly 2"),
        (lambda: nuslerp(fts[:2], [1.0], base), "one weight per tensor"),
        (lambda: nuslerp(fts[:2], [1.0, 1.0], wrong), "one shape"),
        (lambda: multislerp([], []), "at least 1"),
        (lambda: karcher_mean([]), "at least 1"),
        (lambda: karcher_mean(fts, [1.0, -1.0, 0.0]), "sum to zero"),
        (lambda: nearswap(base, wrong, 0.1), "one shape"),
        (lambda: model_stock(base, fts[:1]), "at least 2 tensor"),
        (lambda: sce(base, [fts[0], wrong]), "one shape"),
        (lambda: arcee_fusion(base, fts[0], sample_size=0), "sample_size"),
        (lambda: ram(base, [wrong]), "one shape"),
        (lambda: ramplus_tl(base, fts, epsilon=0.0), "epsilon > 0"),
        (lambda: passthrough(torch.arange(3), 2.0), "floating-point"),
    ]
    for call, message in calls:
        with pytest.raises(ConfigError, match=message):
            call()
