"""AIM, Activation-Informed Merging (Nobari et al., 2025, https://arxiv.org/abs/2502.02421): a post-pass on
any merge that shrinks the merged update of a linear map on the input channels the base model uses most.

With ``a_j`` the base model's mean ``|x_j|`` at the map's input over calibration tokens and
``I = a / max(a)``, the merged weight becomes

    W = W_base + (W_merged - W_base) * (1 - I (1 - omega))      (I along the input dimension)

so the most active channel keeps ``omega`` of its update and a channel the data never reaches keeps all
of it. ``omega`` 0.4 is the paper's value (its README suggests 0.2 to 0.6). The official code
(``ahnobari/ActivationInformedMerging``) also relaxes the LM head and the norm weights; here only the
decoder blocks' linear maps, whose inputs the calibration pass sees, are relaxed.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

DEFAULT_OMEGA = 0.4


def aim_factors(abs_sums: torch.Tensor, omega: float) -> torch.Tensor:
    """``1 - I (1 - omega)`` per input channel, ``I = a / max(a)`` (all ones when no channel is active)."""
    if not 0.0 <= omega <= 1.0:
        raise ConfigError(f"aim omega {omega} is outside [0, 1]")
    a = abs_sums.to(torch.float32).abs()
    peak = float(a.max()) if a.numel() else 0.0
    if peak <= 0:
        return torch.ones_like(a)
    return 1.0 - (a / peak) * (1.0 - omega)


def aim_relax(base: torch.Tensor, merged: torch.Tensor, abs_sums: torch.Tensor, omega: float = DEFAULT_OMEGA
              ) -> torch.Tensor:
    """``base + (merged - base) * factors`` for a weight ``(out, in)`` (or a block of its rows), in the
    merged tensor's dtype."""
    factors = aim_factors(abs_sums, omega).to(device=merged.device)
    if merged.shape[-1] != factors.shape[0]:
        raise ConfigError(f"aim: {factors.shape[0]} input channels for a weight of shape {tuple(merged.shape)}")
    work = torch.float64 if merged.dtype == torch.float64 else torch.float32
    out = base.to(work) + (merged.to(work) - base.to(work)) * factors.to(work)
    return out.to(merged.dtype)


__all__ = ["DEFAULT_OMEGA", "aim_factors", "aim_relax"]
