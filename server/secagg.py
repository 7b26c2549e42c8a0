"""Rounds with secure aggregation (SecAgg+): the server learns only the weighted mean of the updates.

Flower 1.41 ships SecAgg+ only for its legacy API: ``SecAggPlusWorkflow`` needs a ``LegacyContext``
with a legacy ``flwr.server.strategy`` strategy (``flwr/server/workflow/secure_aggregation``), and the
sites answer through ``secaggplus_mod`` (``client/secagg.py``). :class:`SecAggTrainStep` is the train
step of the one round loop (``server/rounds.py``, which keeps the quorum deadline, eligibility query,
evaluation, ``rounds.jsonl``, checkpoints and resume): it runs the training half of a round as one
SecAgg+ workflow call (4 message exchanges: keys, key shares, masked updates, unmasking).

Each site uploads ``n_i * (local_i - global)``, quantised and masked; the server unmasks only the sum
and adds the example-weighted mean update to the global model (FedAvg; FedProx adds the proximal term
at the sites). Sites that drop out after sharing their keys are unmasked from their neighbours' shares
as long as ``secagg-reconstruction-threshold`` shares survive. What is *not* masked: each site's example
count and its training metrics (loss, seconds, DP epsilon), which the legacy fit reply carries in
plain text, and the evaluation replies (metrics only, as in a plain run).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from server.train_step import TrainOutcome
from shared.config import RunConfig
from shared.contract import (
    ELIGIBLE_TOTAL,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE_ID,
    is_number,
    numpy_weights,
    payload_bytes,
    state_dict,
)

log = logging.getLogger(__name__)

CLIPPING_RANGE = 8.0  # SecAgg+ clips each weighted update entry to +-8 before quantising (Flower default)


def secagg_plan(run: RunConfig, num_sites: int) -> tuple[int, int]:
    """(key shares per site, shares needed to unmask) for a round with ``num_sites`` sampled sites."""
    if num_sites < 2:
        raise RuntimeError(f"SecAgg+ needs at least 2 sites in a round; {num_sites} can train")
    shares = num_sites if run.secagg_num_shares == 0 else min(run.secagg_num_shares, num_sites)
    threshold = run.secagg_reconstruction_threshold or max(2, shares // 2 + 1)
    if threshold > shares:
        raise RuntimeError(
            f"secagg-reconstruction-threshold={threshold} needs at least {threshold} sites sharing "
            f"keys; this round has {shares} (raise min-available-nodes or lower the threshold)")
    return shares, threshold


def secagg_workflow(run: RunConfig, num_sites: int, max_weight: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow for one round (its int/float conventions handled here)."""
    shares, threshold = secagg_plan(run, num_sites)
    return SecAggPlusWorkflow(
        # a float is a share of the sampled sites / of the shares: 1.0 = all of them
        num_shares=1.0 if shares == num_sites else shares,
        reconstruction_threshold=1.0 if threshold == shares else threshold,
        max_weight=max_weight,
        clipping_range=CLIPPING_RANGE,
        timeout=run.round_timeout,
    )


def _weighted_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    """Example-weighted mean of the sites' numeric train metrics (what FedAvg reports)."""
    total = sum(n for n, _ in results)
    keys = {k for _, m in results for k, v in m.items() if is_number(v)}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in results) / total for k in sorted(keys)} \
        if total > 0 else {}


class MeanUpdateFedAvg(FedAvg):
    """Legacy FedAvg for SecAgg+: every result holds the same unmasked mean update; add it to the global."""

    def __init__(self, run: RunConfig, num_sites: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_sites,
                         min_evaluate_clients=0, min_available_clients=num_sites,
                         on_fit_config_fn=self._fit_config)
        self.run = run
        self.global_ndarrays: list[np.ndarray] = []
        self.new_ndarrays: list[np.ndarray] | None = None
        self.site_results: list[tuple[int, int, dict[str, Any]]] = []  # (node, n, metrics)
        self.num_failures = 0
        self.metrics: dict[str, float] = {}

    def _fit_config(self, server_round: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {SERVER_ROUND: server_round}
        if self.run.strategy.lower() == "fedprox":
            cfg[PROXIMAL_MU] = self.run.proximal_mu
        return cfg

    def configure_fit(self, server_round, parameters, client_manager):
        self.global_ndarrays = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        self.site_results = [(p.node_id, int(r.num_examples), dict(r.metrics)) for p, r in results]
        self.num_failures = len(failures)
        if not results:
            return None, {}
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # same sum in every result
        new = []
        for g, u in zip(self.global_ndarrays, mean_update, strict=True):
            value = g.astype(np.float64) + u
            new.append((np.rint(value) if np.issubdtype(g.dtype, np.integer) else value).astype(g.dtype))
        self.new_ndarrays = new
        self.metrics = _weighted_metrics([(n, m) for _, n, m in self.site_results])
        return ndarrays_to_parameters(new), dict(self.metrics)


class CountingGrid:
    """A Grid view that adds up the bytes of the records sent and received (SecAgg+ overhead)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sent = self.received = 0

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.sent += payload_bytes(messages)
        self.received += payload_bytes(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def secagg_train(grid: Grid, run: RunConfig, rnd: int, arrays: ArrayRecord, nodes: list[int],
                 max_weight: float) -> tuple[MeanUpdateFedAvg, CountingGrid]:
    """One SecAgg+ training round over ``nodes``; the strategy holds the new weights (or None)."""
    counting = CountingGrid(grid)
    strategy = MeanUpdateFedAvg(run, len(nodes))
    clients = SimpleClientManager()
    for nid in nodes:
        clients.register(GridClientProxy(node_id=nid, grid=counting, run_id=0))
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                run_config={}),
                        config=ServerConfig(num_rounds=run.num_server_rounds),
                        strategy=strategy, client_manager=clients)
    params: Parameters = ndarrays_to_parameters(list(numpy_weights(arrays).values()))
    ctx.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(params, True)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: rnd, Key.START_TIME: time.time()})
    secagg_workflow(run, len(nodes), max_weight)(counting, ctx)
    return strategy, counting


class SecAggTrainStep:
    """The train step of a SecAgg+ round: sample, plan the shares, run the workflow, add the mean update."""

    label = "SecAgg+"

    def __init__(self, run: RunConfig) -> None:
        self.run = run

    def __call__(self, grid: Grid, rnd: int, arrays: ArrayRecord, trainers: list[int],
                 eligible: dict[int, dict[str, int]]) -> TrainOutcome:
        run = self.run
        k = max(int(len(trainers) * run.fraction_train), min(run.min_train_nodes, len(trainers)))
        sampled = sorted(random.sample(trainers, min(k, len(trainers))))
        shares, threshold = secagg_plan(run, len(sampled))
        # weights n_i / max_weight <= 1 keep the quantisation fine (Flower's default is 1000)
        max_weight = float(max(eligible[n][ELIGIBLE_TOTAL] for n in sampled))
        strategy, counting = secagg_train(grid, run, rnd, arrays, sampled, max_weight)
        new_arrays = None
        if strategy.new_ndarrays is not None:
            new_arrays = ArrayRecord(state_dict(dict(zip(arrays.keys(), strategy.new_ndarrays,
                                                         strict=True))))
        else:
            log.warning("round %d: secure aggregation halted (too few sites left to unmask); "
                        "the global model is unchanged", rnd)
        trained = {str(m.get(SITE_ID, f"node-{nid}")): m for nid, _, m in strategy.site_results}
        return TrainOutcome(
            arrays=new_arrays, sampled=len(sampled), replied=len(trained), trained=trained,
            metrics=dict(strategy.metrics), sent=counting.sent, received=counting.received,
            row={"secagg": {"num_shares": shares, "reconstruction_threshold": threshold,
                            "max_weight": max_weight, "unmasked": new_arrays is not None}})
