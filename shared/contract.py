"""The message contract between the ServerApp and the ClientApps: what travels, under which names.

Both sides import this module and nothing else to agree on a message:

- record and metric names (``ARRAYS``, ``METRICS``, ``NUM_EXAMPLES``, ...), so a typo cannot silently
  break aggregation;
- the typed run and node configuration (:class:`RunConfig`, :class:`NodeConfig`, parsed in
  ``shared.config``; every site and the server hold the same ``RunConfig``, so options such as
  ``local-epochs`` or ``task`` never travel in messages);
- the weight converters: model weights travel as a Flower ``ArrayRecord``, built from the plain
  state dict :func:`state_dict` returns (``ArrayRecord(state_dict(x))``) and read back with
  :func:`numpy_weights` or Flower's own ``ArrayRecord.to_torch_state_dict()``;
- what both sides count or read off a message: :func:`payload_bytes`, :func:`site_of`,
  :func:`is_number`.

Flower stays out of ``shared`` (a house rule): the functions here take Flower's records and messages
as plain objects (``.items()``, ``.numpy()``, ``.count_bytes()``, ``.content``, ``.metadata``), and the
one Flower constructor a converter needs, ``ArrayRecord``, is called by the Flower side on the plain
dict of tensors returned here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from shared.config import NodeConfig, RunConfig

# --- records ---------------------------------------------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord with the model weights
CONFIG = "config"  # ConfigRecord: server -> site options of one message, site -> its site-id
METRICS = "metrics"  # MetricRecord in replies
ELIGIBLE = "eligible"  # MetricRecord in query replies: eligible case counts

# --- keys inside the records -----------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # the weighting key (true example count, not batches)
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # FedProx: the proximal term the site adds (sent by the strategy)
SITE_ID = "site-id"  # a ConfigRecord entry naming the site (a hospital name, never a patient)
TRAIN_SECONDS = "train-seconds"
TRAIN_LOSS = "train-loss"
SKIPPED = "skipped"  # eligible cases a site left out because an image was unusable
CONFUSION = "confusion"  # flattened K x K int counts (row = true class)
SCORE_HIST = "score-hist"  # flattened K x 2 x BINS int counts (positives / negatives of p_k)
NUM_CLASSES = "num-classes"
ELIGIBLE_TOTAL = "eligible-total"
ELIGIBLE_PREFIX = "eligible-"  # eligible-<split>-<class> counts in query replies
EVAL_SPLIT = "eval-split"  # evaluate config: "val" scores the site's validation split (default: test)
FEDBN_STATE = "fedbn-norm"  # ArrayRecord in a site's ctx.state: its own normalisation layers (FedBN)
SCAFFOLD_C = "scaffold-c"  # ArrayRecord in SCAFFOLD train messages: the server's control variate c
SCAFFOLD_DELTA = "scaffold-delta"  # ArrayRecord in SCAFFOLD train replies: c_i+ - c_i
SCAFFOLD_STATE = "scaffold-ci"  # ArrayRecord in a site's ctx.state: its control variate c_i
PERSONALISE = "personalise"  # evaluate config: 1 = fine-tune a personal model now (the last round)
PERSONAL_METRICS = "personal-metrics"  # MetricRecord in evaluate replies: the personalised model's
DITTO_STATE = "ditto-model"  # ArrayRecord in a site's ctx.state: its Ditto personal model

__all__ = [
    "ARRAYS", "CONFIG", "CONFUSION", "DITTO_STATE", "ELIGIBLE", "ELIGIBLE_PREFIX", "ELIGIBLE_TOTAL",
    "EVAL_SPLIT", "FEDBN_STATE", "METRICS",
    "NUM_CLASSES", "NUM_EXAMPLES", "PERSONALISE", "PERSONAL_METRICS", "PROXIMAL_MU", "SCAFFOLD_C",
    "SCAFFOLD_DELTA", "SCAFFOLD_STATE", "SCORE_HIST", "SERVER_ROUND", "SITE_ID",
    "TRAIN_LOSS", "TRAIN_SECONDS", "NodeConfig", "RunConfig", "is_number", "numpy_weights",
    "payload_bytes", "site_of", "state_dict",
]


def is_number(value: Any) -> bool:
    """A metric value that can be averaged (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numpy_weights(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Model weights as numpy copies, from an ``ArrayRecord`` or a torch state dict (key order kept)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if hasattr(value, "detach"):  # torch.Tensor
            value = value.detach().cpu().numpy()
        elif hasattr(value, "numpy"):  # flwr Array
            value = value.numpy()
        out[key] = np.array(value, copy=True)
    return out


def state_dict(weights: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A CPU torch state dict (what ``ArrayRecord(...)`` takes) from a model, a state dict or numpy.

    Numpy arrays become C-contiguous tensors (sharing memory when they already are); the bytes sent are
    the same either way. 0-d arrays stay 0-d (``np.ascontiguousarray`` would make them 1-d, and a
    BatchNorm's ``num_batches_tracked`` would then no longer load).
    """
    import torch

    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor)
            else torch.from_numpy(np.asarray(v, order="C")) for k, v in weights.items()}


def payload_bytes(messages: Iterable[Any]) -> int:
    """Bytes of the records carried by Flower ``messages`` (error replies carry none)."""
    total = 0
    for msg in messages:
        if msg.has_error():
            continue
        for record in msg.content.values():
            try:
                total += int(record.count_bytes())
            except IndexError:  # Flower 1.41 fails on a ConfigRecord holding an empty list (SecAgg+)
                total += int(type(record)({k: v for k, v in record.items()
                                           if not (isinstance(v, list) and not v)}).count_bytes())
    return total


def site_of(msg: Any) -> str:
    """The site name a reply reports (``config['site-id']``), or its node id."""
    try:
        return str(msg.content[CONFIG][SITE_ID])
    except (KeyError, TypeError, ValueError):
        return f"node-{msg.metadata.src_node_id}"
