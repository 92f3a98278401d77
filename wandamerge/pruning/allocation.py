"""How much each linear map is pruned: sparsity profiles (registered by name) and a per-module sparsity map.

A profile gives every decoder block its own sparsity, from the target and, if
it needs them, the Wanda scores of the dense model (:class:`DenseScores`: one
calibration pass that changes no weight, before any block is pruned). Adding a
profile is one decorated function ``(sparsity, dense, **options) ->
BlockSparsities``; its options (and their defaults) are named in the decorator.

A sparsity map (:class:`SparsityMap`) is the user's own allocation: module
name patterns -> sparsity, the first pattern that matches a map's name wins,
unmatched maps get the target. Either way, the methods only see a
:class:`~.methods.PruneTarget` whose ``sparsity`` is the map's own.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from ..core.allocation import OWL_LAMBDA, OWL_M, check_block_sparsities, outlier_ratio, owl_sparsities
from ..core.scores import wanda_score
from ..core.selection import check_sparsity
from ..errors import ConfigError, lookup, short_repr
from ..loaders import BlockLoader, default_loader
from ..models import decoder_blocks
from ..runner import NORMS, InputStats, blockwise_pass
from .methods import PruneTarget

log = logging.getLogger(__name__)


class DenseScores(Protocol):
    """The dense model's decoder blocks, as a profile sees them."""

    blocks: int

    def per_block(self, measure: Callable[[list[torch.Tensor]], float]) -> list[float]:
        """``measure`` of each block's Wanda scores (one per linear map), from the unpruned model."""


@dataclass
class DenseModelScores:
    """:class:`DenseScores` of a model about to be pruned: a calibration pass of the runner whose visitor
    only collects (no weight changes), over the same blocks (the loader's ``read_only()``: nothing handed over or
    written back). A block's scores are held until its last map is seen, then reduced to one number."""

    model: nn.Module
    windows: torch.Tensor | None
    device: str | torch.device = "cpu"
    batch_size: int | None = None
    loader: BlockLoader | None = None
    all_experts: bool = False
    progress: bool = True

    @property
    def blocks(self) -> int:
        return len(decoder_blocks(self.model))

    def per_block(self, measure: Callable[[list[torch.Tensor]], float]) -> list[float]:
        scores: list[list[torch.Tensor]] = [[] for _ in range(self.blocks)]
        measured: list[float] = []

        def collect(index: int, linear, stats: InputStats) -> None:
            while len(measured) < index:  # every map of the blocks before this one has been seen
                done = len(measured)
                measured.append(measure(scores[done]))
                scores[done] = []
            scores[index].append(wanda_score(linear.weight, stats.sq_norms))

        blockwise_pass(self.model, self.windows, collect, needs={NORMS}, device=self.device,
                       batch_size=self.batch_size, within_block="auto",
                       progress=self.progress, desc="dense scores",
                       loader=(self.loader or default_loader(self.model, self.device)).read_only(),
                       all_experts=self.all_experts)
        measured += [measure(rest) for rest in scores[len(measured):]]
        return measured


@dataclass
class BlockSparsities:
    """A profile's answer: each block's sparsity, and what it was decided from (for the run record)."""

    sparsities: list[float]
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SparsityProfile:
    name: str
    fn: Callable[..., BlockSparsities]
    needs: frozenset[str]  # statistics of the inputs the dense pass collects (empty: no dense pass)
    options: dict[str, float]  # option name -> default
    check: Callable[[dict], None]  # refuses option values the profile cannot use (before any model loads)
    uneven: bool  # whether blocks may get different sparsities (then only unstructured targets are shared out)
    doc: str


SPARSITY_PROFILES: dict[str, SparsityProfile] = {}


def register_sparsity_profile(name: str, needs: tuple[str, ...] = (), options: dict[str, float] | None = None,
                              check: Callable[[dict], None] = lambda values: None, uneven: bool = True):
    def decorate(fn):
        SPARSITY_PROFILES[name] = SparsityProfile(name, fn, frozenset(needs), dict(options or {}), check, uneven,
                                                  (fn.__doc__ or "").strip())
        return fn
    return decorate


def get_sparsity_profile(name: str) -> SparsityProfile:
    return lookup(SPARSITY_PROFILES, "sparsity profile", name)


def profile_options() -> list[str]:
    """Every option some registered profile takes."""
    return sorted({name for profile in SPARSITY_PROFILES.values() for name in profile.options})


def profile_values(profile: SparsityProfile, given: dict[str, float]) -> dict[str, float]:
    """The profile's options: those ``given``, the others at their defaults; another profile's are refused."""
    for name in given:
        if name not in profile.options:
            owners = [p.name for p in SPARSITY_PROFILES.values() if name in p.options]
            raise ConfigError(f"{name} is an option of sparsity profile {' or '.join(map(repr, owners)) or '?'}, "
                              f"not of {profile.name!r}")
    values = {**profile.options, **given}
    profile.check(values)
    return values


@register_sparsity_profile("uniform", uneven=False)
def uniform(sparsity: float, dense: DenseScores) -> BlockSparsities:
    """Every block at the target (the Wanda and SparseGPT papers)."""
    return BlockSparsities([sparsity] * dense.blocks)


def _check_owl(values: dict) -> None:
    if not values["owl_m"] > 0:
        raise ConfigError(f"owl_m must be positive, got {values['owl_m']}")
    if not 0 <= values["owl_lambda"] < 0.5:
        raise ConfigError(f"owl_lambda must be in [0, 0.5), got {values['owl_lambda']}")


@register_sparsity_profile("owl", needs=(NORMS,), options={"owl_m": OWL_M, "owl_lambda": OWL_LAMBDA},
                           check=_check_owl)
def owl(sparsity: float, dense: DenseScores, owl_m: float, owl_lambda: float) -> BlockSparsities:
    """OWL (Yin et al., 2024): blocks with more Wanda-score outliers (above owl_m times the block's mean)
    pruned less, within 2 * owl_lambda of each other, with the mean over the blocks at the target."""
    ratios = dense.per_block(lambda scores: outlier_ratio(scores, owl_m))
    sparsities = check_block_sparsities(owl_sparsities(ratios, sparsity, owl_lambda),
                                        f"OWL (sparsity {sparsity}, owl_lambda {owl_lambda})")
    return BlockSparsities(sparsities, {"outlier_ratios": ratios})


# ----------------------------------------------------------------------------- the user's own allocation


def _matcher(pattern: str) -> Callable[[str], bool]:
    """``re:REGEX`` matches a whole name by regular expression; anything else is a shell-style glob."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(f"sparsity map: a pattern must be a non-empty string, got {short_repr(pattern)}")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"sparsity map: {pattern!r} is not a valid regular expression ({exc})") from None
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class SparsityMap:
    """Module-name patterns -> sparsity, in the user's order; the first pattern that matches wins.

    A name is a map's full module name (``model.layers.0.mlp.down_proj``; an
    expert's ``model.layers.0.mlp.experts.3.down_proj``), and a pattern also
    matches it with ``.weight`` added (the names of the run record's ``per_matrix``).
    """

    rules: tuple[tuple[str, float], ...]
    _matchers: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, mapping: dict) -> "SparsityMap":
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError("a sparsity map is a non-empty mapping of module-name pattern -> sparsity")
        rules = []
        for pattern, value in mapping.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"sparsity map: {pattern!r}: sparsity must be a number, got {short_repr(value)}")
            try:
                rules.append((pattern, check_sparsity(value)))
            except ConfigError as exc:
                raise ConfigError(f"sparsity map: {pattern!r}: {exc}") from None
        return cls(tuple(rules), tuple(_matcher(pattern) for pattern, _ in rules))

    def _matches(self, rule: int, name: str) -> bool:
        return self._matchers[rule](name) or self._matchers[rule](f"{name}.weight")

    def sparsity_of(self, name: str) -> float | None:
        """The sparsity of the first pattern matching ``name``, or None."""
        return next((value for rule, (_, value) in enumerate(self.rules) if self._matches(rule, name)), None)

    def unmatched(self, names: list[str]) -> list[str]:
        """The patterns that match none of ``names`` (likely misspelt)."""
        return [pattern for rule, (pattern, _) in enumerate(self.rules)
                if not any(self._matches(rule, name) for name in names)]

    def as_dict(self) -> dict[str, float]:
        return dict(self.rules)


# ----------------------------------------------------------------------------- the plan of a run


@dataclass(frozen=True)
class Allocation:
    """What decides each map's sparsity in a run: a profile with its options, or a sparsity map."""

    profile: SparsityProfile
    options: dict[str, float]
    sparsity_map: SparsityMap | None = None

    @classmethod
    def of(cls, target: PruneTarget, profile: str = "uniform", options: dict | None = None,
           sparsity_map: dict | None = None) -> "Allocation":
        """Checked: a known profile with its own options, a valid map, and neither with an N:M pattern."""
        row = get_sparsity_profile(profile)
        values = profile_values(row, options or {})
        checked_map = SparsityMap.of(sparsity_map) if sparsity_map is not None else None
        if checked_map is not None and row.uneven:
            raise ConfigError(f"a sparsity map is an allocation of its own; leave out sparsity profile {row.name!r}")
        if target.nm and (row.uneven or checked_map is not None):
            what = "a sparsity map" if checked_map is not None else f"sparsity profile {row.name!r}"
            raise ConfigError(f"an N:M pattern prunes every block at N/M; {what} shares out an unstructured "
                              f"sparsity: give a sparsity, not a pattern")
        return cls(row, values, checked_map)

    @property
    def needs(self) -> frozenset[str]:
        return self.profile.needs

    def per_block(self, sparsity: float, dense: DenseScores) -> BlockSparsities:
        return self.profile.fn(sparsity, dense, **self.options)

    def record(self, planned: BlockSparsities) -> dict:
        """What decided the targets, for the run record: the profile, its options and findings, or the map."""
        if self.sparsity_map is not None:
            return {"profile": self.profile.name, "sparsity_map": self.sparsity_map.as_dict()}
        return {"profile": self.profile.name, **self.options, **planned.details}

    def target_of(self, target: PruneTarget, block_sparsity: float, name: str) -> PruneTarget:
        """The target of map ``name`` (full module name) in a block given ``block_sparsity``."""
        if target.nm:
            return target
        own = self.sparsity_map.sparsity_of(name) if self.sparsity_map is not None else None
        return target.with_sparsity(block_sparsity if own is None else own)
