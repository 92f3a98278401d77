"""Merging fine-tunes, as pure tensor functions: task-vector sparsifiers, merge methods, block-by-block merges.

Semantics follow mergekit 0.1.5 for the methods both have; see
:mod:`wandamerge.merging.sparsify` and :mod:`wandamerge.merging.methods`.
"""

from __future__ import annotations

from .methods import (COMBINERS, MERGE_METHODS, MergeMethod, MergePlan, MergeResult, agreement_mask,
                      disjoint_merge, elect_sign, get_method, merge_tensor, merge_tensor_detailed, plan_merge,
                      register_method, ties_combine, weight_deltas, weighted_average, weighted_sum)
from .sparsify import (SPARSIFIERS, Selection, Sparsified, Sparsifier, breadcrumbs_trim, dare_drop, della_magprune,
                       get_sparsifier, magnitude_trim, mask_and_rescale, register_sparsifier, register_selection,
                       resolve_sparsifier, score_trim, sparsify, wanda_delta_score, wanda_trim)

__all__ = [
    "COMBINERS", "MERGE_METHODS", "MergeMethod", "MergePlan", "MergeResult", "SPARSIFIERS", "Selection", "Sparsified",
    "Sparsifier", "agreement_mask", "breadcrumbs_trim", "dare_drop", "della_magprune", "disjoint_merge",
    "elect_sign", "get_method", "get_sparsifier", "magnitude_trim", "mask_and_rescale", "merge_tensor",
    "merge_tensor_detailed", "plan_merge", "register_sparsifier", "register_method", "register_selection",
    "resolve_sparsifier", "score_trim", "sparsify", "ties_combine", "wanda_delta_score", "wanda_trim",
    "weight_deltas", "weighted_average", "weighted_sum",
]
