"""wandamerge: activation-guided sparsification and merging of causal LMs (the Python API's entry points)."""

from .io.record import package_version
from .models import load_model, prepare_smollm2, save_model
from .pruning import PruneReport, prune

__version__ = package_version()

__all__ = ["PruneReport", "__version__", "load_model", "prepare_smollm2", "prune", "save_model"]
