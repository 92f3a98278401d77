"""Structured depth pruning, the pure part: how much a block changes its residual stream, how many blocks go, and
which. Tensors and numbers in, tensors and numbers out.

Words: a block's *influence* is ShortGPT's Block Influence (Men et al., 2024, "ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect"): one minus the mean, over the calibration tokens, of the cosine
similarity between the hidden state a block receives and the one it returns. A block that barely turns the
residual stream has an influence near 0 and is the first to go.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def cosine_sum(before: torch.Tensor, after: torch.Tensor) -> float:
    """The sum over tokens of the cosine similarity between ``before`` and ``after`` (``(..., hidden)``, the same
    shape), in float64; a token whose state is all zeros on either side counts as a cosine of 0."""
    if before.shape != after.shape:
        raise ConfigError(f"hidden states of shapes {tuple(before.shape)} and {tuple(after.shape)} do not pair up")
    a = before.detach().reshape(-1, before.shape[-1]).double()
    b = after.detach().reshape(-1, after.shape[-1]).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    dots = (a * b).sum(1)
    return float(torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0).sum())


def block_influence(cosines: float, tokens: int) -> float:
    """ShortGPT's Block Influence: ``1 - mean cosine`` over ``tokens`` tokens whose cosines sum to ``cosines``."""
    if tokens <= 0:
        raise ConfigError("block influence needs at least one calibration token")
    return 1.0 - cosines / tokens


def blocks_to_remove(blocks: int, sparsity: float) -> int:
    """How many of ``blocks`` alike decoder blocks go to remove ``sparsity`` of their parameters: the nearest
    whole number of blocks (halves round to even), at least one block kept."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    count = round(sparsity * blocks)
    if count >= blocks:
        raise ConfigError(f"sparsity {sparsity} would remove all {blocks} decoder blocks: "
                          f"depth pruning can remove at most {blocks - 1} of {blocks}")
    return count


def removed_blocks(scores: torch.Tensor, count: int) -> list[int]:
    """The indices, ascending, of the ``count`` blocks with the lowest ``scores`` (among equal scores the later
    block goes first: deeper blocks are the more redundant ones in ShortGPT's and Gromov et al.'s studies)."""
    if not 0 <= count <= scores.numel():
        raise ConfigError(f"cannot remove {count} of {scores.numel()} blocks")
    flat = scores.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), -i))
    return sorted(order[:count])
