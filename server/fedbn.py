"""FedBN on the server: the sites' normalisation layers are never averaged.

A FedBN site (``fedbn = true``) replies without its normalisation weights (``shared/fedbn.py`` names
them). Before the strategy aggregates, :func:`with_global_norm` gives every reply the global model's
own normalisation weights, so each strategy (FedAvg, FedOpt's deltas, median, Krum) sees whole models
whose norm part does not move, and :func:`keep_global_norm` puts the exact global values back after
aggregation (an average of identical floats can be an ulp off). The server aggregates only the rest.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ArrayRecord, Message, RecordDict

from shared.config import RunConfig
from shared.contract import ARRAYS


@lru_cache(maxsize=8)
def _key_sets(run: RunConfig) -> tuple[frozenset[str], frozenset[str]]:
    """(normalisation-layer keys, buffer keys) of the run's task model, from one build of it."""
    from shared.fedbn import norm_keys
    from shared.learning import learning_core, train_config_for
    from shared.tasks import get_task

    model = learning_core().build_model(get_task(run.task), train_config_for(run, device="cpu"))
    return frozenset(norm_keys(model)), frozenset(name for name, _ in model.named_buffers())


def norm_keys_for(run: RunConfig) -> frozenset[str]:
    """The normalisation-layer keys of the run's task model."""
    return _key_sets(run)[0]


def buffer_keys_for(run: RunConfig) -> frozenset[str]:
    """State-dict keys of the run's task model that are buffers (running statistics, counters)."""
    return _key_sets(run)[1]


def _merged(arrays: ArrayRecord, global_arrays: ArrayRecord, keys: frozenset[str]) -> ArrayRecord:
    """``arrays`` with the normalisation entries taken from ``global_arrays``, in the global's order
    (any other key missing or extra stays so, for update validation to see)."""
    merged = {}
    for k in global_arrays:
        if k in keys:
            merged[k] = global_arrays[k]
        elif k in arrays:
            merged[k] = arrays[k]
    merged.update({k: v for k, v in arrays.items() if k not in global_arrays})
    return ArrayRecord(merged)


def with_global_norm(replies: list[Message], run: RunConfig,
                     global_arrays: ArrayRecord) -> list[Message]:
    """Train replies whose normalisation weights are the global model's (what a site sent is ignored;
    a FedBN site sends none). New messages: the received ones are left as they came."""
    keys = norm_keys_for(run)
    out = []
    for msg in replies:
        content = RecordDict(dict(msg.content.items()))
        if ARRAYS in content:
            content[ARRAYS] = _merged(content[ARRAYS], global_arrays, keys)
        out.append(Message(content=content, metadata=msg.metadata))
    return out


def keep_global_norm(new_arrays: ArrayRecord, run: RunConfig,
                     global_arrays: ArrayRecord) -> ArrayRecord:
    """The aggregate with the global model's exact normalisation weights."""
    return _merged(new_arrays, global_arrays, norm_keys_for(run))
