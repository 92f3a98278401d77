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


def wanda_score(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` with ``input_sq_norms[j] = sum over tokens of x_j ** 2``."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ConfigError(
            f"input norms have shape {tuple(input_sq_norms.shape)}, expected ({weight.shape[1]},) "
            f"for a weight of shape {tuple(weight.shape)}"
        )
    return weight.detach().abs().float() * input_sq_norms.float().clamp_min(0).sqrt().to(weight.device).unsqueeze(0)
