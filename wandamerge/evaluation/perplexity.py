"""Perplexity as the Wanda paper measures it: exp of the mean next-token NLL
over non-overlapping windows of the evaluation text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               device: str | torch.device | None = None, progress: bool = True) -> float:
    """``exp(sum of next-token NLL / number of predicted tokens)`` over ``windows`` (n, seqlen)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("evaluation windows must be shaped (nwindows, seqlen) with seqlen >= 2")
    from ..offload import is_dispatched

    placed = is_dispatched(model)  # accelerate placed it (a device_map): its hooks move inputs, nothing moves
    home = next(model.parameters()).device
    device = torch.device("cpu") if placed else torch.device(device) if device else home
    if not placed:
        model.to(device)
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    if not placed:
        model.to(home)
    return math.exp(total_nll / total_tokens)
