"""WUDI merging (Cheng et al., ICML 2025, https://arxiv.org/abs/2503.08099): a data-free merge that
removes interference by making the merged task vector act on each task vector's own row space as that
task vector does; and its activation-aware variant, which weighs the same objective by each task's
own input Gram.

For one linear map and task vectors ``tau_i`` ``(out, in)``, WUDI minimises

    L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 = sum_i tr((tau - tau_i) P_i (tau - tau_i)^T)

with ``P_i = tau_i^T tau_i / ||tau_i||^2`` (trace 1), from ``tau = sum_i tau_i`` with Adam (learning rate
1e-5, 300 steps in the official code, ``nathanielyvo/WUDI-Merging``), and adds the result to the base
with coefficient 1. ``P_i`` stands in for the Gram of task ``i``'s inputs, which WUDI has no data for.
The loss is quadratic, so its gradient is ``2 (tau H - C)`` with ``H = sum_i P_i`` ``(in, in)`` and
``C = sum_i tau_i P_i``; both are computed once, and each step costs one ``(out, in) x (in, in)``
product instead of a pass over every task. Adam's steps are those of the official autograd loop (Adam
does not see the loss's scale). The run is early-stopped on purpose: the exact minimiser is not what
the paper evaluates (``docs/merge-methods-references.md``).

``wudi_activation`` (ours, not a published method) keeps the loop and replaces the stand-in by the
task's measured input Gram where there is one: ``P_i -> (1 - s) P_i + s G_i / tr(G_i)``, ``s`` the
``gram_share`` (0: WUDI itself; 1: the loss is RegMean's ``sum_i ||(tau - tau_i) X_i^T||^2`` with each
task's Gram scaled to trace 1, early-stopped as WUDI is).

Only linear maps' weights are merged this way (the official code leaves every other tensor alone;
here they go to the method's fallback). Weights scale the task vectors before the optimisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError

DEFAULT_STEPS = 300
DEFAULT_LR = 1e-5
# the better of the two shares measured on the testbed's validation split (0.5: 0.894, 1.0: 0.883 mean
# normalized accuracy, each at its best lambda); WUDI itself (share 0) scored 0.902 there, so on that
# testbed the measured Grams do not help (benchmarks/results/merge_testbed.md)
DEFAULT_GRAM_SHARE = 0.5


def _as_rows(weighted: torch.Tensor) -> torch.Tensor:
    """The stack ``(n, out, in)`` in float32 (a stack of vectors as ``(n, 1, in)``)."""
    taus = weighted.to(torch.float32)
    return taus.reshape(taus.shape[0], taus.shape[1], -1) if taus.ndim > 2 else taus[:, None, :]


def interference_quadratic(flat: torch.Tensor, input_grams: Sequence[torch.Tensor] | None = None,
                           gram_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, C)`` of the loss ``sum_i tr((tau - tau_i) Q_i (tau - tau_i)^T)``, ``Q_i`` of trace 1: WUDI's
    ``P_i`` mixed with the share ``gram_share`` of ``G_i / tr(G_i)`` (see the module doc). A task vector
    of zeros and a Gram of zero trace constrain nothing."""
    width = flat.shape[-1]
    hessian = torch.zeros(width, width, dtype=torch.float32, device=flat.device)
    target = torch.zeros(flat.shape[1:], dtype=torch.float32, device=flat.device)
    for i, tau in enumerate(flat):
        size = float(tau.pow(2).sum())
        if size == 0:
            continue
        own = tau.T @ tau / size
        if gram_share > 0:
            gram = input_grams[i].to(device=flat.device, dtype=torch.float32)
            trace = float(gram.diagonal().sum())
            own = own * (1 - gram_share) + (gram * (gram_share / trace) if trace > 0 else 0)
            del gram  # before the next one is loaded: a sequence that loads each Gram holds one at a time
        hessian += own
        target += tau @ own
    return hessian, target


def adam_from_sum(flat: torch.Tensor, hessian: torch.Tensor, target: torch.Tensor, steps: int, lr: float
                  ) -> torch.Tensor:
    """WUDI's optimisation: Adam on the quadratic ``tr(tau H tau^T) - 2 <tau, C>`` from the sum of the
    task vectors, the official number of steps."""
    merged = flat.sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            merged.grad = 2 * (merged @ hessian - target)
        optimizer.step()
    return merged.detach()


def wudi_combine(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool = False, *,
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> torch.Tensor:
    """The WUDI task vector of a stack ``weighted[i] = w_i * tau_i`` ``(n, out, in)`` (see the module doc;
    ``normalize`` is accepted for the combiner signature and has no effect)."""
    flat = _as_rows(weighted)
    merged = adam_from_sum(flat, *interference_quadratic(flat), steps, lr)
    return merged.reshape(weighted.shape[1:]).to(weighted.dtype)


def wudi_activation_combine(weighted: torch.Tensor, weights: torch.Tensor, grams: Sequence[torch.Tensor], *,
                            gram_share: float = DEFAULT_GRAM_SHARE, steps: int = DEFAULT_STEPS,
                            lr: float = DEFAULT_LR) -> torch.Tensor:
    """WUDI with each task's input Gram ``(in, in)`` weighing its interference (see the module doc) for a
    stack ``weighted[i] = w_i * tau_i`` ``(n, out, in)``."""
    if weighted.ndim != 3:
        raise ConfigError(f"wudi_activation merges the weights of linear maps, got a tensor of shape "
                          f"{tuple(weighted.shape[1:])}")
    if not 0.0 <= gram_share <= 1.0:
        raise ConfigError(f"gram_share {gram_share} is outside [0, 1]")
    n, _, width = weighted.shape
    square = torch.Size([width, width])  # indexed, not iterated: a sequence that loads each Gram holds one
    if len(grams) != n or any(getattr(grams[i], "shape", None) != square for i in range(n)):
        raise ConfigError(f"wudi_activation needs one ({width}, {width}) input Gram per fine-tune")
    flat = _as_rows(weighted)
    merged = adam_from_sum(flat, *interference_quadratic(flat, grams, gram_share), steps, lr)
    return merged.to(weighted.dtype)


__all__ = ["DEFAULT_GRAM_SHARE", "DEFAULT_LR", "DEFAULT_STEPS", "adam_from_sum", "interference_quadratic",
           "wudi_activation_combine", "wudi_combine"]
