"""Blocks placed by accelerate (``from_pretrained(device_map=..., offload_folder=...)``).

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
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .runner import ResidentBlocks


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

    def __init__(self, model: nn.Module):
        device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
        super().__init__("cpu" if device is None else device)  # may be a GPU index: 0 is a device
        self._brought_in: list[nn.Module] = []

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
            for name, tensor in _hooked_tensors(module):
                _store(module, name, tensor)
            hook.offload = True
            hook.post_forward(module, None)  # back to meta
        self._brought_in = []
