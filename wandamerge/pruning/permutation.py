"""Input-channel permutation before an N:M mask (RIA's, Zhang et al., ICLR 2024), folded into the checkpoint.

A map's input channels are reordered (:func:`~wandamerge.core.permutation.nm_permutation` on its score) so
that its N:M mask keeps more score, and the maps making those channels get their output rows reordered the
same way (:func:`~wandamerge.models.permutable_inputs`): the block computes exactly what it computed before,
and the saved weights are N:M in their own stored order, an ordinary dense checkpoint. Only the MLP's last
map and the attention's output map can be reordered so; the official code prunes every map through a
permuted mask it does not fold in, which leaves a matrix that is not N:M as stored.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.permutation import nm_permutation
from ..errors import ConfigError
from ..models import ChannelGroup, LinearMap, block_linears, permutable_inputs


def reorder_for_nm(block: nn.Module, linear: LinearMap, groups: list[ChannelGroup], score: torch.Tensor,
                   n: int, m: int) -> torch.Tensor:
    """Reorder the input channels of ``linear`` (a map of ``block``) and the output rows of the maps making
    them, in place, so that an N:M mask of ``score`` (the map's score, (out, in)) keeps more. Each
    :class:`ChannelGroup` gets one permutation, found on its columns stacked (every query head reading a
    value head counts). Returns the map's new column order: column ``k`` was column ``order[k]``."""
    maps = {other.name: other for other in block_linears(block)}
    order = torch.arange(linear.in_features, device=score.device)
    row_orders: dict[str, torch.Tensor] = {}
    for group in groups:
        width = group.width
        perm = nm_permutation(torch.cat([score[:, c:c + width] for c in group.columns]), n, m)
        for c in group.columns:
            order[c:c + width] = c + perm
        for name, first in group.rows:
            rows = row_orders.setdefault(name, torch.arange(maps[name].weight.shape[0], device=score.device))
            rows[first:first + width] = first + perm
    for name, rows in row_orders.items():
        maps[name].reorder_outputs(rows)
    linear.reorder_inputs(order)
    return order


def check_permutable(block: nn.Module, config, m: int) -> dict[str, list[ChannelGroup]]:
    """The reorderable maps of a block (:func:`~wandamerge.models.permutable_inputs`), refused in one line
    where there are none or where a group of channels does not hold whole groups of ``m``."""
    found = permutable_inputs(block, config)
    if not found:
        raise ConfigError(f"--permute: no map of a {config.model_type!r} model has input channels this package can "
                          f"reorder (it knows where the MLP and attention inputs come from only in dense "
                          f"families)")
    for name, groups in found.items():
        if any(group.width % m for group in groups):
            raise ConfigError(f"--permute with M = {m}: {name} reads channels in runs of {groups[0].width}, "
                              f"not a multiple of {m}")
    return found
