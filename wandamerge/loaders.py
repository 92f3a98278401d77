"""Block loaders: where the decoder blocks live while the layer-by-layer pass visits them.

A loader answers three questions of the pass (:mod:`wandamerge.runner`): where
the layers before the first block run while its inputs are caught
(``outside``), and what happens to a block just before (``load``) and just
after (``unload``) its turn. Three loaders, one protocol (:class:`BlockLoader`):

* :class:`ResidentBlocks`: the whole model in memory, one block moved to the
  compute device for its turn.
* :class:`DispatchedBlocks`: a model placed by accelerate (``device_map``).
  Blocks placed by accelerate (``from_pretrained(device_map=..., offload_folder=...)``).
  
  Each decoder block runs where accelerate put it: its hooks move the inputs to
  the block's execution device, so the pass places nothing itself. A block
  whose weights accelerate offloaded (to the CPU next to a GPU, or to disk) keeps
  them on the meta device between forwards and reloads them from its offload
  store at every forward, which would undo any pruning. For its turn the block's
  weights are therefore brought in once with accelerate's own hook (as
  ``accelerate.utils.align_module_device`` does) and kept there while the block
  is pruned and run; afterwards the pruned values are written back into the
  offload store (CPU dict entries replaced; disk weights written as new ``.dat``
  files in the offload folder with accelerate's ``offload_weight`` — never into
  the input checkpoint, which the disk index may point at) and the weights go
  back to meta. ``save_pretrained`` then reads the pruned values from the store.
* :class:`StreamedBlocks`, of a :class:`StreamedModel`: memory-bounded passes.
  Memory-bounded passes: one decoder block in memory at a time, read lazily from the safetensors shards.
  
  The model is built as a skeleton on the meta device (accelerate's
  ``init_empty_weights``: parameters take no memory; buffers such as rotary
  frequencies are computed as usual). The layers before the first block are
  read in while the first block's inputs are caught, and dropped again; then
  each block is read just before its turn, pruned (or measured) by the same
  runner and methods as an in-memory model, written to the output shards and
  dropped. Peak memory is about the embeddings (during the catch) or one block,
  plus the calibration activations — not the model.

Loaders never write outputs: a job that saves blocks as they are done passes
an ``after_block`` callback.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

from .errors import ModelError
from .io.dtypes import TORCH_DTYPES, torch_dtype
from .io.safetensors import Checkpoint
from .models import CheckpointNames, TensorSource, block_fused_parameters, block_prefix, decoder_blocks

log = logging.getLogger(__name__)


class BlockLoader(Protocol):
    """Where blocks come from and go to during a pass."""

    device: torch.device

    def outside(self, model: nn.Module, blocks: nn.ModuleList) -> ContextManager[torch.device]: ...

    def load(self, index: int, block: nn.Module) -> None: ...

    def unload(self, index: int, block: nn.Module) -> None: ...

    def read_only(self) -> "BlockLoader":
        """A loader of the same blocks for a pass that changes no weight: nothing handed over or written back."""


def default_loader(model: nn.Module, device: str | torch.device) -> "ResidentBlocks":
    """Blocks stay where accelerate placed them (a ``device_map``), else visit ``device`` one at a time."""
    return DispatchedBlocks(model) if is_dispatched(model) else ResidentBlocks(device)


# ----------------------------------------------------------------------------- in memory


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (not loaded ones stay on meta)."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.device.type != "meta":
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


class ResidentBlocks:
    """Block loader for a model held whole in memory: each block visits the compute device for its turn.

    A loader answers three questions of the pass: where the layers before the
    first block run while its inputs are caught (:meth:`outside`), and what
    happens to a block just before (:meth:`load`) and just after (:meth:`unload`)
    its turn.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._home: torch.device | None = None

    @contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList):
        """The layers before the first block, on the compute device; yields where input ids go."""
        home = next(model.parameters()).device
        _move_outside_blocks(model, blocks, self.device)
        try:
            yield self.device
        finally:
            _move_outside_blocks(model, blocks, home)

    def load(self, index: int, block: nn.Module) -> None:
        self._home = next(block.parameters()).device
        block.to(self.device)

    def unload(self, index: int, block: nn.Module) -> None:
        block.to(self._home)

    def read_only(self) -> "ResidentBlocks":
        return ResidentBlocks(self.device)



# ----------------------------------------------------------------------------- placed by accelerate


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate dispatched the model over devices or offloaded part of it (hooks attached)."""
    return hasattr(model, "hf_device_map") and any(hasattr(m, "_hf_hook") for m in model.modules())


def _offloaded(block: nn.Module) -> list[nn.Module]:
    from accelerate.utils import has_offloaded_params

    return [m for m in block.modules() if has_offloaded_params(m)]


def _hooked_tensors(module: nn.Module):
    """The tensors accelerate's hook of ``module`` loads and offloads, by name."""
    from accelerate.utils.modeling import named_module_tensors

    hook = module._hf_hook
    return named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                remove_non_persistent=True)


def _store(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into the offload store of ``module``'s hook under ``name``."""
    from accelerate.utils import offload_weight

    weights = module._hf_hook.weights_map  # a PrefixedDataset over an OffloadedWeightsLoader
    loader, key = weights.dataset, f"{weights.prefix}{name}"
    if key in loader.state_dict:  # offloaded to the CPU
        loader.state_dict[key] = value.detach().to("cpu")
        return
    if loader.save_folder is None:
        raise RuntimeError(f"{key} is offloaded to disk but accelerate has no offload folder to write it to")
    offload_weight(value.detach().to("cpu"), key, loader.save_folder, index=loader.index)


class DispatchedBlocks(ResidentBlocks):
    """Block loader for an accelerate-dispatched model: nothing moves; offloaded weights visit for a turn."""

    def __init__(self, model: nn.Module, write_back: bool = True):
        device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
        super().__init__("cpu" if device is None else device)  # may be a GPU index: 0 is a device
        self._brought_in: list[nn.Module] = []
        self._model, self._write_back = model, write_back

    @contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList):
        yield torch.device("cpu")  # the model's own hook moves the input ids

    def load(self, index: int, block: nn.Module) -> None:
        self._brought_in = _offloaded(block)
        for module in self._brought_in:
            module._hf_hook.pre_forward(module)  # weights from the offload store onto the execution device
            module._hf_hook.offload = False  # ... and kept there while the block is pruned and run

    def unload(self, index: int, block: nn.Module) -> None:
        for module in self._brought_in:
            hook = module._hf_hook
            for name, tensor in _hooked_tensors(module) if self._write_back else ():
                _store(module, name, tensor)
            hook.offload = True
            hook.post_forward(module, None)  # back to meta
        self._brought_in = []

    def read_only(self) -> "DispatchedBlocks":
        return DispatchedBlocks(self._model, write_back=False)


# ----------------------------------------------------------------------------- streamed from shards


TensorFn = Callable[[str, torch.Tensor], torch.Tensor]  # (tensor name, stored tensor) -> tensor to use
AfterBlock = Callable[[int, dict], None]  # (block index, {full tensor name: tensor}) after the block's turn
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


# ----------------------------------------------------------------------------- when to stream


def available_memory() -> int:
    """Bytes of RAM available to a new allocation now (psutil, else /proc/meminfo's MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise


def loaded_size(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the checkpoint's tensors take in memory as ``dtype`` (its size on disk when the dtypes agree)."""
    checkpoint = Checkpoint(path)
    total = 0
    for name in checkpoint.names():
        stored = TORCH_DTYPES.get(checkpoint.dtype(name), torch.float32)
        width = torch.empty((), dtype=dtype if stored.is_floating_point else stored).element_size()
        total += width * math.prod(checkpoint.shape(name))
    return total


def streamable(path: str | os.PathLike) -> bool:
    """A local transformers directory with safetensors weights (what low-memory mode reads)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def should_stream(path: str | os.PathLike, dtype: str | torch.dtype | None = "float32",
                  available: int | None = None) -> bool:
    """Low-memory mode pays off when the loaded model would take more than half the available RAM."""
    if not streamable(path):
        return False
    size = loaded_size(path, torch_dtype(dtype) or torch.float32)
    available = available_memory() if available is None else available
    if size > available / 2:
        log.info("model takes %.2f GB as loaded, more than half of the %.2f GB of RAM available: "
                 "low-memory mode (one decoder block in memory at a time)", size / 1e9, available / 1e9)
        return True
    return False


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
    """Have glibc give every allocation over ``threshold`` bytes a mapping of its own, unmapped when freed.

    By default glibc serves allocations under a moving threshold (up to 32 MiB:
    a 2048x2048 float32 matrix is 16 MiB) from its heap and keeps what is freed
    there, so a pass that reads and drops block after block grows its resident
    memory by tens of MB a block instead of staying at one block. Process-wide;
    False (and nothing done) where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def release_freed_memory() -> bool:
    """Give the memory glibc holds freed in its heaps back to the system (``malloc_trim``), as a pass does after
    each block: a block's transient activations are freed into the heap, and passes over other windows (one per
    model in a merge with task activations) grew the resident memory by about 1 GB each on SmolLM2 without it.
    Unlike :func:`return_freed_memory_promptly` it costs no time in the allocations themselves. False (and
    nothing done) where the C library has no ``malloc_trim``."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    return bool(trim(0))


# ----------------------------------------------------------------------------- the skeleton


def _set(module: nn.Module, name: str, device, value: torch.Tensor | None = None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value)


class StreamedModel:
    """A causal LM whose weights stay in its safetensors shards until a pass asks for them."""

    def __init__(self, path: str | os.PathLike, dtype: str | torch.dtype | None = "float32"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.path = Path(path)
        if not streamable(self.path):
            raise ModelError(f"low-memory mode reads a local transformers directory with safetensors weights; "
                             f"{path} is not one (save it with save_pretrained first)")
        self.dtype = torch_dtype(dtype) or torch.float32
        self.checkpoint = Checkpoint(self.path)
        if not return_freed_memory_promptly():
            log.info("could not ask the C library to return freed memory at once; resident memory may grow")
        config = AutoConfig.from_pretrained(self.path)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        if (self.path / "generation_config.json").is_file():
            self.model.generation_config = GenerationConfig.from_pretrained(self.path)
        self.blocks = decoder_blocks(self.model)
        self.prefix = block_prefix(self.model)
        names, saved = set(self.checkpoint.names()), CheckpointNames(self.model)
        self.sources: list[dict[str, TensorSource]] = []  # per block: module name -> where it is saved
        missing = [name for name in self._outside_model_names() if name not in names]
        for index, block in enumerate(self.blocks):
            fused = block_fused_parameters(block, f"{self.prefix}.{index}")
            sources = {name: saved.source(name, fused.get(name)) for name in self.block_names(index)}
            missing += [part for source in sources.values() for part in source.names if part not in names]
            self.sources.append(sources)
        if missing:
            raise ModelError(f"{self.path}: low-memory mode reads tensors by the model's own names (or fused "
                             f"experts from their per-expert tensors), and the checkpoint lacks {missing[:2]} "
                             f"(re-save it with save_pretrained)")

    def block_names(self, index: int) -> list[str]:
        """Full tensor names of block ``index``, in the block's own order."""
        return [f"{self.prefix}.{index}.{name}" for name in self.blocks[index].state_dict()]

    def checkpoint_names(self, index: int) -> list[str]:
        """The checkpoint's names of block ``index``'s tensors, in the block's order (a fused expert
        parameter stored per expert: each expert's tensors)."""
        return [part for name in self.block_names(index) for part in self.sources[index][name].names]

    def read_block_tensor(self, index: int, name: str, tensor_fn: TensorFn | None = None) -> torch.Tensor:
        """Tensor ``name`` (a full module name) of block ``index``; a fused expert parameter stored one expert
        at a time is assembled (each expert's parts concatenated, the experts stacked)."""
        source = self.sources[index][name]
        if not source.stacked:
            return self.read(source.parts[0][0], tensor_fn)
        return torch.stack([torch.cat([self.read(part, tensor_fn) for part in parts]) for parts in source.parts])

    def checkpoint_tensors(self, index: int, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensor ``name`` under the checkpoint's names: a fused expert parameter stored per
        expert is split back into them (the inverse of :meth:`read_block_tensor`)."""
        source = self.sources[index][name]
        if not source.stacked:
            return {source.parts[0][0]: tensor}
        out = {}
        for expert, parts in enumerate(source.parts):
            rows = [self.checkpoint.shape(part)[0] for part in parts]
            out.update(zip(parts, tensor[expert].split(rows)))
        return out

    def outside_names(self) -> list[str]:
        """Tensors outside the blocks that the layers before the first block may use.

        The LM head is left out: the pass stops at the first block, and the
        output copies it straight from the checkpoint.
        """
        return self._outside_model_names()

    def _outside_model_names(self) -> list[str]:
        inside = f"{self.prefix}."
        head = self.model.get_output_embeddings()
        head_names = {f"{n}.weight" for n, m in self.model.named_modules() if head is not None and m is head}
        return [name for name in self.model.state_dict() if not name.startswith(inside) and name not in head_names]

    def read(self, name: str, tensor_fn: TensorFn | None = None) -> torch.Tensor:
        tensor = self.checkpoint.tensor(name)
        if tensor_fn is not None:
            tensor = tensor_fn(name, tensor)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def loader(self, device: str | torch.device = "cpu", *, after_block: AfterBlock | None = None,
               tensor_fn: TensorFn | None = None) -> "StreamedBlocks":
        return StreamedBlocks(self, device, after_block, tensor_fn)

    def output_plan(self) -> tuple[list[str], list[tuple[str, tuple[int, ...], torch.dtype]]]:
        """(tensors copied through, shard plan) of a model written block by block: the checkpoint's tensors
        outside the blocks first, then the blocks in order. Block tensors the model does not hold are
        dropped, as ``save_pretrained`` would."""
        inside = f"{self.prefix}."
        copied = [n for n in self.checkpoint.names() if not n.startswith(inside)]
        block_names = [n for index in range(len(self.blocks)) for n in self.checkpoint_names(index)]
        dropped = [n for n in self.checkpoint.names() if n.startswith(inside) and n not in set(block_names)]
        if dropped:
            log.info("%d block tensors of the checkpoint are not in the model and are not written (e.g. %s)",
                     len(dropped), dropped[0])
        plan = [(n, self.checkpoint.shape(n), self._out_dtype(n)) for n in copied + block_names]
        return copied, plan

    def _out_dtype(self, name: str) -> torch.dtype:
        stored = TORCH_DTYPES[self.checkpoint.dtype(name)]
        return self.dtype if stored.is_floating_point else stored

class StreamedBlocks(ResidentBlocks):
    """Block loader of a :class:`StreamedModel`: read a block before its turn, hand it to ``after_block``
    (the job's callback, which may write it out) and drop it after."""

    def __init__(self, streamed: StreamedModel, device: str | torch.device = "cpu",
                 after_block: AfterBlock | None = None, tensor_fn: TensorFn | None = None):
        super().__init__(device)
        self.streamed = streamed
        self.after_block = after_block
        self.tensor_fn = tensor_fn

    @contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList):
        names = self.streamed.outside_names()
        for name in names:
            _set(model, name, self.device, self.streamed.read(name, self.tensor_fn))
        try:
            yield self.device
        finally:
            for name in names:
                _set(model, name, "meta")

    def load(self, index: int, block: nn.Module) -> None:
        for name, full in zip(block.state_dict(), self.streamed.block_names(index)):
            _set(block, name, self.device, self.streamed.read_block_tensor(index, full, self.tensor_fn))

    def unload(self, index: int, block: nn.Module) -> None:
        state = block.state_dict()
        if self.after_block is not None:
            out = {}
            for full, tensor in zip(self.streamed.block_names(index), state.values()):
                out.update(self.streamed.checkpoint_tensors(index, full, tensor))
            self.after_block(index, out)
        for name in state:
            _set(block, name, "meta")

    def read_only(self) -> "StreamedBlocks":
        return StreamedBlocks(self.streamed, self.device, None, self.tensor_fn)
