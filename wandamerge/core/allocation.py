"""Layer-wise sparsity allocation as pure functions: OWL's outlier ratios and the per-block sparsities they give.

OWL (Outlier Weighted Layerwise sparsity; Yin et al., ICML 2024) prunes the
decoder blocks that hold more outliers of the Wanda score less. These functions
follow the official code (github.com/luuyin/OWL, ``lib/prune_all.py``,
``prune_wanda_outlier``, and ``check_outlier_mean`` there):

* a block's outlier ratio ``D`` is the fraction of the Wanda scores
  ``|W_ij| * ||X_j||`` of all its linear maps, flattened and taken together,
  that are greater than ``M`` times the mean of those scores (one mean per
  block, over the concatenation: larger maps weigh more);
* ``r = (D - min D) / (max D - min D) * 2 * lambda`` over the blocks, then each
  block keeps the fraction ``r - mean(r) + (1 - target)`` of its weights, so
  its sparsity is ``target - (r - mean(r))``: the plain mean over the blocks
  (not weighted by their sizes) equals the target, and the sparsities span
  ``2 * lambda``.

Scaling every score of a block by one number leaves its ratio unchanged, so
``||X_j||`` may be the root of the sum of ``x_j ** 2`` over the tokens (as
here) or of its mean over the windows (the official code's ``scaler_row``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError

OWL_M = 5.0  # the paper's outlier threshold, M times the block's mean score
OWL_LAMBDA = 0.08  # the paper's limit on how far a block's sparsity may move from the target


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """The fraction of the entries of ``scores`` (taken together) greater than ``m`` times their mean."""
    total = sum(score.numel() for score in scores)
    if not total:
        return 0.0
    mean = sum(score.double().sum() for score in scores) / total
    threshold = m * mean
    return float(sum((score.double() > threshold).sum() for score in scores)) / total


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Each block's sparsity from its outlier ratio: ``sparsity - (r - mean(r))`` with ``r`` the ratios
    scaled to ``[0, 2 * lam]`` (more outliers, lower sparsity); the mean over the blocks is ``sparsity``.

    Ratios that are all equal give every block ``sparsity`` (the official code divides by zero there).
    """
    ratios = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    if ratios.numel() == 0:
        return []
    spread = ratios.max() - ratios.min()
    if spread == 0:
        return [float(sparsity)] * ratios.numel()
    scaled = (ratios - ratios.min()) / spread * (2 * lam)
    return (sparsity - (scaled - scaled.mean())).tolist()


def check_block_sparsities(sparsities: Sequence[float], what: str) -> list[float]:
    """Every block's sparsity in ``[0, 1)``, or a one-line error naming the first block outside it."""
    for index, value in enumerate(sparsities):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{what} gives block {index} sparsity {value:.4f}, outside [0, 1)")
    return [float(value) for value in sparsities]
