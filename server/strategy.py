"""Strategy factory, server-optimiser state, and the one place replies are filtered before aggregation.

``build_strategy(run)`` maps run config ``strategy`` to a ``flwr.serverapp.strategy`` class (the name
and its combinations with ``dp`` were checked when the run config was parsed). The round loop
(``server/rounds.py``) uses only the strategies' ``configure_*``/``aggregate_train`` methods, so
sampling (quorum deadline, eligible sites) and reply filtering stay under our control.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import strategy as flwr_strategy

from server.fedbn import with_global_norm
from server.privacy import wrap_central_dp
from server.validation import validate_replies
from shared.config import STRATEGIES, RunConfig
from shared.contract import ARRAYS, CONFIG, NUM_EXAMPLES, numpy_weights, site_of, state_dict

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "accepted_replies", "build_strategy", "restore_strategy_state",
           "strategy_state"]

# attributes that hold a strategy's server-side optimiser state (FedOpt m/v, FedAvgM momentum,
# SCAFFOLD's server control variate)
STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector", "control_variate")


def build_strategy(run: RunConfig) -> flwr_strategy.Strategy:
    """The Flower strategy named by ``run.strategy`` (wrapped for central DP when ``dp = "central"``)."""
    base = _build_base_strategy(run)
    return wrap_central_dp(base, run) if run.dp == "central" else base


def _build_base_strategy(run: RunConfig) -> flwr_strategy.Strategy:
    common: dict[str, Any] = {
        "fraction_train": run.fraction_train,
        "fraction_evaluate": run.fraction_evaluate,
        "min_train_nodes": run.min_train_nodes,
        "min_evaluate_nodes": run.min_evaluate_nodes,
        "min_available_nodes": 0,  # the quorum is waited for (with a deadline) in server.quorum
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS,
        "configrecord_key": CONFIG,
    }
    name = run.strategy.lower()
    if name == "fedavg":
        return flwr_strategy.FedAvg(**common)
    if name == "fedprox":
        return flwr_strategy.FedProx(**common, proximal_mu=run.proximal_mu)
    if name == "fedadam":
        return flwr_strategy.FedAdam(**common, eta=run.effective_server_lr(), eta_l=run.lr)
    if name == "fedyogi":
        return flwr_strategy.FedYogi(**common, eta=run.effective_server_lr(), eta_l=run.lr)
    if name == "fedavgm":
        return flwr_strategy.FedAvgM(
            **common, server_learning_rate=run.effective_server_lr(),
            server_momentum=run.server_momentum)
    if name == "scaffold":
        from server.scaffold import Scaffold

        return Scaffold(**common, server_lr=run.effective_server_lr())
    if name == "fedmedian":
        return flwr_strategy.FedMedian(**common)
    if name == "fedtrimmedavg":
        return flwr_strategy.FedTrimmedAvg(**common, beta=run.trimmed_beta)
    if name == "krum":
        return flwr_strategy.Krum(**common, num_malicious_nodes=run.num_malicious)
    if name == "multikrum":
        return flwr_strategy.MultiKrum(**common, num_malicious_nodes=run.num_malicious)
    if name == "bulyan":
        return flwr_strategy.Bulyan(**common, num_malicious_nodes=run.num_malicious)
    raise ValueError(f"run config: strategy={run.strategy!r} is not one of {', '.join(STRATEGIES)}")


def strategy_state(strategy: flwr_strategy.Strategy) -> dict[str, Any]:
    """The strategy's server-optimiser state as plain numpy (for checkpoints)."""
    state: dict[str, Any] = {}
    strategy = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the real strategy
    for attr in STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        if hasattr(value, "to_numpy_ndarrays"):  # an ArrayRecord (FedAvgM.current_arrays)
            value = numpy_weights(value)
        if isinstance(value, dict):
            state[attr] = {k: np.array(v, copy=True) for k, v in value.items()}
        elif isinstance(value, list):
            state[attr] = [np.array(v, copy=True) for v in value]
        else:
            state[attr] = value
    return state


def restore_strategy_state(strategy: flwr_strategy.Strategy, state: dict[str, Any]) -> None:
    """Put checkpointed optimiser state back into a freshly built strategy."""
    strategy = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the real strategy
    for attr, value in state.items():
        current = getattr(strategy, attr, "missing")
        if current == "missing":
            continue
        if attr == "current_arrays" and isinstance(strategy, flwr_strategy.FedAvgM):
            value = ArrayRecord(state_dict(value))
        setattr(strategy, attr, value)


def accepted_replies(replies: Iterable[Message], run: RunConfig, phase: str,
                     global_arrays: Any = None) -> list[Message]:
    """THE place replies are filtered before aggregation (``phase`` is "train" or "evaluate").

    Drops error replies (logged), gives train replies the global normalisation layers under FedBN
    (``server/fedbn.py``: the server averages only the rest), runs update validation when
    ``validate-updates`` is on, and sorts by site so aggregation sums in the same order on every run
    (bitwise-identical resume).
    """
    ok: list[Message] = []
    for msg in replies:
        if msg.has_error():
            log.warning("%s: site %s replied with an error: %s", phase,
                        msg.metadata.src_node_id, msg.error.reason)
            continue
        ok.append(msg)
    if run.fedbn and phase == "train" and global_arrays is not None:
        ok = with_global_norm(ok, run, global_arrays)
    if run.validate_updates and phase == "train" and ok:
        ok = list(validate_replies(ok, run, global_arrays))
    return sorted(ok, key=site_of)
