"""How the routers of an MoE model are merged: the rules a recipe's ``router`` key names, as rows of data.

A router is the small map that picks each token's experts (``mlp.gate.weight``, Mixtral's
``block_sparse_moe.gate.weight``, gpt-oss's ``mlp.router.weight`` and ``bias``, Qwen2-MoE's
``shared_expert_gate.weight``). It is no linear map of the experts' inputs to score: no calibration
statistics are collected for it, so an activation score (Wanda) never applies to it.

* ``method`` (the default): merged like any other tensor by the recipe's method, its sparsifier falling
  back to magnitude where it needs activations (the record says so). This is what mergekit does with a
  router, so a mergekit recipe gives mergekit's routers.
* ``base``: the base model's router, unchanged: every fine-tune's experts are reached as the base reached
  them.
* ``average``: the weighted mean of the merged models' routers, ``sum_i w_i R_i / sum_i w_i`` (each model's
  ``weight``, 1 where the method takes none): untrimmed, and scaled as one router whatever the method's
  ``normalize`` and ``lambda``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, lookup


@dataclass(frozen=True)
class RouterRule:
    """A way to merge router tensors: by the recipe's method (``merge_method`` None), kept from the base
    (``keeps_base``), or by ``merge_method`` with the models' weights, normalized as ``normalize`` says."""

    name: str
    merge_method: str | None = None
    keeps_base: bool = False
    normalize: bool = False
    doc: str = ""


ROUTER_RULES: dict[str, RouterRule] = {}
DEFAULT_ROUTER_RULE = "method"  # mergekit's treatment: a recipe written for mergekit gives its routers


def register_router_rule(rule: RouterRule) -> RouterRule:
    if rule.name in ROUTER_RULES:
        raise ConfigError(f"router rule {rule.name!r} is already registered")
    if rule.keeps_base and rule.merge_method is not None:
        raise ConfigError(f"router rule {rule.name!r} keeps the base and merges by {rule.merge_method}: pick one")
    ROUTER_RULES[rule.name] = rule
    return rule


def get_router_rule(name: str) -> RouterRule:
    return lookup(ROUTER_RULES, "router rule", name)


for _rule in (
    RouterRule("method", doc="merged by the recipe's merge method, as every other tensor (mergekit's way)"),
    RouterRule("base", keeps_base=True, doc="the base model's router, unchanged"),
    RouterRule("average", merge_method="linear", normalize=True,
               doc="the weighted mean of the merged models' routers, untrimmed"),
):
    register_router_rule(_rule)


__all__ = ["DEFAULT_ROUTER_RULE", "ROUTER_RULES", "RouterRule", "get_router_rule", "register_router_rule"]
