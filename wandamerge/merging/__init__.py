"""Merging fine-tunes: pure tensor functions for task vectors, sparsifiers and merge methods.

Semantics follow mergekit 0.1.5 for the methods both have; see
:mod:`wandamerge.merging.sparsify` and :mod:`wandamerge.merging.methods`.
"""

from __future__ import annotations

from .methods import (MERGE_METHODS, MergeMethod, MergeResult, agreement_mask, disjoint_merge, elect_sign,
                      get_method, merge_tensor, merge_tensor_detailed, register_method, ties_combine,
                      weight_deltas, weighted_average, weighted_sum)
from .sparsify import (SPARSIFIERS, Sparsified, Sparsifier, apply_mask, breadcrumbs, dare_drop, della,
                       get_sparsifier, keep_count, magnitude_trim, register_sparsifier, resolve_sparsifier,
                       score_trim, sparsify, top_mask, wanda_delta_score, wanda_trim)

__all__ = [
    "MERGE_METHODS", "MergeMethod", "MergeResult", "SPARSIFIERS", "Sparsified", "Sparsifier", "agreement_mask",
    "apply_mask", "breadcrumbs", "dare_drop", "della", "disjoint_merge", "elect_sign", "get_method",
    "get_sparsifier", "keep_count", "magnitude_trim", "merge_tensor", "merge_tensor_detailed", "register_method",
    "register_sparsifier", "resolve_sparsifier", "score_trim", "sparsify", "ties_combine", "top_mask",
    "wanda_delta_score", "wanda_trim", "weight_deltas", "weighted_average", "weighted_sum",
]
