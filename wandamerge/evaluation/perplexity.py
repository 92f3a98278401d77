"""Perplexity as the Wanda paper measures it: exp of the mean next-token NLL
over non-overlapping windows of the evaluation text (optionally overlapping,
with a stride, where each token is still scored once)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def strided_windows(windows: torch.Tensor, stride: int) -> tuple[torch.Tensor, list[int]]:
    """Re-cut the token stream of ``windows`` (n, seqlen) into windows of the same length every ``stride``
    tokens; returns them and, per window, the first position whose prediction is scored (each token once)."""
    seqlen = windows.shape[1]
    if not 0 < stride <= seqlen:
        raise ValueError(f"stride must be in [1, seqlen={seqlen}], got {stride}")
    tokens = windows.reshape(-1)
    starts = list(range(0, tokens.numel() - seqlen + 1, stride))
    out = torch.stack([tokens[s:s + seqlen] for s in starts])
    # window k predicts tokens s+1..s+seqlen-1; tokens up to the previous window's end are already scored
    first = [0] + [seqlen - 1 - stride for _ in starts[1:]]
    return out, first


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               device: str | torch.device | None = None, stride: int | None = None,
               progress: bool = True) -> float:
    """``exp(sum of next-token NLL / number of predicted tokens)`` over ``windows`` (n, seqlen).

    With ``stride`` (< seqlen), the windows' tokens are read as one stream and re-cut into overlapping
    windows every ``stride`` tokens; each token after the first window is scored once, with up to
    ``seqlen - stride`` tokens of extra context.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("evaluation windows must be shaped (nwindows, seqlen) with seqlen >= 2")
    first = [0] * windows.shape[0]
    if stride is not None and stride < windows.shape[1]:
        windows, first = strided_windows(windows, stride)
    from ..loaders import is_dispatched

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
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none")
            for row, skip in enumerate(first[start:start + batch_size]):
                total_nll += nll[row, skip:].double().sum().item()
                total_tokens += nll.shape[1] - skip
    if not placed:
        model.to(home)
    return math.exp(total_nll / total_tokens)
