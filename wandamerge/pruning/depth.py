"""Structured depth pruning: whole decoder blocks go, so the model gets shallower, smaller and faster at every
batch size, and its config stays standard (fewer ``num_hidden_layers``).

Which blocks go is decided by a registered score (:data:`DEPTH_SCORES`), one number per block on the
calibration windows, the lowest going first: ``bi``, ShortGPT's Block Influence
(:func:`wandamerge.core.depth.block_influence`, from one pass block by block through the dense model,
:func:`wandamerge.runner.multistream_pass`), removes the blocks that turn the residual stream least; ``ppl``,
Shortened LLaMA's criterion, the blocks whose skipping raises the windows' perplexity least (one whole-model
forward per block). The kept blocks are rebuilt at their new positions from the rewritten config (so
that a block's KV-cache slot and its per-layer settings, such as ``layer_types``, follow it) and filled with
their own tensors. The blocks removed and every block's score are in the report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.depth import block_influence, blocks_to_remove, cosine_sum, removed_blocks
from ..errors import ModelError, lookup
from ..models import decoder_blocks, replace_blocks
from ..runner import multistream_pass
from .width import check_in_memory, size

log = logging.getLogger(__name__)

SKIP_BATCH = 8  # windows per forward of the ppl score when no batch size is given
# config entries that hold one value per decoder block: sliced with the blocks
PER_BLOCK_LISTS = ("layer_types", "no_rope_layers")
# config entries that single out blocks by their index: a model that sets them is refused
INDEXED_SETTINGS = {"mlp_only_layers": lambda v: bool(v), "first_k_dense_replace": lambda v: bool(v),
                    "decoder_sparse_step": lambda v: v not in (None, 1), "moe_layer_freq": lambda v: v not in (None, 1)}


# ----------------------------------------------------------------------------- scores, registered by name


@dataclass
class BlockStats:
    """What the calibration pass measured of one block: the summed cosine between the hidden state each token
    brings into the block and the one it leaves with, over ``tokens`` tokens."""

    cosines: float = 0.0
    tokens: int = 0


@dataclass(frozen=True)
class DepthScore:
    name: str
    # (model, windows, device, batch size, progress) -> one score per block (the lowest go first)
    fn: Callable[[nn.Module, torch.Tensor, "str | torch.device", "int | None", bool], list[float]]
    doc: str


DEPTH_SCORES: dict[str, DepthScore] = {}


def register_depth_score(name: str):
    def decorate(fn):
        DEPTH_SCORES[name] = DepthScore(name, fn, (fn.__doc__ or "").strip())
        return fn
    return decorate


def get_depth_score(name: str) -> DepthScore:
    return lookup(DEPTH_SCORES, "depth score", name)


@register_depth_score("bi")
def bi(model: nn.Module, windows: torch.Tensor, device, batch_size: int | None, progress: bool) -> list[float]:
    """ShortGPT's Block Influence: 1 - the mean cosine between a block's input and output hidden states, every
    block run dense, in one pass."""
    stats = depth_statistics(model, windows, device=device, batch_size=batch_size, progress=progress)
    return [block_influence(s.cosines, s.tokens) for s in stats]


@register_depth_score("ppl")
def ppl(model: nn.Module, windows: torch.Tensor, device, batch_size: int | None, progress: bool) -> list[float]:
    """Shortened LLaMA's PPL criterion: the perplexity of the windows with the block skipped (its output replaced
    by its input), one whole-model forward per block; the blocks whose absence costs least go."""
    return skipped_perplexities(model, windows, device=device, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------- what goes, before any calibration


@dataclass(frozen=True)
class DepthSetup:
    """What depth pruning does to a model, decided from its config and shapes alone."""

    blocks: int
    remove: int
    per_block_lists: tuple[str, ...]  # the config's per-block entries, sliced with the blocks


def _signature(block: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape), p.dtype) for name, p in block.named_parameters())


def _per_block_lists(config, blocks: int) -> tuple[str, ...]:
    """The config's per-block entries (refused when their length is not the number of blocks), after refusing a
    config that singles blocks out by index."""
    for key, sets in INDEXED_SETTINGS.items():
        if sets(getattr(config, key, None)):
            raise ModelError(f"{config.model_type}'s config sets {key} (blocks singled out by their index), "
                             f"which removing blocks would shift: depth pruning does not cut this model")
    found = []
    for key in PER_BLOCK_LISTS:
        value = getattr(config, key, None)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != blocks:
            raise ModelError(f"the config's {key} has {len(value) if isinstance(value, (list, tuple)) else 'no'} "
                             f"entries for {blocks} decoder blocks")
        found.append(key)
    return tuple(found)


def depth_setup(model: nn.Module, sparsity: float) -> DepthSetup:
    """How many blocks of ``model`` go to remove ``sparsity`` of the decoder blocks' parameters; every refusal is
    one line (a job calls this before it loads any calibration data)."""
    blocks = decoder_blocks(model)
    check_in_memory(model)
    first = _signature(blocks[0])
    for index, block in enumerate(blocks):
        if _signature(block) != first:
            raise ModelError(f"depth pruning needs decoder blocks that all have the same tensors; block {index} "
                             f"differs from block 0")
    if getattr(model.config, "num_hidden_layers", len(blocks)) != len(blocks):
        raise ModelError(f"the config says {model.config.num_hidden_layers} decoder blocks, the model has "
                         f"{len(blocks)}")
    return DepthSetup(len(blocks), blocks_to_remove(len(blocks), sparsity),
                      _per_block_lists(model.config, len(blocks)))


# ----------------------------------------------------------------------------- the calibration pass and the cut


def depth_statistics(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu",
                     batch_size: int | None = None, progress: bool = True) -> list[BlockStats]:
    """Each block's :class:`BlockStats` over the calibration ``windows``, every block run as it is."""
    found = [BlockStats() for _ in decoder_blocks(model)]

    def observe(index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        found[index].cosines += cosine_sum(before, after)
        found[index].tokens += before.numel() // before.shape[-1]

    multistream_pass(model, [windows], lambda index, block, inputs: None, device=device, batch_size=batch_size,
                     progress=progress, desc="block scores", loader=None, observe=observe)
    for index, stats in enumerate(found):
        if not math.isfinite(stats.cosines):
            raise ModelError(f"decoder block {index} gives non-finite hidden states on the calibration windows; "
                             f"its score cannot be measured")
    return found


def _skip(module: nn.Module, args: tuple, kwargs: dict, output):
    """A forward hook that makes a block return the hidden states it was given (in its own output format)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def skipped_perplexities(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu",
                         batch_size: int | None = None, progress: bool = True) -> list[float]:
    """For each block, the perplexity of ``model`` on ``windows`` (next-token loss over every window, the whole
    model on ``device``) with that block skipped."""
    blocks, home = decoder_blocks(model), next(model.parameters()).device
    batches = windows.split(batch_size or SKIP_BATCH)
    found = []
    model.to(device)
    try:
        with torch.inference_mode():
            for index, block in enumerate(tqdm(blocks, desc="block scores (ppl)", disable=not progress)):
                handle = block.register_forward_hook(_skip, with_kwargs=True)
                try:
                    loss = sum(float(model(input_ids=b.to(device), labels=b.to(device), use_cache=False).loss)
                               * b.shape[0] for b in batches) / windows.shape[0]
                finally:
                    handle.remove()
                if not math.isfinite(loss):
                    raise ModelError(f"the model gives a non-finite loss with decoder block {index} skipped")
                found.append(math.exp(loss))
    finally:
        model.to(home)
    return found


def drop_blocks(model: nn.Module, removed: list[int], setup: DepthSetup) -> None:
    """Remove the ``removed`` blocks of ``model`` in place: the config's block count and per-block entries are
    rewritten, and every kept block rebuilt at its new position and filled with its own tensors
    (:func:`wandamerge.models.replace_blocks`)."""
    config, blocks = model.config, decoder_blocks(model)
    kept = [index for index in range(len(blocks)) if index not in set(removed)]
    values = {"num_hidden_layers": len(kept),
              **{key: [getattr(config, key)[index] for index in kept] for key in setup.per_block_lists}}
    replace_blocks(model, values, ((blocks[old], blocks[old].state_dict()) for old in kept))


# ----------------------------------------------------------------------------- the whole step


@dataclass
class DepthPruneReport:
    """What depth pruning removed: the blocks, every block's score, and the sizes before and after."""

    score: str
    sparsity: float  # asked: the share of the decoder blocks' parameters removed
    achieved: float  # reached: whole blocks
    blocks: dict  # {"before", "after"}
    removed: list[int]
    scores: list[float]  # every block's score, in the original order
    nsamples: int
    seqlen: int
    parameters: dict = field(default_factory=dict)  # {"before", "after", "blocks_before", "blocks_after"}
    bytes: dict = field(default_factory=dict)  # {"before", "after"}
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def prune_depth(model: nn.Module, windows: torch.Tensor, *, sparsity: float, score: str = "bi",
                device: str | torch.device = "cpu", batch_size: int | None = None,
                progress: bool = True) -> DepthPruneReport:
    """Remove ``sparsity`` of the decoder blocks' parameters of ``model`` (in place) as whole blocks, the lowest
    by ``score`` (:data:`DEPTH_SCORES`) on the calibration ``windows`` ``(nsamples, seqlen)``. Refusals come
    before calibration."""
    scorer = get_depth_score(score)
    setup = depth_setup(model, sparsity)
    blocks = decoder_blocks(model)
    model_before, blocks_before = size(model), size(blocks)[0]
    notes = [f"sparsity {sparsity} rounds to no whole block of {setup.blocks}: nothing removed"] \
        if sparsity > 0 and setup.remove == 0 else []
    t0 = time.perf_counter()
    scores = [float(x) for x in scorer.fn(model, windows, device, batch_size, progress)]
    t1 = time.perf_counter()
    removed = removed_blocks(torch.tensor(scores, dtype=torch.float64), setup.remove)
    drop_blocks(model, removed, setup)
    model_after, blocks_after = size(model), size(decoder_blocks(model))[0]
    for note in notes:
        log.info(note)
    log.info("depth pruning by %s: removed blocks %s, %d -> %d blocks, %d -> %d parameters", score, removed,
             setup.blocks, setup.blocks - len(removed), model_before[0], model_after[0])
    return DepthPruneReport(
        score=score, sparsity=sparsity, achieved=1 - blocks_after / blocks_before,
        blocks={"before": setup.blocks, "after": setup.blocks - len(removed)}, removed=removed, scores=scores,
        nsamples=int(windows.shape[0]), seqlen=int(windows.shape[1]),
        parameters={"before": model_before[0], "after": model_after[0], "blocks_before": blocks_before,
                    "blocks_after": blocks_after},
        bytes={"before": model_before[1], "after": model_after[1]}, notes=notes,
        seconds={"calibration": t1 - t0, "cut": time.perf_counter() - t1})
