"""The default order and batch of a calibration pass, chosen from the activation memory each would need.

A block's forward over ``b`` windows holds, for a moment, every linear map's output for all their tokens
(``b * seqlen * floats_per_token`` values). The sequential order runs all windows at once; the parallel order
can run them in batches at the cost of a second forward. The default runs one sequential forward when those
transient activations fit in the budget, and otherwise the parallel order with the largest batch that fits.
The budget is what the pass holds anyway: the block's inputs for all windows (``nsamples * seqlen * hidden``
values), or ``floor_bytes`` when that is less, so small calibrations keep the faster single forward.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENTIAL_FLOOR_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class PassPlan:
    order: str  # "sequential" or "parallel"
    batch_size: int  # windows per forward


def plan_pass(nsamples: int, seqlen: int, hidden: int, floats_per_token: int, element_bytes: int,
              floor_bytes: int | None = None) -> PassPlan:
    """The order and batch of the default pass (see the module's docstring); ``floor_bytes`` defaults to
    :data:`SEQUENTIAL_FLOOR_BYTES`."""
    floor_bytes = SEQUENTIAL_FLOOR_BYTES if floor_bytes is None else floor_bytes
    if min(nsamples, seqlen, hidden, floats_per_token, element_bytes) < 1:
        raise ValueError("plan_pass needs positive sizes")
    per_window = seqlen * floats_per_token * element_bytes
    budget = max(nsamples * seqlen * hidden * element_bytes, floor_bytes)
    if nsamples * per_window <= budget:
        return PassPlan("sequential", nsamples)
    return PassPlan("parallel", max(1, min(nsamples, budget // per_window)))
