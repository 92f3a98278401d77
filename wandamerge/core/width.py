"""Structured width pruning, the pure part: channel and group scores, how many groups and channels go, and the
pieces of the cut. Tensors and numbers in, tensors and numbers out.

Words: a *channel* is one input of an output map (``o_proj``: one entry of one attention head's output;
``down_proj``: one MLP intermediate channel); a *unit* is what goes whole: an MLP channel, or a GQA group (one
key/value head and the ``heads_per_group`` query heads that share it; query head ``h`` belongs to group
``h // heads_per_group``, as transformers' ``repeat_kv`` pairs them). Scores are higher-kept-first
(:mod:`.selection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .selection import keep_per_row

# ----------------------------------------------------------------------------- scores of an output map's channels


def channel_variance(m2: torch.Tensor, tokens: int) -> torch.Tensor:
    """The sample variance over ``tokens`` tokens of each channel, from its sum of squared deviations ``m2``."""
    return m2 / max(tokens - 1, 1)


def fluctuation_score(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric (An et al., AAAI 2024, "WIFV") of each input channel ``j`` of an output map
    ``weight`` (out, in): ``Var_tokens(x_j) * ||W_:,j||_2^2``."""
    _check_width(weight, variance, "variances")
    return variance.to(weight.device).float() * weight.detach().float().pow(2).sum(0)


def wanda_sp_score(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda-sp (FLAP's structured Wanda baseline) of each input channel ``j``: the Wanda scores of its column,
    summed, ``sum_i |W_ij| * ||X_j||_2`` (``input_sq_norms[j]`` = sum over tokens of ``x_j ** 2``)."""
    _check_width(weight, input_sq_norms, "input norms")
    norms = input_sq_norms.to(weight.device).float().clamp_min(0).sqrt()
    return weight.detach().float().abs().sum(0) * norms


def _check_width(weight: torch.Tensor, per_channel: torch.Tensor, what: str) -> None:
    if per_channel.shape != (weight.shape[1],):
        raise ConfigError(f"{what} have shape {tuple(per_channel.shape)}, expected ({weight.shape[1]},) for an "
                          f"output map of shape {tuple(weight.shape)}")


def group_scores(channel_scores: torch.Tensor, head_dim: int, heads_per_group: int) -> torch.Tensor:
    """Each GQA group's score: the sum of its query heads' scores, each the sum of its ``head_dim`` channels
    of ``o_proj``'s input."""
    return channel_scores.reshape(-1, heads_per_group * head_dim).sum(1)


def kept_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices, ascending, of the ``keep`` highest ``scores`` (among equal scores the lower index is kept)."""
    if not 0 < keep <= scores.numel():
        raise ConfigError(f"cannot keep {keep} of {scores.numel()} heads or channels")
    return keep_per_row(scores.reshape(-1), keep).nonzero().reshape(-1)


# ----------------------------------------------------------------------------- the pieces of the cut


def group_heads(groups: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """The query heads, ascending, of the GQA ``groups`` (ascending)."""
    return (groups.unsqueeze(1) * heads_per_group + torch.arange(heads_per_group, device=groups.device)).reshape(-1)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of a projection (the channels of ``o_proj``'s input) that belong to ``heads``."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def compensation_bias(weight: torch.Tensor, means: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's baseline bias: what the channels of an output map ``weight`` (out, in) outside ``kept`` add on
    average, ``W_:,removed @ mean(x_removed)``, in float32 (added to the output map's bias, it replaces their
    mean contribution)."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept.to(weight.device)] = False
    means = means.to(weight.device).double()
    return (weight.detach().double()[:, removed] @ means[removed]).float()


# ----------------------------------------------------------------------------- how many go


@dataclass(frozen=True)
class UnitCost:
    """What one kind of unit (GQA groups of an attention layer, channels of an MLP) weighs in one block."""

    units: int
    per_unit: int  # its rows of the input maps (weights, biases) and its columns of the output map
    bias_per_unit: int = 0  # what a compensation bias adds per kept unit (the input maps' biases it switches on)
    bias_fixed: int = 0  # the output map's bias, where it had none

    @property
    def weights(self) -> int:
        return self.units * self.per_unit

    def parameters(self, kept: int, biased: bool) -> int:
        """The parameters of ``kept`` units, with the compensation's new biases when ``biased``."""
        return kept * (self.per_unit + self.bias_per_unit * biased) + self.bias_fixed * biased

    def nearest_kept(self, budget: float, biased: bool) -> int:
        """The number of kept units (at least one, at most all) whose parameters come nearest to ``budget``."""
        size = self.per_unit + self.bias_per_unit * biased
        return min(self.units, max(1, math.floor((budget - self.bias_fixed * biased) / size + 0.5)))


@dataclass(frozen=True)
class WidthPlan:
    """How many GQA groups and MLP channels every block keeps, for a share ``ratio`` of the blocks' parameters."""

    ratio: float  # asked
    fraction: float  # f: the share of the heads and of the channels that removes ``ratio`` of the parameters
    groups_kept: int
    channels_kept: int
    before: int  # parameters of one block
    after: int

    @property
    def achieved(self) -> float:
        return 1 - self.after / self.before


def width_plan(attention: UnitCost, mlp: UnitCost, fixed: int, ratio: float,
               compensate: tuple[bool, bool] = (False, False)) -> WidthPlan:
    """Remove ``ratio`` of a block's parameters (``fixed``: those no cut changes, its norms) by removing the same
    share ``f`` of its GQA groups and of its MLP channels: ``f = ratio * total / (attention + MLP weights)``.
    The removed groups are ``f * groups`` rounded to the nearest whole group; the MLP then keeps the number of
    channels that brings the block nearest to ``(1 - ratio) * total`` (it absorbs the groups' rounding, and
    the new biases of the bias compensation, ``compensate`` = (attention, MLP)). At least one group and one
    channel are kept; a ratio that would need more is refused."""
    total = fixed + attention.weights + mlp.weights
    most = ((attention.units - 1) * attention.per_unit + (mlp.units - 1) * mlp.per_unit) / total
    if ratio > most:
        raise ConfigError(f"width pruning can remove at most {math.floor(most * 1000) / 1000} of the decoder "
                          f"blocks' parameters (one GQA group and one MLP channel kept per block), not {ratio}")
    fraction = ratio * total / (attention.weights + mlp.weights)
    groups_kept = attention.units - min(attention.units - 1, math.floor(fraction * attention.units + 0.5))
    attention_biased = compensate[0] and groups_kept < attention.units
    budget = (1 - ratio) * total - fixed - attention.parameters(groups_kept, attention_biased)
    channels_kept = mlp.nearest_kept(budget, False)
    mlp_biased = compensate[1] and channels_kept < mlp.units  # a kind that keeps all its units gets no bias
    if mlp_biased:
        channels_kept = mlp.nearest_kept(budget, True)
    after = fixed + attention.parameters(groups_kept, attention_biased) + mlp.parameters(channels_kept, mlp_biased)
    return WidthPlan(ratio, fraction, groups_kept, channels_kept, total, after)
