"""WUDI merging (Cheng et al., ICML 2025, https://arxiv.org/abs/2503.08099): a data-free merge that
removes interference by making the merged task vector act on each task vector's own row space as that
task vector does.

For one linear map and task vectors ``tau_i`` ``(out, in)``, WUDI minimises

    L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

from ``tau = sum_i tau_i`` with Adam (learning rate 1e-5, 300 steps in the official code,
``nathanielyvo/WUDI-Merging``), and adds the result to the base with coefficient 1. The loss is
quadratic, so its gradient is ``2 (tau H - C)`` with ``H = sum_i tau_i^T tau_i / n_i`` ``(in, in)`` and
``C = sum_i tau_i tau_i^T tau_i / n_i``; both are computed once, and each step costs one
``(out, in) x (in, in)`` product instead of a pass over every task. Adam's steps are those of the
official autograd loop (Adam does not see the loss's scale). The run is early-stopped on purpose: the
exact minimiser is not what the paper evaluates (``docs/merge-methods-references.md``).

Only linear maps' weights are merged this way (the official code leaves every other tensor alone;
here they go to the method's fallback). Weights scale the task vectors before the optimisation.
"""

from __future__ import annotations

import torch

DEFAULT_STEPS = 300
DEFAULT_LR = 1e-5


def wudi_combine(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool = False, *,
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> torch.Tensor:
    """The WUDI task vector of a stack ``weighted[i] = w_i * tau_i`` ``(n, out, in)`` (see the module doc;
    ``normalize`` is accepted for the combiner signature and has no effect)."""
    taus = weighted.to(torch.float32)
    flat = taus.reshape(taus.shape[0], taus.shape[1], -1) if taus.ndim > 2 else taus[:, None, :]
    width = flat.shape[-1]
    hessian = torch.zeros(width, width, dtype=torch.float32, device=taus.device)
    target = torch.zeros(flat.shape[1:], dtype=torch.float32, device=taus.device)
    for tau in flat:
        size = float(tau.pow(2).sum())
        if size == 0:
            continue  # a task vector of zeros constrains nothing
        gram = tau.T @ tau / size
        hessian += gram
        target += tau @ gram
    merged = flat.sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            merged.grad = 2 * (merged @ hessian - target)
        optimizer.step()
    return merged.detach().reshape(weighted.shape[1:]).to(weighted.dtype)


__all__ = ["DEFAULT_LR", "DEFAULT_STEPS", "wudi_combine"]
