"""Importance scores of weights and deltas: tensors in, tensors out.

A score has the shape of the weight ``(out_features, in_features)``; high
scores are kept first (see :mod:`.selection`).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W_ij|``."""
    return weight.detach().abs().float()


RIA_A = 0.5  # RIA's exponent of the input norm: the paper's a, the official code's default --a


def input_norms(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` as a row ``(1, in)`` on the weight's device, from ``input_sq_norms[j] = sum over tokens
    of x_j ** 2`` (checked against the weight's shape)."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ConfigError(
            f"input norms have shape {tuple(input_sq_norms.shape)}, expected ({weight.shape[1]},) "
            f"for a weight of shape {tuple(weight.shape)}"
        )
    return input_sq_norms.float().clamp_min(0).sqrt().to(weight.device).unsqueeze(0)


def wanda_score(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` with ``input_sq_norms[j] = sum over tokens of x_j ** 2``."""
    return weight.detach().abs().float() * input_norms(weight, input_sq_norms)


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """``|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|``: the share of ``|W_ij|`` in its row (all the inputs of
    output i) plus its share in its column (all the outputs of input j). A row or column of zeros gives 0."""
    w = weight.detach().abs().float()
    tiny = torch.finfo(w.dtype).tiny
    return w / w.sum(dim=1, keepdim=True).clamp_min(tiny) + w / w.sum(dim=0, keepdim=True).clamp_min(tiny)


def ria_score(weight: torch.Tensor, input_sq_norms: torch.Tensor, a: float = RIA_A) -> torch.Tensor:
    """RIA (Zhang et al., ICLR 2024): ``relative_importance(W)_ij * ||X_j||_2 ** a``.

    As the official code (github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning,
    ``lib/prune.py``, ``prune_ria``): ``|W| / sum(|W|, dim=0) + |W| / sum(|W|, dim=1)`` -- row i summed over
    its inputs j, column j summed over its outputs i -- times ``sqrt(scaler_row) ** a``, where ``scaler_row``
    is Wanda's ``sum of x_j ** 2`` (the l2 norm squared) and ``a = 0.5`` by default (:data:`RIA_A`). The
    official ``scaler_row`` is divided by the number of calibration windows: one factor for every entry of the
    matrix, so the masks are the same. Where the official code divides 0 by 0 (a row or column of zeros) this
    gives 0, not NaN.
    """
    return relative_importance(weight) * input_norms(weight, input_sq_norms) ** a
