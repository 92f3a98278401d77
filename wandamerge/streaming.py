"""Memory-bounded passes: one decoder block in memory at a time, read lazily from the safetensors shards.

The model is built as a skeleton on the meta device (accelerate's
``init_empty_weights``: parameters take no memory; buffers such as rotary
frequencies are computed as usual). The layers before the first block are
read in while the first block's inputs are caught, and dropped again; then
each block is read just before its turn, pruned (or measured) by the same
runner and methods as an in-memory model, written to the output shards and
dropped. Peak memory is about the embeddings (during the catch) or one block,
plus the calibration activations — not the model.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .merging.sources import TORCH_DTYPES, Checkpoint, ShardWriter
from .models import ModelError, _dtype, block_prefix, decoder_blocks
from .runner import ResidentBlocks

log = logging.getLogger(__name__)

TensorFn = Callable[[str, torch.Tensor], torch.Tensor]  # (tensor name, stored tensor) -> tensor to use
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
    size = loaded_size(path, _dtype(dtype) or torch.float32)
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
        self.dtype = _dtype(dtype) or torch.float32
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
        missing = [name for index in range(len(self.blocks)) for name in self.block_names(index)
                   if not self.checkpoint.has(name)]
        missing += [name for name in self._outside_model_names() if not self.checkpoint.has(name)]
        if missing:
            raise ModelError(f"{self.path}: low-memory mode reads tensors by the model's own names, and the "
                             f"checkpoint lacks {missing[:2]} (re-save it with save_pretrained)")

    def block_names(self, index: int) -> list[str]:
        """Full tensor names of block ``index``, in the block's own order."""
        return [f"{self.prefix}.{index}.{name}" for name in self.blocks[index].state_dict()]

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

    def loader(self, device: str | torch.device = "cpu", *, writer: ShardWriter | None = None,
               tensor_fn: TensorFn | None = None) -> "StreamedBlocks":
        return StreamedBlocks(self, device, writer, tensor_fn)

    # ------------------------------------------------------------------------- output

    def output_plan(self) -> tuple[list[str], list[tuple[str, tuple[int, ...], torch.dtype]]]:
        """(tensors copied through, shard plan): the checkpoint's tensors outside the blocks first, then the
        blocks in order. Block tensors the model does not hold are dropped, as ``save_pretrained`` would."""
        inside = f"{self.prefix}."
        copied = [n for n in self.checkpoint.names() if not n.startswith(inside)]
        block_names = [n for index in range(len(self.blocks)) for n in self.block_names(index)]
        dropped = [n for n in self.checkpoint.names() if n.startswith(inside) and n not in set(block_names)]
        if dropped:
            log.info("%d block tensors of the checkpoint are not in the model and are not written (e.g. %s)",
                     len(dropped), dropped[0])
        plan = [(n, self.checkpoint.shape(n), self._out_dtype(n)) for n in copied + block_names]
        return copied, plan

    def _out_dtype(self, name: str) -> torch.dtype:
        stored = TORCH_DTYPES[self.checkpoint.dtype(name)]
        return self.dtype if stored.is_floating_point else stored

    def start_output(self, out_dir: Path, max_shard_size: str = "2GB") -> ShardWriter:
        """A shard writer for ``out_dir`` with the tensors outside the blocks already copied in."""
        copied, plan = self.output_plan()
        writer = ShardWriter(out_dir, plan, max_shard_size)
        for name in copied:
            writer.add(name, self.read(name))
        return writer

    def finish_output(self, out_dir: Path, writer: ShardWriter, tokenizer=None,
                      extra_files: dict[str, str] | None = None) -> None:
        """Close the shards and write what ``save_pretrained`` writes beside them."""
        writer.close()
        config = self.model.config
        config.dtype = str(self.dtype).split(".")[1]
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(out_dir)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        for name, text in (extra_files or {}).items():
            (Path(out_dir) / name).write_text(text)


class StreamedBlocks(ResidentBlocks):
    """Block loader of a :class:`StreamedModel`: read a block before its turn, write and drop it after."""

    def __init__(self, streamed: StreamedModel, device: str | torch.device = "cpu",
                 writer: ShardWriter | None = None, tensor_fn: TensorFn | None = None):
        super().__init__(device)
        self.streamed = streamed
        self.writer = writer
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
            _set(block, name, self.device, self.streamed.read(full, self.tensor_fn))

    def unload(self, index: int, block: nn.Module) -> None:
        state = block.state_dict()
        if self.writer is not None:
            for full, tensor in zip(self.streamed.block_names(index), state.values()):
                self.writer.add(full, tensor)
        for name in state:
            _set(block, name, "meta")
