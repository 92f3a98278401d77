"""The layer-by-layer pass shared by pruning and merging.

Catch the inputs of the first decoder block; then for each block: hook its
linear maps, run the calibration windows through it, hand each linear map and
the statistics of its inputs to a visitor (which decides masks and writes
weights), and keep the block's outputs as the next block's inputs. Only the
block being processed needs to sit on the compute device.

Where the blocks live is a loader's business (:mod:`wandamerge.loaders`:
in memory, streamed from the shards, or placed by accelerate).

Two orders inside a block:

* ``"sequential"`` (default, one forward per block): each linear map is
  visited from a hook the moment its input is seen, so it is pruned before the
  rest of the block runs, and later maps in the block see the outputs of the
  already-pruned earlier ones. Needs all windows in one batch.
* ``"parallel"`` (two forwards per block, as the official Wanda and SparseGPT
  code): statistics for every map come from the unpruned block, possibly over
  several batches; the block is then pruned and run again for its outputs.
* ``"auto"`` (the default of pruning): sequential when one forward over all windows
  needs no more activation memory than the block's inputs already hold, otherwise
  parallel with the largest batch that does (:func:`~wandamerge.core.pass_plan.plan_pass`).
  A given ``batch_size`` decides it: sequential when it covers all windows.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.pass_plan import PassPlan, plan_pass
from .errors import ConfigError, ModelError
from .loaders import BlockLoader, default_loader, release_freed_memory
from .models import ExpertMap, FusedExperts, LinearMap, block_experts, block_linears, decoder_blocks

log = logging.getLogger(__name__)

NORMS = "norms"  # per-input-channel sum of x_j ** 2 (Wanda)
GRAM = "gram"  # X^T X summed over tokens (SparseGPT, weight update)
ABS = "abs"  # per-input-channel sum of |x_j| (AIM)
MOMENTS = "moments"  # per-input-channel mean of x_j and sum of squared deviations from it (FLAP's fluctuation)

WITHIN_BLOCK_ORDERS = ("auto", "sequential", "parallel")
_TOKEN_CHUNK = 8192  # statistics are accumulated over at most this many tokens at a time


@dataclass
class InputStats:
    """Statistics of the inputs a linear map saw over the calibration windows."""

    tokens: int = 0
    sq_norms: torch.Tensor | None = None  # (in,) sum over tokens of x_j ** 2
    gram: torch.Tensor | None = None  # (in, in) sum over tokens of x x^T
    abs_sums: torch.Tensor | None = None  # (in,) sum over tokens of |x_j|
    means: torch.Tensor | None = None  # (in,) float64, mean over tokens of x_j
    m2: torch.Tensor | None = None  # (in,) float64, sum over tokens of (x_j - mean_j) ** 2

    def add(self, other: "InputStats") -> None:
        if other.means is not None:
            self.means, self.m2 = pooled_moments(self.tokens, self.means, self.m2, other.tokens, other.means, other.m2)
        self.tokens += other.tokens
        if other.sq_norms is not None:
            self.sq_norms = other.sq_norms if self.sq_norms is None else self.sq_norms + other.sq_norms
        if other.gram is not None:
            self.gram = other.gram if self.gram is None else self.gram + other.gram
        if other.abs_sums is not None:
            self.abs_sums = other.abs_sums if self.abs_sums is None else self.abs_sums + other.abs_sums

    def reordered(self, order: torch.Tensor) -> "InputStats":
        """The statistics of the same inputs with their channels reordered: channel ``k`` is the old ``order[k]``."""
        pick = (lambda t: None if t is None else t[order.to(t.device)])
        gram = None if self.gram is None else self.gram[order.to(self.gram.device)][:, order.to(self.gram.device)]
        return InputStats(self.tokens, pick(self.sq_norms), gram, pick(self.abs_sums), pick(self.means), pick(self.m2))


def pooled_moments(n_a: int, mean_a: torch.Tensor | None, m2_a: torch.Tensor | None, n_b: int, mean_b: torch.Tensor,
                   m2_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum of squared deviations) of two sets of ``n_a`` and ``n_b`` tokens pooled (Chan et al.'s update:
    no sum of squares minus a squared sum, which cancels in floating point)."""
    if mean_a is None or n_a == 0:
        return mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta ** 2 * (n_a * n_b / n)


def input_stats(x: torch.Tensor, needs: Iterable[str]) -> InputStats:
    """Statistics of one batch of inputs ``x`` (..., in), accumulated in float32 (the moments in float64)."""
    needs = set(needs)
    flat = x.detach().reshape(-1, x.shape[-1])
    stats = InputStats(tokens=flat.shape[0])
    width = flat.shape[1]
    if NORMS in needs:
        stats.sq_norms = torch.zeros(width, dtype=torch.float32, device=x.device)
    if GRAM in needs:
        stats.gram = torch.zeros(width, width, dtype=torch.float32, device=x.device)
    if ABS in needs:
        stats.abs_sums = torch.zeros(width, dtype=torch.float32, device=x.device)
    for start in range(0, flat.shape[0], _TOKEN_CHUNK):
        chunk = flat[start:start + _TOKEN_CHUNK].float()
        if stats.sq_norms is not None:
            stats.sq_norms += torch.linalg.vector_norm(chunk, dim=0) ** 2
        if stats.abs_sums is not None:
            stats.abs_sums += chunk.abs().sum(0)
        if stats.gram is not None:
            stats.gram.addmm_(chunk.T, chunk)
        if MOMENTS in needs:
            mean = chunk.mean(0)
            m2 = ((chunk - mean) ** 2).sum(0)
            stats.means, stats.m2 = pooled_moments(start, stats.means, stats.m2, chunk.shape[0], mean.double(),
                                                   m2.double())
    return stats


# A visitor gets (block index, linear map or an expert's map, statistics of its inputs or None). It may reorder
# the map's input channels (and the rows of the maps making them, :mod:`wandamerge.pruning.permutation`); it
# then returns the new order (input k is the old input order[k]), and the sequential order feeds the map the
# input it already caught in that order. Otherwise it returns None.
Visitor = Callable[[int, "LinearMap | ExpertMap", "InputStats | None"], "torch.Tensor | None"]


# ----------------------------------------------------------------------------- the inputs of fused experts


def routed_to(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Which tokens (rows of ``top_k_index``, (tokens, k)) the router sent to ``expert``."""
    return (top_k_index == expert).any(-1)


def experts_call(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states as (tokens, hidden), top-k expert indices as (tokens, k), their routing weights) of a call
    of an experts module, ``experts(hidden_states, top_k_index, top_k_weights)``, however passed (gpt-oss
    names the last two ``router_indices`` and ``routing_weights``)."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    hidden, index, weights = list(bound.arguments.values())[:3]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1)


def expert_inputs(experts: FusedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor, all_experts: bool):
    """Each expert's maps with their inputs, in the order they run: the up map on the tokens routed to the
    expert (every token with ``all_experts``), then the down map on the up map's gated output. A generator:
    the down map's inputs are computed after the caller is done with the up map (in the sequential order it
    is already pruned, as the expert's own forward would see it)."""
    for expert in range(experts.num_experts):
        x = hidden if all_experts else hidden[routed_to(top_k_index, expert)]
        up, down = experts.maps(expert)
        yield up, x
        yield down, experts.down_inputs(expert, x)


def _warn_unrouted(index: int, unseen: list[str]) -> None:
    if unseen:
        log.warning("block %d: %d expert maps saw no calibration tokens (%s%s); their statistics are zero: "
                    "more calibration windows or --calibrate-all-experts", index, len(unseen),
                    ", ".join(unseen[:4]), ", ..." if len(unseen) > 4 else "")


@dataclass
class BlockInputs:
    """What the first block was called with, for one batch of windows."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


class _Caught(Exception):
    pass


@dataclass
class PassTimings:
    catch_s: float = 0.0
    forward_s: float = 0.0
    visit_s: float = 0.0
    within_block: str = ""
    batch_size: int = 0  # windows per forward (0: no calibration pass)
    per_block_s: list[float] = field(default_factory=list)

    def seconds(self, started: float) -> dict[str, float]:
        """The stages' seconds, with the total since ``started`` (a ``time.perf_counter()``)."""
        return {"catch": self.catch_s, "forward": self.forward_s, "decision": self.visit_s,
                "total": time.perf_counter() - started}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def catch_first_block_inputs(model: nn.Module, windows: torch.Tensor, loader: BlockLoader,
                             batch_size: int) -> list[BlockInputs]:
    """Run the model up to its first decoder block, once per batch of windows."""
    blocks = decoder_blocks(model)
    caught: list[BlockInputs] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append(BlockInputs(hidden, tuple(args[1:]), dict(kwargs)))
        raise _Caught

    with loader.outside(model, blocks) as device:
        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _Caught:
                    pass
        finally:
            handle.remove()
    return caught


def default_pass_plan(block: nn.Module, shape: tuple[int, int], batch_size: int | None = None) -> PassPlan:
    """The ``"auto"`` order for windows of ``shape`` (nsamples, seqlen), sized by the first block's maps (their
    weights may still be on the meta device): per token, every map's output plus the widest one again (a gated
    MLP's product); a fused MoE layer counts one expert's maps."""
    nsamples, seqlen = int(shape[0]), int(shape[1])
    if batch_size:
        return PassPlan("sequential" if batch_size >= nsamples else "parallel", min(batch_size, nsamples))
    maps = block_linears(block) + [m for experts in block_experts(block) for m in experts.maps(0)]
    if not maps:
        return PassPlan("sequential", nsamples)
    widths = [m.weight.shape[0] for m in maps]
    element_bytes = maps[0].weight.element_size()
    return plan_pass(nsamples, seqlen, maps[0].in_features, sum(widths) + max(widths), element_bytes)


def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """The hidden states ``block`` gives for one batch of its inputs (a step that measures a block runs it so)."""
    out = block(inputs.hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def blockwise_pass(model: nn.Module, windows: torch.Tensor | None, visit: Visitor, *,
                   needs: Iterable[str] = (NORMS,), device: str | torch.device = "cpu",
                   batch_size: int | None = None, within_block: str = "auto",
                   progress: bool = True, desc: str = "blocks",
                   loader: BlockLoader | None = None, all_experts: bool = False) -> PassTimings:
    """Visit every linear map of every decoder block, in order, with its input statistics.

    ``needs`` names the statistics the visitor wants (``NORMS``, ``GRAM``, ``ABS``); with
    no needs (magnitude pruning, data-free merging) no calibration is run.
    ``loader`` brings each block in before its turn and takes it away after
    (default: :func:`default_loader`). The fused experts of an MoE block are visited
    expert by expert (:class:`~wandamerge.models.ExpertMap`), each with the statistics of
    the tokens the model's own router sent to it; with ``all_experts`` every token
    counts for every expert (the block's outputs still follow the real routing).
    """
    loader = loader or default_loader(model, device)
    needs = set(needs)
    blocks = decoder_blocks(model)
    if within_block not in WITHIN_BLOCK_ORDERS:
        raise ConfigError(f"within_block must be one of {WITHIN_BLOCK_ORDERS}, got {within_block!r}")
    progress_blocks = tqdm(blocks, desc=desc, disable=not progress)
    if not needs:
        return _visit_without_data(progress_blocks, visit, loader)
    if windows is None or windows.ndim != 2 or windows.shape[0] == 0:
        raise ConfigError("calibration windows must be a non-empty (nsamples, seqlen) tensor")
    if within_block == "auto":
        plan = default_pass_plan(blocks[0], windows.shape, batch_size)
        within_block, batch_size = plan.order, plan.batch_size
        log.info("calibration pass: %s order, %d windows per forward", within_block, batch_size)
    batch_size = batch_size or windows.shape[0]
    if within_block == "sequential" and batch_size < windows.shape[0]:
        log.warning("within-block order 'sequential' needs all %d windows in one batch; "
                    "batch size %d given, using 'parallel'", windows.shape[0], batch_size)
        within_block = "parallel"
    timings = PassTimings(within_block=within_block, batch_size=min(batch_size, windows.shape[0]))
    device = loader.device
    one_block = _sequential_block if within_block == "sequential" else _parallel_block

    with torch.inference_mode():
        t0 = time.perf_counter()
        inputs = catch_first_block_inputs(model, windows, loader, batch_size)
        _sync(device)
        timings.catch_s = time.perf_counter() - t0
        for index, block in enumerate(progress_blocks):
            t_block = time.perf_counter()
            loader.load(index, block)
            maps = BlockMaps(block_linears(block), block_experts(block), all_experts)
            outputs = one_block(index, block, maps, inputs, visit, needs, timings, device)
            loader.unload(index, block)
            for batch, out in zip(inputs, outputs):
                batch.hidden = out
            release_freed_memory()
            _sync(device)
            timings.per_block_s.append(time.perf_counter() - t_block)
    return timings


def _visit_without_data(blocks, visit: Visitor, loader: BlockLoader) -> PassTimings:
    """Every linear map visited with no statistics: no calibration pass at all."""
    timings = PassTimings()
    for index, block in enumerate(blocks):
        t0 = time.perf_counter()
        loader.load(index, block)
        for linear in block_linears(block):
            visit(index, linear, None)
        for experts in block_experts(block):
            for expert_map in experts.all_maps():
                visit(index, expert_map, None)
        loader.unload(index, block)
        timings.visit_s += time.perf_counter() - t0
        timings.per_block_s.append(time.perf_counter() - t0)
    return timings


def _unseen_stats(linear, needs: set[str], warn: bool = True) -> InputStats:
    """Statistics of a map that saw no calibration token (a map its block never called)."""
    width = linear.in_features
    device = linear.weight.device
    if warn:
        log.warning("%s saw no calibration tokens; its statistics are zero", linear.name)
    moments = MOMENTS in needs
    return InputStats(0, torch.zeros(width, device=device) if NORMS in needs else None,
                      torch.zeros(width, width, device=device) if GRAM in needs else None,
                      torch.zeros(width, device=device) if ABS in needs else None,
                      torch.zeros(width, dtype=torch.float64, device=device) if moments else None,
                      torch.zeros(width, dtype=torch.float64, device=device) if moments else None)


def check_finite(index: int, linear: LinearMap, stats: InputStats) -> None:
    """Refuse activations holding NaN or Inf (or whose squares overflow): no score can be made from them."""
    for value in (stats.sq_norms, stats.gram, stats.abs_sums, stats.means, stats.m2):
        if value is not None and not torch.isfinite(value).all():
            low = linear.weight.dtype in (torch.float16, torch.bfloat16)
            hint = "compute in float32 (--dtype float32)" if low else f"check the weights of blocks 0 to {index}"
            raise ModelError(f"the activations entering block {index} {linear.name} are not finite (NaN or Inf) on "
                             f"the calibration windows: the model overflows there; {hint}")


@dataclass
class BlockMaps:
    """What a block's pass visits: its linear maps (hooked) and its fused experts (expert by expert)."""

    linears: list[LinearMap]
    experts: list[FusedExperts] = field(default_factory=list)
    all_experts: bool = False  # every token's statistics for every expert, not only the routed ones

    def expert_maps(self) -> list[ExpertMap]:
        return [m for experts in self.experts for m in experts.all_maps()]


def _timed_visit(visit: Visitor, index: int, linear, stats: InputStats, timings: PassTimings,
                 device) -> torch.Tensor | None:
    check_finite(index, linear, stats)
    _sync(device)
    t0 = time.perf_counter()
    order = visit(index, linear, stats)
    _sync(device)
    timings.visit_s += time.perf_counter() - t0
    return order


def _sequential_block(index, block, maps: BlockMaps, inputs, visit, needs, timings, device):
    """One forward: each map is visited (and pruned) as its input arrives; an expert's maps when the experts
    module is called, expert by expert, each down map after its (pruned) up map."""
    last = {"x": None, "stats": None}
    seen: set[str] = set()

    def make_hook(linear: LinearMap):
        def hook(module, args):
            if linear.name in seen:  # a map called twice in one forward is decided once
                return
            seen.add(linear.name)
            x = args[0]
            if last["x"] is not x:  # maps fed by the same tensor (q, k, v) share statistics
                last["x"], last["stats"] = x, input_stats(x, needs)
            order = _timed_visit(visit, index, linear, last["stats"], timings, device)
            if order is not None:  # the map's inputs were reordered: this input too (made before, in the old order)
                return (x.index_select(-1, order.to(x.device)), *args[1:])
        return hook

    def make_experts_hook(experts: FusedExperts):
        def hook(module, args, kwargs):
            if experts.name in seen:
                return
            seen.add(experts.name)
            hidden, top_k_index, _ = experts_call(module, args, kwargs)
            unseen = []
            for expert_map, x in expert_inputs(experts, hidden, top_k_index, maps.all_experts):
                stats = input_stats(x, needs)
                if not stats.tokens:
                    unseen.append(expert_map.name)
                _timed_visit(visit, index, expert_map, stats, timings, device)
            _warn_unrouted(index, unseen)
        return hook

    handles = [lin.module.register_forward_pre_hook(make_hook(lin)) for lin in maps.linears]
    handles += [e.module.register_forward_pre_hook(make_experts_hook(e), with_kwargs=True) for e in maps.experts]
    try:
        t0 = time.perf_counter()
        outputs = [run_block(block, batch) for batch in inputs]
        _sync(device)
        timings.forward_s += time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    for linear in maps.linears:
        if linear.name not in seen:
            visit(index, linear, _unseen_stats(linear, needs))
    for experts in maps.experts:
        if experts.name not in seen:  # a block that never called its experts
            for expert_map in experts.all_maps():
                visit(index, expert_map, _unseen_stats(expert_map, needs))
    return outputs


def block_input_stats(block: nn.Module, linears: list[LinearMap], inputs: list[BlockInputs],
                      needs: set[str], experts: list[FusedExperts] = (),
                      all_experts: bool = False) -> dict[str, InputStats]:
    """The statistics of every linear map's inputs while ``inputs`` run through ``block`` (unchanged), and of
    every expert's maps of ``experts`` (the tokens routed to each; every token with ``all_experts``)."""
    totals = {lin.name: InputStats() for lin in linears}
    expert_maps = [m for fused in experts for m in fused.all_maps()]
    totals.update({m.name: InputStats() for m in expert_maps})
    last = {"x": None, "stats": None}

    def make_hook(linear: LinearMap):
        def hook(module, args):
            x = args[0]
            if last["x"] is not x:  # maps fed by the same tensor (q, k, v) share statistics
                last["x"], last["stats"] = x, input_stats(x, needs)
            totals[linear.name].add(last["stats"])
        return hook

    def make_experts_hook(fused: FusedExperts):
        def hook(module, args, kwargs):
            hidden, top_k_index, _ = experts_call(module, args, kwargs)
            for expert_map, x in expert_inputs(fused, hidden, top_k_index, all_experts):
                totals[expert_map.name].add(input_stats(x, needs))
        return hook

    handles = [lin.module.register_forward_pre_hook(make_hook(lin)) for lin in linears]
    handles += [e.module.register_forward_pre_hook(make_experts_hook(e), with_kwargs=True) for e in experts]
    try:
        for batch in inputs:
            run_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    for linear in linears:
        if not totals[linear.name].tokens:
            totals[linear.name] = _unseen_stats(linear, needs)
    for expert_map in expert_maps:
        if totals[expert_map.name].sq_norms is None and totals[expert_map.name].gram is None:
            totals[expert_map.name] = _unseen_stats(expert_map, needs, warn=False)
    return totals


def _parallel_block(index, block, maps: BlockMaps, inputs, visit, needs, timings, device):
    """Two forwards: statistics from the unpruned block, then outputs of the pruned one."""
    t0 = time.perf_counter()
    totals = block_input_stats(block, maps.linears, inputs, needs, maps.experts, maps.all_experts)
    _sync(device)
    t1 = time.perf_counter()
    expert_maps = maps.expert_maps()
    _warn_unrouted(index, [m.name for m in expert_maps if not totals[m.name].tokens])
    for linear in maps.linears + expert_maps:
        check_finite(index, linear, totals[linear.name])
        visit(index, linear, totals[linear.name])
    _sync(device)
    t2 = time.perf_counter()
    outputs = [run_block(block, batch) for batch in inputs]
    _sync(device)
    timings.forward_s += (t1 - t0) + (time.perf_counter() - t2)
    timings.visit_s += t2 - t1
    return outputs


# A per-block step of a pass of several streams: (block index, block, every stream's inputs to the block).
StreamsStep = Callable[[int, nn.Module, "list[list[BlockInputs]]"], None]


def multistream_pass(model: nn.Module, streams: list[torch.Tensor], step: StreamsStep, *,
                     device: str | torch.device = "cpu", batch_size: int | None = None, progress: bool = True,
                     desc: str = "blocks", loader: BlockLoader | None = None,
                     observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Several calibration streams (one per task) through the blocks together: at each block, ``step`` sees
    the block and every stream's inputs to it and may change the block's weights; then every stream runs
    through the block as ``step`` left it, for the next block (RegMean++: inputs through the merged blocks).
    ``observe(index, hidden_in, hidden_out)`` sees each batch's hidden states on both sides of each block."""
    loader = loader or default_loader(model, device)
    blocks = decoder_blocks(model)
    for windows in streams:
        if windows is None or windows.ndim != 2 or windows.shape[0] == 0:
            raise ConfigError("calibration windows must be a non-empty (nsamples, seqlen) tensor")
    with torch.inference_mode():
        inputs = [catch_first_block_inputs(model, w, loader, batch_size or w.shape[0]) for w in streams]
        for index, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
            loader.load(index, block)
            step(index, block, inputs)
            for stream in inputs:
                for batch in stream:
                    hidden = run_block(block, batch)
                    if observe is not None:
                        observe(index, batch.hidden, hidden)
                    batch.hidden = hidden
            loader.unload(index, block)
            release_freed_memory()
