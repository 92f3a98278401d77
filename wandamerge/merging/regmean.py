"""RegMean (Jin et al., ICLR 2023, https://arxiv.org/abs/2212.09849): each linear map merged in closed form
from its tasks' input Gram matrices.

For a linear map ``y = W x`` (weight ``(out, in)``), fine-tune ``i`` with weight ``W_i``, input Gram
``G_i = X_i^T X_i / N_i`` (``(in, in)``, the mean over that task's calibration tokens) and merge weight
``w_i > 0``, RegMean takes the ``W`` that minimises ``sum_i w_i ||X_i (W - W_i)^T||^2 / N_i``:

    W* = (sum_i w_i W_i G_i) (sum_i w_i G_i)^-1

Because ``W_base (sum w_i G_i)(sum w_i G_i)^-1 = W_base``, the same formula on task vectors
``tau_i = W_i - W_base`` gives ``W* - W_base``; that is what is computed here, so lambda scales it as it
scales every other method's merged task vector (RegMean itself is lambda = 1). With identical Grams it
is the weighted mean of the task vectors.

* ``alpha`` scales the off-diagonal entries of every Gram (``alpha G + (1 - alpha) diag(G)``), the
  paper's regularisation towards the diagonal; ``alpha = 0`` merges each input column separately
  (a per-column weighted mean by ``G_jj``). The papers' and their code's values range from 0.1 to 0.95
  (``docs/merge-methods-references.md``).
* ``ridge`` adds ``eps = ridge * mean(diag(sum_i w_i G_i))`` towards the weighted mean of the task
  vectors: ``(sum_i w_i tau_i G_i + eps tau_mean)(sum_i w_i G_i + eps I)^-1``. An input channel that
  no task's data reaches then gets the plain weighted mean instead of a singular solve.

The solve runs in float64 and the result comes back in the task vectors' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError

DEFAULT_ALPHA = 0.9  # provisional: issue 14 chooses it on the testbed's validation split
DEFAULT_RIDGE = 1e-4


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * gram`` with the diagonal kept whole: ``alpha G + (1 - alpha) diag(G)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean alpha {alpha} is outside [0, 1]")
    reduced = gram * alpha
    reduced.diagonal().copy_(gram.diagonal())
    return reduced


def regmean_combine(weighted: torch.Tensor, weights: torch.Tensor, grams: Sequence[torch.Tensor], *,
                    alpha: float = DEFAULT_ALPHA, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The RegMean task vector from a stack ``weighted[i] = w_i * tau_i`` ``(n, out, in)``, the weights
    ``(n,)`` and one input Gram ``(in, in)`` per fine-tune (see the module doc)."""
    n, _, width = weighted.shape
    if len(grams) != n:
        raise ConfigError(f"{len(grams)} input Grams for {n} fine-tuned tensors")
    if any(g is None or tuple(g.shape) != (width, width) for g in grams):
        raise ConfigError(f"regmean needs one ({width}, {width}) input Gram per fine-tune")
    w = weights.to(torch.float64)
    if bool((w <= 0).any()):
        raise ConfigError(f"regmean weights each fine-tune's Gram by its weight; they must be positive, "
                          f"got {weights.tolist()}")
    total = torch.zeros(width, width, dtype=torch.float64, device=weighted.device)
    target = torch.zeros(weighted.shape[1:], dtype=torch.float64, device=weighted.device)
    for i, gram in enumerate(grams):
        reduced = reduce_off_diagonal(gram.to(device=weighted.device, dtype=torch.float64), alpha)
        total.add_(reduced, alpha=float(w[i]))
        target.addmm_(weighted[i].to(torch.float64), reduced)  # (w_i tau_i) G_i
    if ridge < 0:
        raise ConfigError(f"regmean ridge {ridge} is negative")
    eps = ridge * float(total.diagonal().mean())
    if eps > 0:
        target.add_(weighted.to(torch.float64).sum(0), alpha=eps / float(w.sum()))
        total.diagonal().add_(eps)
    # X total = target, total symmetric: X = (total^-1 target^T)^T
    return torch.linalg.solve(total, target.T).T.to(weighted.dtype)


__all__ = ["DEFAULT_ALPHA", "DEFAULT_RIDGE", "reduce_off_diagonal", "regmean_combine"]
