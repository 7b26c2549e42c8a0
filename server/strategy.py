"""Strategy factory, server-optimiser state, and the one place replies are filtered before aggregation.

``build_strategy(run)`` maps run config ``strategy`` to a ``flwr.serverapp.strategy`` class. The round
loop (``server/rounds.py``) uses only the strategies' ``configure_*``/``aggregate_train`` methods, so
sampling (quorum deadline, eligible sites) and reply filtering stay under our control.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import strategy as S

from shared import records as R
from shared.config import RunConfig

log = logging.getLogger(__name__)

STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
# attributes that hold a strategy's server-side optimiser state (FedOpt m/v, FedAvgM momentum)
STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")


def build_strategy(run: RunConfig) -> S.Strategy:
    """The Flower strategy named by ``run.strategy`` (wrapped for central DP when ``dp = "central"``)."""
    base = _build_base_strategy(run)
    if run.dp == "central":
        from server.privacy import wrap_central_dp

        return wrap_central_dp(base, run)
    return base


def _build_base_strategy(run: RunConfig) -> S.Strategy:
    common: dict[str, Any] = {
        "fraction_train": run.fraction_train,
        "fraction_evaluate": run.fraction_evaluate,
        "min_train_nodes": run.min_train_nodes,
        "min_evaluate_nodes": run.min_evaluate_nodes,
        "min_available_nodes": 0,  # the quorum is waited for (with a deadline) in server.quorum
        "weighted_by_key": R.NUM_EXAMPLES,
        "arrayrecord_key": R.ARRAYS,
        "configrecord_key": R.CONFIG,
    }
    name = run.strategy.lower()
    if name == "fedavg":
        return S.FedAvg(**common)
    if name == "fedprox":
        return S.FedProx(**common, proximal_mu=run.proximal_mu)
    if name == "fedadam":
        return S.FedAdam(**common, eta=run.server_lr, eta_l=run.lr)
    if name == "fedyogi":
        return S.FedYogi(**common, eta=run.server_lr, eta_l=run.lr)
    if name == "fedavgm":
        return S.FedAvgM(
            **common, server_learning_rate=1.0, server_momentum=run.server_momentum
        )
    if name == "fedmedian":
        return S.FedMedian(**common)
    if name == "fedtrimmedavg":
        return S.FedTrimmedAvg(**common, beta=run.trimmed_beta)
    if name == "krum":
        return S.Krum(**common, num_malicious_nodes=run.num_malicious)
    if name == "multikrum":
        return S.MultiKrum(**common, num_malicious_nodes=run.num_malicious)
    if name == "bulyan":
        return S.Bulyan(**common, num_malicious_nodes=run.num_malicious)
    raise ValueError(f"run config: strategy={run.strategy!r} is not one of {', '.join(STRATEGIES)}")


def strategy_state(strategy: S.Strategy) -> dict[str, Any]:
    """The strategy's server-optimiser state as plain numpy (for checkpoints)."""
    state: dict[str, Any] = {}
    strategy = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the real strategy
    for attr in STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        if hasattr(value, "to_numpy_ndarrays"):  # an ArrayRecord (FedAvgM.current_arrays)
            value = {k: a.numpy() for k, a in value.items()}
        if isinstance(value, dict):
            state[attr] = {k: np.array(v, copy=True) for k, v in value.items()}
        elif isinstance(value, list):
            state[attr] = [np.array(v, copy=True) for v in value]
        else:
            state[attr] = value
    return state


def restore_strategy_state(strategy: S.Strategy, state: dict[str, Any]) -> None:
    """Put checkpointed optimiser state back into a freshly built strategy."""
    from flwr.app import Array, ArrayRecord

    strategy = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the real strategy
    for attr, value in state.items():
        current = getattr(strategy, attr, "missing")
        if current == "missing":
            continue
        if attr == "current_arrays" and isinstance(strategy, S.FedAvgM):
            value = ArrayRecord({k: Array(np.asarray(v)) for k, v in value.items()})
        setattr(strategy, attr, value)


def site_of(msg: Message) -> str:
    """The site name a reply reports (``config['site-id']``), or its node id."""
    try:
        cfg = msg.content[R.CONFIG]
        return str(cfg[R.SITE_ID])
    except (KeyError, TypeError, ValueError):
        return f"node-{msg.metadata.src_node_id}"


def accepted_replies(replies: Iterable[Message], run: RunConfig, phase: str,
                     global_arrays: Any = None) -> list[Message]:
    """THE place replies are filtered before aggregation (``phase`` is "train" or "evaluate").

    Drops error replies (logged), runs update validation when ``validate-updates`` is on, and sorts by
    site so aggregation sums in the same order on every run (bitwise-identical resume).
    """
    ok: list[Message] = []
    for msg in replies:
        if msg.has_error():
            log.warning("%s: site %s replied with an error: %s", phase,
                        msg.metadata.src_node_id, msg.error.reason)
            continue
        ok.append(msg)
    if run.validate_updates and phase == "train" and ok:
        from server.validation import validate_replies  # update validation (security work)

        ok = list(validate_replies(ok, run, global_arrays))
    return sorted(ok, key=site_of)


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the records carried by ``messages`` (ArrayRecord + Metric/ConfigRecords)."""
    total = 0
    for msg in messages:
        if msg.has_error():
            continue
        for record in msg.content.values():
            try:
                total += int(record.count_bytes())
            except IndexError:  # Flower 1.41 fails on a ConfigRecord holding an empty list (SecAgg+)
                total += int(ConfigRecord({k: v for k, v in record.items()
                                           if not (isinstance(v, list) and not v)}).count_bytes())
    return total
