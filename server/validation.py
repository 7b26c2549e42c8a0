"""Validate site updates before aggregation: wrong keys or shapes, NaN/Inf, and outlying norms.

A rejected update is logged with its reason and dropped; the round continues with the others.
Reference keys and shapes come from the task's own network (never from another site's reply); norms
are of the update (reply minus the global weights sent this round) and judged against the median of
the round with a median-absolute-deviation rule, so one site cannot set the bar for the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, Message

from server.model import initial_arrays
from shared.config import RunConfig
from shared.contract import ARRAYS, numpy_weights, site_of

log = logging.getLogger(__name__)

NORM_MAD_K = 6.0  # robust z beyond which an update norm is an outlier
NORM_RATIO = 3.0  # ... and it must also exceed this multiple of the median norm


def check_update(
    weights: Mapping[str, np.ndarray], reference: Mapping[str, tuple[int, ...]]
) -> str | None:
    """The reason an update is malformed, or None: missing/extra keys, wrong shapes, NaN/Inf."""
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        return (f"wrong keys (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for k, shape in reference.items():
        if tuple(weights[k].shape) != tuple(shape):
            return f"wrong shape for {k}: {tuple(weights[k].shape)} instead of {tuple(shape)}"
    for k, v in weights.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            return f"NaN/Inf in {k}"
    return None


def norm_outliers(norms: Sequence[float]) -> list[int]:
    """Indices whose norm is far beyond the others (needs at least 3 updates to judge)."""
    x = np.asarray(norms, dtype=np.float64)
    if len(x) < 3:
        return []
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med))) * 1.4826
    scale = max(mad, 1e-12 + 0.05 * med)
    return [i for i, v in enumerate(x) if (v - med) / scale > NORM_MAD_K and v > NORM_RATIO * med]


@lru_cache(maxsize=8)
def _reference_shapes(task: str, network: str, input_size: int, dp: str, seed: int):
    """Keys and shapes of the model the server starts from (cached per model identity)."""
    run = RunConfig(task=task, network=network, input_size=input_size, dp=dp, seed=seed)
    return {k: tuple(a.shape) for k, a in initial_arrays(run).items()}


def reference_shapes(run: RunConfig) -> dict[str, tuple[int, ...]]:
    return dict(_reference_shapes(run.task, run.network, run.input_size, run.dp, run.seed))


def validate_replies(replies: Iterable[Message], run: RunConfig,
                     global_arrays: ArrayRecord | None = None) -> list[Message]:
    """Replies that pass; each rejection is logged with the site and the reason."""
    ref = reference_shapes(run)
    ok: list[Message] = []
    updates: list[dict[str, np.ndarray]] = []
    for msg in replies:
        try:
            weights = numpy_weights(msg.content[ARRAYS])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("rejected update from %s: no readable weights (%s)", site_of(msg), exc)
            continue
        reason = check_update(weights, ref)
        if reason:
            log.warning("rejected update from %s: %s", site_of(msg), reason)
            continue
        ok.append(msg)
        updates.append(weights)
    if global_arrays is not None and len(ok) >= 3:
        g = numpy_weights(global_arrays)
        norms = [float(np.sqrt(sum(float(((u[k] - g[k]).astype(np.float64) ** 2).sum())
                                   for k in g if np.issubdtype(u[k].dtype, np.floating))))
                 for u in updates]
        bad = set(norm_outliers(norms))
        med = float(np.median(norms))
        for i in sorted(bad):
            log.warning("rejected update from %s: update norm %.4g is far beyond the median %.4g",
                        site_of(ok[i]), norms[i], med)
        ok = [m for i, m in enumerate(ok) if i not in bad]
    return ok
