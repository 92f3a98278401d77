"""Scores of whole experts of a mixture-of-experts layer, from what the experts did on calibration tokens.

Everything here is tensors in, tensors out. The calibration pass
(:mod:`wandamerge.pruning.experts`) gives, for every token and each of its
top-k slots, the expert it was routed to (``top_k_index``), its routing weight
``g`` (``top_k_weights``, as the model passes them to the experts) and the norm
``||f_e(x)||_2`` of that expert's output for the token; :func:`expert_sums`
adds them up per expert into an :class:`ExpertStats`, and a score turns the
sums into one number per expert (higher is kept first, :mod:`.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .selection import keep_per_row


@dataclass
class ExpertStats:
    """Per-expert sums over the calibration tokens routed to each expert of one layer."""

    tokens: torch.Tensor  # (E,) int64: tokens routed to the expert
    norm_sums: torch.Tensor  # (E,) float32: sum of ||f_e(x)||_2
    weighted_norm_sums: torch.Tensor  # (E,) float32: sum of g_e(x) * ||f_e(x)||_2

    @classmethod
    def zeros(cls, num_experts: int) -> "ExpertStats":
        return cls(torch.zeros(num_experts, dtype=torch.int64), torch.zeros(num_experts),
                   torch.zeros(num_experts))

    def add(self, other: "ExpertStats") -> None:
        self.tokens += other.tokens
        self.norm_sums += other.norm_sums
        self.weighted_norm_sums += other.weighted_norm_sums


def expert_sums(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, output_norms: torch.Tensor,
                num_experts: int) -> ExpertStats:
    """The per-expert sums of one batch: ``top_k_index``, ``top_k_weights`` and ``output_norms`` are
    ``(tokens, k)``, slot ``(t, j)`` meaning token ``t`` went to expert ``top_k_index[t, j]`` with weight
    ``top_k_weights[t, j]`` and that expert's output for it has norm ``output_norms[t, j]``. A token's top-k
    experts are distinct, so the slots an expert fills count its tokens."""
    if not top_k_index.shape == top_k_weights.shape == output_norms.shape:
        raise ConfigError(f"routing indices, weights and output norms differ in shape: {tuple(top_k_index.shape)}, "
                          f"{tuple(top_k_weights.shape)}, {tuple(output_norms.shape)}")
    experts = top_k_index.reshape(-1).long().cpu()
    norms = output_norms.reshape(-1).float().cpu()
    weights = top_k_weights.reshape(-1).float().cpu()
    return ExpertStats(torch.bincount(experts, minlength=num_experts),
                       torch.zeros(num_experts).index_add_(0, experts, norms),
                       torch.zeros(num_experts).index_add_(0, experts, weights * norms))


def reap_score(tokens: torch.Tensor, weighted_norm_sums: torch.Tensor) -> torch.Tensor:
    """REAP (Lasby et al., 2025, router-weighted expert activation pruning): the mean over the tokens routed
    to an expert of ``g_e(x) * ||f_e(x)||_2``; 0 for an expert no token reached."""
    return weighted_norm_sums.float() / tokens.clamp_min(1).float()


def frequency_score(tokens: torch.Tensor, norm_sums: torch.Tensor) -> torch.Tensor:
    """How often an expert is used, times how much it then adds: its token count times the mean norm of its
    outputs, that is the sum of ``||f_e(x)||_2`` over its tokens (the routing weights play no part)."""
    return tokens.float() * (norm_sums.float() / tokens.clamp_min(1).float())


def kept_experts(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices, ascending, of the ``keep`` highest of one layer's expert ``scores`` (the project's tie
    rule: among equal scores the lower index is kept)."""
    if not 0 < keep <= scores.numel():
        raise ConfigError(f"cannot keep {keep} of {scores.numel()} experts")
    return keep_per_row(scores.reshape(-1), keep).nonzero().reshape(-1)
