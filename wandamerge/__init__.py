"""wandamerge: activation-guided sparsification and merging of causal LMs."""

from .models import load_model, prepare_smollm2, save_model
from .pruning import PruneReport, prune

__version__ = "0.1.0"

__all__ = ["PruneReport", "__version__", "load_model", "prepare_smollm2", "prune", "save_model"]
