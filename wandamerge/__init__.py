"""wandamerge: activation-guided sparsification and merging of causal LMs (the Python API's entry points).

The names below load their modules on first use, so importing a pure module
(``wandamerge.core.selection``, ``wandamerge.merging.sparsify``) does not load
models, the runner or transformers.
"""

from importlib import import_module

from .io.record import package_version

__version__ = package_version()

_API = {"load_model": "models", "prepare_smollm2": "models", "save_model": "models", "prune": "pruning",
        "PruneReport": "pruning", "prune_experts": "pruning", "prune_width": "pruning", "prune_depth": "pruning",
        "prune_to_directory": "jobs.prune",
        "merge": "jobs.merge", "evaluate": "jobs.evaluate"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
