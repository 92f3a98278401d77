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
_AT_ONCE = 512  # rows or columns converted to float64 at a time


def reduce_off_diagonal(gram: torch.Tensor, alpha: float, columns: slice = slice(None),
                        dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``alpha * gram`` with the diagonal kept whole: ``alpha G + (1 - alpha) diag(G)``; of the ``columns``
    given only (a new ``(in, k)`` tensor, in ``dtype`` on ``device``, default the Gram's)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean alpha {alpha} is outside [0, 1]")
    reduced = gram[:, columns].to(device=device or gram.device, dtype=dtype or gram.dtype) * alpha
    reduced[columns].diagonal().copy_(gram[columns, columns].diagonal())
    return reduced


def regmean_combine(weighted: torch.Tensor, weights: torch.Tensor, grams: Sequence[torch.Tensor], *,
                    alpha: float = DEFAULT_ALPHA, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The RegMean task vector from a stack ``weighted[i] = w_i * tau_i`` ``(n, out, in)``, the weights
    ``(n,)`` and one input Gram ``(in, in)`` per fine-tune (see the module doc)."""
    n, _, width = weighted.shape
    if len(grams) != n:
        raise ConfigError(f"{len(grams)} input Grams for {n} fine-tuned tensors")
    square = torch.Size([width, width])  # indexed, not iterated: a sequence that loads each Gram holds one
    if any(getattr(grams[i], "shape", None) != square for i in range(n)):
        raise ConfigError(f"regmean needs one ({width}, {width}) input Gram per fine-tune")
    w = weights.to(torch.float64)
    if bool((w <= 0).any()):
        raise ConfigError(f"regmean weights each fine-tune's Gram by its weight; they must be positive, "
                          f"got {weights.tolist()}")
    if ridge < 0:
        raise ConfigError(f"regmean ridge {ridge} is negative")
    total = torch.zeros(width, width, dtype=torch.float64, device=weighted.device)
    target = torch.zeros(weighted.shape[1:], dtype=torch.float64, device=weighted.device)
    for i in range(n):
        gram = grams[i]  # one Gram at a time: a sequence may load each one only when indexed
        for columns in _blocks(width):  # a block of the Gram's columns in float64 at a time
            reduced = reduce_off_diagonal(gram, alpha, columns, torch.float64, weighted.device)
            total[:, columns].add_(reduced, alpha=float(w[i]))
            for rows in _blocks(target.shape[0]):  # (w_i tau_i) G_i, a block of tau_i's rows in float64 at a time
                target[rows, columns].addmm_(weighted[i, rows].to(torch.float64), reduced)
        del gram
    eps = ridge * float(total.diagonal().mean())
    if eps > 0:
        for task_vector in weighted:
            for rows in _blocks(target.shape[0]):
                target[rows].add_(task_vector[rows].to(torch.float64), alpha=eps / float(w.sum()))
        total.diagonal().add_(eps)
    return _solve_symmetric_in_place(total, target).to(weighted.dtype)


def _blocks(size: int, step: int = _AT_ONCE):
    return (slice(start, start + step) for start in range(0, size, step))


def _solve_symmetric_in_place(total: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X total = target`` for a symmetric positive definite float64 ``total`` (in, in) on the CPU:
    LAPACK's Cholesky factor and solve overwrite ``total`` and ``target`` (out, in), so a wide map's solve holds
    no copy of either (a 5632-wide Gram is 254 MB in float64). A ``total`` that is not positive definite in
    floating point, or on another device, gets a general solve."""
    if total.device.type == "cpu":
        import numpy as np
        from scipy.linalg import LinAlgError, cho_factor, cho_solve

        a, b = total.numpy().T, target.numpy().T  # Fortran-ordered views of the same memory
        diagonal = total.diagonal().clone()  # a failed factorisation overwrites one triangle and the diagonal
        try:
            factor = cho_factor(a, lower=False, overwrite_a=True, check_finite=False)
        except LinAlgError:
            pass
        else:
            solved = cho_solve(factor, b, overwrite_b=True, check_finite=False)  # total^-1 target^T
            return torch.from_numpy(np.ascontiguousarray(solved.T))
        total = total.triu(1) + total.triu(1).T + torch.diag(diagonal)  # rebuilt from the untouched triangle
    return torch.linalg.solve(total, target.T).T


__all__ = ["DEFAULT_ALPHA", "DEFAULT_RIDGE", "reduce_off_diagonal", "regmean_combine"]
