"""DSnoT's mask refinement, against references computed independently: a scalar loop over each row's candidate
lists written from the paper's rules, the mean output error measured on the inputs themselves, the squared
output error on inputs whose channels are exactly uncorrelated, and whole models pruned the slow way (each
map's inputs from a whole-model forward)."""

from __future__ import annotations

import math

import pytest
import torch

import wandamerge
from wandamerge.core.dsnot import VAR_FLOOR, DsnotSettings, dsnot_refine
from wandamerge.core.scores import wanda_score
from wandamerge.core.selection import keep_after_pruning, keep_n_of_m
from wandamerge.errors import ConfigError
from wandamerge.models import decoder_blocks

from conftest import VOCAB, tiny_model
from test_prune_end_to_end import inputs_of, linear_modules, out_in

WINDOWS = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(11))


# ----------------------------------------------------------------------------- the reference


def reference_row(w: list[float], score: list[float], kept: set[int], mean: list[float], var: list[float],
                  nm: tuple[int, int] | None, settings: DsnotSettings) -> set[int]:
    """One row refined by DSnoT's rules, candidate list by candidate list, in plain Python floats."""
    kept, at_start = set(kept), set(kept)
    pruned = [j for j in range(len(w)) if j not in kept]
    effect = [w[j] * mean[j] for j in range(len(w))]
    error = sum(effect[j] for j in pruned)
    variance_error = sum(w[j] ** 2 * var[j] for j in pruned)
    sign = (error > 0) - (error < 0)
    grow = sorted(pruned, key=lambda j: (-sign * effect[j] / max(var[j], VAR_FLOOR) ** settings.var_power, j))
    cut = sorted((j for j in at_start if sign * effect[j] < 0), key=lambda j: (score[j], j))
    for step in range(settings.cycles):
        if sign == 0 or abs(error) <= settings.threshold or step >= len(grow):
            break
        g = grow[step]
        if nm:
            start = g - g % nm[1]
            group = [j for j in range(start, start + nm[1]) if j in kept and j in at_start]
            if not group:
                break
            p = min(group, key=lambda j: (score[j], j))
        elif step < len(cut):
            p = cut[step]
        else:
            break
        after = error - effect[g] + effect[p]
        after_variance = variance_error - w[g] ** 2 * var[g] + w[p] ** 2 * var[p]
        if (after > 0) - (after < 0) != sign or abs(after) >= abs(error):
            break
        if settings.guard and after ** 2 + after_variance > error ** 2 + variance_error:
            break
        kept = (kept | {g}) - {p}
        error, variance_error = after, after_variance
    return kept


def reference_refine(weight, keep, score, x, nm=None, settings=DsnotSettings()) -> torch.Tensor:
    """The whole mask refined row by row by :func:`reference_row`, the inputs' moments from ``x`` (tokens, in)."""
    mean, var = x.mean(0).tolist(), x.var(0, unbiased=False).tolist()
    refined = torch.zeros_like(keep)
    for i in range(weight.shape[0]):
        kept = {j for j in range(weight.shape[1]) if keep[i, j]}
        for j in reference_row(weight[i].tolist(), score[i].tolist(), kept, mean, var, nm, settings):
            refined[i, j] = True
    return refined


def layer(seed: int, rows: int = 24, cols: int = 32, tokens: int = 200):
    """A weight and inputs with channels of uneven means and scales (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 3 + 0.1
    shift = torch.randn(cols, generator=g, dtype=torch.float64) * 2
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * scale + shift
    return weight, x


def wanda_start(weight, x, nm=None, sparsity=0.5):
    score = wanda_score(weight, (x ** 2).sum(0)).double()
    keep = keep_n_of_m(score, *nm) if nm else keep_after_pruning(score, sparsity)
    return score, keep


def refine(weight, keep, score, x, nm=None, settings=DsnotSettings()):
    return dsnot_refine(weight, keep, score, x.mean(0), x.var(0, unbiased=False), nm, settings)


def mean_error(weight, keep, x) -> torch.Tensor:
    """Each row's mean output error over the tokens of ``x``, measured: mean_t ((W - W * keep) x_t)_i."""
    return ((weight * ~keep) @ x.T).mean(1)


def squared_error(weight, keep, x) -> torch.Tensor:
    """Each row's mean squared output error over the tokens of ``x``, measured."""
    return (((weight * ~keep) @ x.T) ** 2).mean(1)


# ----------------------------------------------------------------------------- the refinement


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4)])
@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_equals_the_scalar_reference(nm, guard, seed):
    weight, x = layer(seed)
    score, keep = wanda_start(weight, x, nm)
    settings = DsnotSettings(guard=guard, threshold=1e-3)
    ours = refine(weight, keep, score, x, nm, settings)
    assert torch.equal(ours, reference_refine(weight, keep, score, x, nm, settings))
    assert not torch.equal(ours, keep)  # it did swap


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("guard", [True, False])
def test_the_mean_output_error_measured_on_the_inputs_never_grows(nm, guard):
    weight, x = layer(3, rows=64, cols=64)
    score, keep = wanda_start(weight, x, nm)
    refined = refine(weight, keep, score, x, nm, DsnotSettings(guard=guard))
    before, after = mean_error(weight, keep, x).abs(), mean_error(weight, refined, x).abs()
    assert (after <= before + 1e-12).all()
    assert (after < before).float().mean() > 0.4  # and many rows' error shrinks


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_the_mean_squared_error_never_grows_when_the_channels_are_uncorrelated(nm):
    """Inputs with exactly zero covariance between channels (orthogonal centred columns): the guard's
    estimate is then the squared error itself, measured here on the tokens."""
    rows, cols, tokens = 48, 32, 256
    weight, _ = layer(4, rows, cols)
    g = torch.Generator().manual_seed(4)
    centred = torch.linalg.qr(torch.randn(tokens, cols + 1, generator=g, dtype=torch.float64))[0]
    centred = centred[:, 1:] - centred[:, 1:].mean(0)  # orthogonal to each other after removing the mean
    centred = torch.linalg.qr(centred)[0] * math.sqrt(tokens)
    centred -= centred.mean(0)
    x = centred * (torch.rand(cols, generator=g, dtype=torch.float64) * 3 + 0.1) + \
        torch.randn(cols, generator=g, dtype=torch.float64) * 2
    covariance = torch.cov(x.T, correction=0)
    assert (covariance - torch.diag(covariance.diag())).abs().max() < 1e-9
    score, keep = wanda_start(weight, x, nm)
    refined = refine(weight, keep, score, x, nm, DsnotSettings(guard=True))
    before, after = squared_error(weight, keep, x), squared_error(weight, refined, x)
    assert (after <= before * (1 + 1e-9)).all()
    assert (after < before).any() and not torch.equal(refined, keep)


@pytest.mark.parametrize("nm", [None, (2, 4), (2, 8)])
def test_every_row_and_group_keeps_as_many(nm):
    weight, x = layer(5, rows=40, cols=64)
    score, keep = wanda_start(weight, x, nm, sparsity=0.7)
    refined = refine(weight, keep, score, x, nm)
    assert torch.equal(refined.sum(1), keep.sum(1))
    if nm:
        assert (refined.reshape(-1, nm[1]).sum(1) == nm[1] - nm[0]).all()


def test_a_swap_worked_by_hand():
    """One row, inputs of mean 1 and variance 0 on every channel: the error is the sum of the pruned
    weights. Start: kept {0: 4, 1: -3}, pruned {2: 2, 3: 0.5}, e = 2.5. Regrow w2 (the largest pull, 2) and
    prune the kept weight of the other sign (w1 = -3): e = 2.5 - 2 - 3 flips sign, refused, the row stops.
    With w1 = -1.5 instead: e = 2.5 - 2 - 1.5 = -1 flips too; with w1 = -1: e = -0.5, |e| < 2.5 but the sign
    flips: refused. With w1 = -0.25: e = 0.25, accepted; then regrow w3 (0.5) with nothing left to prune."""
    x = torch.ones(4, 4, dtype=torch.float64)
    keep = torch.tensor([[True, True, False, False]])
    score = torch.tensor([[4.0, 3.0, 2.0, 0.5]], dtype=torch.float64)
    for w1, expected in [(-3.0, [True, True, False, False]), (-1.0, [True, True, False, False]),
                         (-0.25, [True, False, True, False])]:
        weight = torch.tensor([[4.0, w1, 2.0, 0.5]], dtype=torch.float64)
        refined = refine(weight, keep, score, x, settings=DsnotSettings(threshold=0.0))
        assert refined.tolist() == [expected], w1


def test_no_cycles_or_a_large_threshold_leave_the_mask():
    weight, x = layer(6)
    score, keep = wanda_start(weight, x)
    assert torch.equal(refine(weight, keep, score, x, settings=DsnotSettings(cycles=0)), keep)
    assert torch.equal(refine(weight, keep, score, x, settings=DsnotSettings(threshold=1e9)), keep)


def test_shapes_that_do_not_match_are_refused():
    weight, x = layer(7)
    score, keep = wanda_start(weight, x)
    with pytest.raises(ConfigError, match="shape"):
        dsnot_refine(weight, keep[:, :4], score, x.mean(0), x.var(0))
    with pytest.raises(ConfigError, match="means and variances"):
        dsnot_refine(weight, keep, score, x.mean(0)[:4], x.var(0))
    with pytest.raises(ConfigError, match="cycles"):
        DsnotSettings(cycles=-1)


# ----------------------------------------------------------------------------- whole models


def reference_dsnot_model(model, windows, nm=None, sparsity=0.5, settings=DsnotSettings()) -> None:
    """DSnoT the slow way, in the runner's sequential order: each map's inputs from a whole-model forward
    after every earlier map is pruned, Wanda's start and the refinement by the scalar reference."""
    for block in decoder_blocks(model):
        for name, mod in linear_modules(block):
            x = inputs_of(model, mod, windows).double()
            weight = out_in(mod).double()
            score, keep = wanda_start(weight, x, nm, sparsity)
            keep = reference_refine(weight, keep, score, x, nm, settings)
            with torch.no_grad():
                out_in(mod)[~keep] = 0


@pytest.mark.parametrize("method, guard", [("dsnot", False), ("dsnot-guarded", True)])
@pytest.mark.parametrize("shape", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_whole_model_equals_the_slow_reference(shape, method, guard):
    ours, ref = tiny_model("llama"), tiny_model("llama")
    wandamerge.prune(ours, WINDOWS, method=method, within_block="sequential", progress=False, **shape)
    reference_dsnot_model(ref, WINDOWS, (2, 4) if "pattern" in shape else None, shape.get("sparsity", 0.5),
                          DsnotSettings(guard=guard))
    differ = 0
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        differ += int(((a == 0) != (b == 0)).sum())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name) if differ == 0 else None
    assert differ == 0


def test_dsnot_moves_weights_and_keeps_the_pattern_with_permute_and_update():
    wanda, dsnot = tiny_model("llama"), tiny_model("llama")
    wandamerge.prune(wanda, WINDOWS, method="wanda", pattern="2:4", progress=False)
    report = wandamerge.prune(dsnot, WINDOWS, method="dsnot", pattern="2:4", permute=True, update=True,
                              progress=False)
    assert report.overall_sparsity == pytest.approx(0.5)
    moved = 0
    for block_w, block_d in zip(decoder_blocks(wanda), decoder_blocks(dsnot)):
        for (name, a), (_, b) in zip(linear_modules(block_w), linear_modules(block_d)):
            kept = out_in(b) != 0
            assert (kept.reshape(-1, 4).sum(1) <= 2).all(), name
            moved += int((kept != (out_in(a) != 0)).sum())
    assert moved > 0
