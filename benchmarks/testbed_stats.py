"""Statistics of the merging testbed: bootstrap intervals, paired comparisons, and choosing on validation only.

Records are per-example correctness (0/1) per task, so every statistic is
recomputed from items: a bootstrap resamples each task's test items
independently (and, for methods with random seeds, the seeds too), which keeps
the task structure of the mean. Pure functions of numbers; no model here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

BOOTSTRAP = 2000
LEVEL = 0.95

Items = Mapping[str, Sequence[int]]  # task -> 0/1 per test example


def accuracy(items: Sequence[int]) -> float:
    return float(np.mean(items)) if len(items) else float("nan")


def summary(per_seed: Sequence[Items], own: Mapping[str, float]) -> dict:
    """Per-task accuracy, mean absolute accuracy, and mean normalized accuracy (merged / own fine-tune),
    averaged over seeds (one entry per seed; deterministic methods have one)."""
    tasks = list(per_seed[0])
    per_task = {t: float(np.mean([accuracy(s[t]) for s in per_seed])) for t in tasks}
    return {"per_task": per_task, "absolute": float(np.mean(list(per_task.values()))),
            "normalized": float(np.mean([per_task[t] / own[t] for t in tasks]))}


def _resampled_means(per_seed: Sequence[Items], own: Mapping[str, float] | None, draws: np.ndarray,
                     seed_draws: np.ndarray) -> np.ndarray:
    """The mean (normalized if ``own``) accuracy under each bootstrap draw of items and seeds."""
    tasks = list(per_seed[0])
    total = np.zeros(len(seed_draws))
    for t in tasks:
        matrix = np.array([s[t] for s in per_seed], dtype=float)  # seeds x items
        picked = matrix[seed_draws[:, :, None], draws[t][:, None, :]]  # draw x seed x item
        acc = picked.mean(axis=(1, 2))
        total += acc / own[t] if own else acc
    return total / len(tasks)


def _draws(per_seed: Sequence[Items], n_seeds: int, rng: np.random.Generator, boot: int):
    items = {t: rng.integers(0, len(v), size=(boot, len(v))) for t, v in per_seed[0].items()}
    seeds = rng.integers(0, n_seeds, size=(boot, n_seeds))
    return items, seeds


def interval(per_seed: Sequence[Items], own: Mapping[str, float] | None = None, *, boot: int = BOOTSTRAP,
             seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (normalized when ``own`` is given) accuracy over tasks,
    resampling each task's test items and the seeds."""
    rng = np.random.default_rng(seed)
    draws, seed_draws = _draws(per_seed, len(per_seed), rng, boot)
    means = _resampled_means(per_seed, own, draws, seed_draws)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def task_interval(items: Sequence[int], *, boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of one task's accuracy."""
    rng = np.random.default_rng(seed)
    values = np.asarray(items, dtype=float)
    means = values[rng.integers(0, len(values), size=(boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Paired:
    difference: float  # method minus reference, mean normalized accuracy
    low: float
    high: float
    p_worse_or_equal: float  # share of bootstrap draws where the method is not above the reference

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"


def paired(method: Sequence[Items], reference: Sequence[Items], own: Mapping[str, float], *,
           boot: int = BOOTSTRAP, seed: int = 0) -> Paired:
    """Paired bootstrap of the difference in mean normalized accuracy: the same test items are drawn for
    both (the pairing), seeds of each side drawn independently."""
    rng = np.random.default_rng(seed)
    draws, seeds_a = _draws(method, len(method), rng, boot)
    seeds_b = rng.integers(0, len(reference), size=(boot, len(reference)))
    diff = _resampled_means(method, own, draws, seeds_a) - _resampled_means(reference, own, draws, seeds_b)
    point = summary(method, own)["normalized"] - summary(reference, own)["normalized"]
    low, high = np.quantile(diff, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Paired(point, float(low), float(high), float(np.mean(diff <= 0)))


# ----------------------------------------------------------------------------- choosing settings


@dataclass(frozen=True)
class ValidationResult:
    """One setting's validation score; the only thing a choice may see. It has no place for test numbers."""
    setting: tuple  # e.g. (("density", 0.2), ("lambda", 0.7))
    normalized: float  # mean normalized validation accuracy (averaged over seeds)


def choose_setting(results: Sequence[ValidationResult]) -> tuple:
    """The setting with the highest mean normalized validation accuracy; ties go to the first in grid order.

    Takes ``ValidationResult`` only, so a test number cannot reach the choice (checked by
    ``tests/test_testbed_stats.py``)."""
    if not results:
        raise ValueError("no validation results to choose from")
    for result in results:
        if not isinstance(result, ValidationResult):
            raise TypeError(f"choose_setting takes validation results only, got {type(result).__name__}")
    best = max(range(len(results)), key=lambda i: (results[i].normalized, -i))
    return results[best].setting
