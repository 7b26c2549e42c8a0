"""Server optimisers step the trainable weights only; running statistics are averaged.

A BatchNorm running mean, running variance or batch counter is a measurement of the sites' data, not a
weight. Flower's FedAdam/FedYogi move every array by a normalised step of about ``eta`` a round, so
the running statistics stay near their initial 0 / 1 whatever the sites measured, and FedAvgM's
momentum overshoots a shrinking variance below zero (the global model turns non-finite: the FedAvgM
runs in benchmarks/README.md that "diverged" from round 2). :func:`averaged_running_stats` gives the
aggregate the sites' example-weighted mean of those buffers (what FedAvg sends), and the strategy's
own copy of the current model the same values, so the next pseudo-gradient does not see them move.
Not under ``dp = "central"``: there every array, buffers included, is released only through the
clipped, noised aggregate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from server.fedbn import buffer_keys_for
from shared.config import RunConfig
from shared.contract import ARRAYS, METRICS, NUM_EXAMPLES

OPTIMISED = ("fedadam", "fedyogi", "fedavgm")  # strategies that step the weights with an optimiser


def weighted_buffer_mean(replies: list[Message], keys: frozenset[str]) -> dict[str, np.ndarray]:
    """The example-weighted mean of each buffer the replies carry, in the buffer's own dtype."""
    weights = [float(m.content[METRICS][NUM_EXAMPLES]) for m in replies]
    total = sum(weights) or 1.0
    out: dict[str, np.ndarray] = {}
    for key in keys:
        arrays = [m.content[ARRAYS][key].numpy() for m in replies if key in m.content[ARRAYS]]
        if len(arrays) != len(replies):
            continue  # not every site sent it (FedBN keeps norm layers home): leave it to the strategy
        mean = sum(w * a.astype(np.float64) for w, a in zip(weights, arrays, strict=True)) / total
        dtype = arrays[0].dtype
        out[key] = np.asarray(np.rint(mean) if np.issubdtype(dtype, np.integer) else mean, dtype=dtype)
    return out


def averaged_running_stats(new_arrays: ArrayRecord | None, replies: list[Message], run: RunConfig,
                           strategy: Any) -> ArrayRecord | None:
    """``new_arrays`` with its buffers replaced by the replies' weighted mean (optimised strategies
    only; every other aggregation already treats them like the weights)."""
    if new_arrays is None or not replies or run.strategy.lower() not in OPTIMISED:
        return new_arrays
    if run.dp == "central":  # the buffers went through the clipped, noised aggregate: an exact mean
        return new_arrays    # of the sites' statistics would be released outside the DP guarantee
    means = weighted_buffer_mean(replies, buffer_keys_for(run))
    if not means:
        return new_arrays
    fixed = ArrayRecord({k: Array(means[k]) if k in means else v for k, v in new_arrays.items()})
    if isinstance(getattr(strategy, "current_arrays", None), ArrayRecord):
        strategy.current_arrays = fixed  # FedAvgM steps from its own copy of what it returned
    return fixed
