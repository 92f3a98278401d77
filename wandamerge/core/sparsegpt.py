"""SparseGPT's OBS solver (Frantar & Alistarh, 2023) as a pure tensor function.

Columns are pruned left to right in blocks; the error of each pruned weight is
spread onto the not-yet-visited columns through the Cholesky factor of the
inverse Hessian, and blocks are updated lazily in one matmul. The same sweep
with a fixed mask is the least-squares weight update used with Wanda or
magnitude masks.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .selection import keep_n_of_m, keep_per_tensor


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, and the mask of dead inputs.

    ``damp`` is ``percdamp`` times the mean of the diagonal; inputs that never
    fire (zero diagonal) get a unit diagonal so the factor exists.
    """
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    factor = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.0,
                    n: int = 0, m: int = 0, keep: torch.Tensor | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) given ``hessian = X^T X`` (in, in).

    Exactly one of: ``sparsity`` (unstructured, adaptive mask per column block),
    ``n``/``m`` (N:M), or a fixed ``keep`` mask (True = keep; only the weight update).
    Masks are chosen by :mod:`.selection` (lowest saliency ``w^2 / [H^-1]_jj^2`` dropped).
    Returns the updated weight (in ``weight``'s dtype) and its keep-mask.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ConfigError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if n and cols % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    if n and blocksize % m:
        raise ConfigError(f"SparseGPT with N:M {n}:{m} needs a blocksize divisible by {m}, got {blocksize}")
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    hinv, dead = inverse_hessian_factor(hessian.to(w.device), percdamp)
    w[:, dead] = 0
    pruned = torch.zeros_like(w, dtype=torch.bool)

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_block = w[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = torch.diag(hinv_block)
        err_block = torch.zeros_like(w_block)
        if keep is not None:
            mask_block = ~keep[:, start:end].to(w.device)
        elif not n:
            saliency = w_block ** 2 / diag.unsqueeze(0) ** 2
            mask_block = ~keep_per_tensor(saliency, saliency.numel() - int(saliency.numel() * sparsity))
        else:
            mask_block = torch.zeros_like(w_block, dtype=torch.bool)

        for i in range(end - start):
            if n and i % m == 0:
                saliency = w_block[:, i:i + m] ** 2 / diag[i:i + m].unsqueeze(0) ** 2
                mask_block[:, i:i + m] = ~keep_n_of_m(saliency, n, m)
            column = w_block[:, i]
            kept = torch.where(mask_block[:, i], torch.zeros_like(column), column)
            err = (column - kept) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            w_block[:, i] = kept
            err_block[:, i] = err

        w[:, start:end] = w_block
        pruned[:, start:end] = mask_block
        w[:, end:] -= err_block @ hinv[start:end, end:]

    w[pruned] = 0
    return w.to(weight.dtype), ~pruned

