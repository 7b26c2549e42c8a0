"""The federated round loop: quorum, eligible sampling, train, aggregate, evaluate, log, checkpoint.

Flower's ``Strategy.start`` runs rounds in memory with no deadline on the quorum and no resume; this loop
uses the same strategy objects (``configure_train``/``aggregate_train``/``configure_evaluate``) but owns
sampling, reply filtering, the run log and checkpoints, so an interrupted server resumes bit-exactly.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from server.checkpoint import Checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from server.pooled import round_metrics
from server.quorum import SubsetGrid, query_eligibility, wait_for_quorum
from server.runlog import RunLog
from server.strategy import (
    accepted_replies,
    build_strategy,
    payload_bytes,
    restore_strategy_state,
    site_of,
    strategy_state,
)
from shared import records as R
from shared.config import RunConfig, learning_core, train_config_for

log = logging.getLogger(__name__)


@dataclass
class FederationResult:
    arrays: ArrayRecord
    rounds: list[dict[str, Any]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    model_dir: Path | None = None


def arrays_from_numpy(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def numpy_from_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}


def initial_arrays(run: RunConfig) -> ArrayRecord:
    """Weights of a freshly built task model (seeded: every run starts from the same point)."""
    import torch

    from shared.tasks import get_task

    torch.manual_seed(run.seed)
    model = learning_core().build_model(get_task(run.task), train_config_for(run, device="cpu"))
    if run.init_model:
        from shared.training.bundle import load_initial_weights

        load_initial_weights(model, run.init_model)
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def central_evaluator(run: RunConfig) -> Callable[[ArrayRecord], dict[str, float]] | None:
    """Evaluation of the global model on the server's own test cohort (``server-cohort``), if any."""
    if not run.server_cohort:
        return None
    from shared.cohort import read_cohort
    from shared.tasks import get_task, select_samples

    spec = get_task(run.task)
    samples, _ = select_samples(spec, read_cohort(run.server_cohort, seed=run.seed), split="test")
    if not samples:
        raise ValueError(f"{run.server_cohort}: server-cohort has no eligible test cases for {run.task}")
    core = learning_core()
    cfg = train_config_for(run)

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        model = core.build_model(spec, cfg)
        model.load_state_dict(arrays.to_torch_state_dict())
        ev = core.evaluate(model, samples, spec, cfg)
        out = {k: float(v) for k, v in ev.metrics.items() if isinstance(v, (int, float))}
        out["num_examples"] = float(ev.num_examples)
        return out

    return evaluate


def start_state(run: RunConfig, run_dir: Path, strategy: Any = None) -> tuple[ArrayRecord, list, int]:
    """Seeded initial weights, or the checkpoint's (weights, history, RNG, strategy state) on resume.

    Returns (global weights, round rows so far, first round to run).
    """
    random.seed(run.seed)
    np.random.seed(run.seed)
    arrays = initial_arrays(run)
    ckpt = load_checkpoint(run_dir) if run.resume else None
    if ckpt is None:
        return arrays, [], 1
    if strategy is not None:
        restore_strategy_state(strategy, ckpt.strategy_state)
    restore_rng(ckpt.rng_state)
    log.info("resuming after round %d from %s", ckpt.round, run_dir / "checkpoints")
    return arrays_from_numpy(ckpt.weights), list(ckpt.history), ckpt.round + 1


def participants(grid: Grid, run: RunConfig,
                 eligible: dict[int, dict[str, int]]) -> tuple[list[int], list[int], int, int]:
    """Wait for the quorum, ask new nodes what they hold (``eligible`` is updated in place).

    Returns (nodes with training data, nodes with a test split, query bytes sent, received).
    """
    nodes = wait_for_quorum(grid, run)
    new = [n for n in nodes if n not in eligible]
    q_sent = q_recv = 0
    if new:
        found, q_sent, q_recv = query_eligibility(grid, new, run)
        eligible.update(found)
    trainers = [n for n in nodes if eligible.get(n, {}).get(R.ELIGIBLE_TOTAL, 0) > 0]
    testers = [n for n in nodes
               if any(k.startswith(f"{R.ELIGIBLE_PREFIX}test-") for k in eligible.get(n, {}))]
    return trainers, testers, q_sent, q_recv


def evaluate_round(grid: Grid, run: RunConfig, rnd: int, strategy: Any, arrays: ArrayRecord,
                   testers: list[int]) -> tuple[list, list, dict[str, Any]]:
    """Federated evaluation of ``arrays`` on the testers; (messages out, replies, round metrics)."""
    e_out: list = []
    e_replies: list = []
    if testers and run.fraction_evaluate > 0:
        strategy.min_evaluate_nodes = min(run.min_evaluate_nodes, len(testers))
        e_out = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), SubsetGrid(grid, testers)))
        e_replies = list(grid.send_and_receive(e_out, timeout=run.round_timeout))
    site_eval = {site_of(m): dict(m.content[R.METRICS])
                 for m in accepted_replies(e_replies, run, "evaluate")}
    return e_out, e_replies, round_metrics(site_eval)


def traffic(train_sent: int, train_recv: int, e_out: list, e_replies: list, q_sent: int, q_recv: int,
            arrays: ArrayRecord) -> dict[str, Any]:
    """The run log's byte counters for one round."""
    e_sent, e_recv = payload_bytes(e_out), payload_bytes(e_replies)
    return {"bytes_sent": train_sent + e_sent + q_sent,
            "bytes_received": train_recv + e_recv + q_recv,
            "bytes": {"train_sent": train_sent, "train_received": train_recv,
                      "eval_sent": e_sent, "eval_received": e_recv,
                      "query_sent": q_sent, "query_received": q_recv,
                      "model": int(arrays.count_bytes())}}


def run_rounds(
    grid: Grid,
    run: RunConfig,
    on_round_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FederationResult:
    """Run (or resume) ``num-server-rounds`` rounds; returns the final global weights and round rows."""
    run_dir = Path(run.run_dir)
    strategy = build_strategy(run)
    arrays, history, first = start_state(run, run_dir, strategy)
    runlog = RunLog(run_dir, first_round=first)
    central = central_evaluator(run)
    eligible: dict[int, dict[str, int]] = {}
    sites_seen: set[str] = {s for row in history for s in row.get("sites", {})}
    try:
        for rnd in range(first, run.num_server_rounds + 1):
            t0 = time.perf_counter()
            trainers, testers, q_sent, q_recv = participants(grid, run, eligible)
            if not trainers:
                raise RuntimeError(f"round {rnd}: no connected site has eligible data for {run.task}")
            strategy.min_train_nodes = min(run.min_train_nodes, len(trainers))
            if hasattr(strategy, "num_sampled_clients"):  # central DP: noise scales with sites
                strategy.num_sampled_clients = len(trainers)
            train_cfg = ConfigRecord({"local-epochs": run.local_epochs, R.TASK: run.task})
            out = list(strategy.configure_train(rnd, arrays, train_cfg, SubsetGrid(grid, trainers)))
            replies = list(grid.send_and_receive(out, timeout=run.round_timeout))
            t_train = time.perf_counter() - t0
            good = accepted_replies(replies, run, "train", global_arrays=arrays)
            new_arrays, train_agg = strategy.aggregate_train(rnd, good) if good else (None, None)
            if new_arrays is not None:
                arrays = new_arrays
            train_sent, train_recv = payload_bytes(out), payload_bytes(replies)
            e_out, e_replies, fed = evaluate_round(grid, run, rnd, strategy, arrays, testers)
            sites_seen.update(site_of(m) for m in good)
            row: dict[str, Any] = {
                "round": rnd,
                "time": time.time(),
                "seconds": time.perf_counter() - t0,
                "train_seconds": t_train,
                "site_train_seconds": {site_of(m): float(m.content[R.METRICS][R.TRAIN_SECONDS])
                                       for m in good if R.TRAIN_SECONDS in m.content[R.METRICS]},
                "sampled": len(out),
                "replied": len(good),
                "failed": len(replies) - len(good) + (len(out) - len(replies)),
                **traffic(train_sent, train_recv, e_out, e_replies, q_sent, q_recv, arrays),
                "train": {k: float(v) for k, v in (train_agg or {}).items()
                          if isinstance(v, (int, float))},
                **fed,
            }
            if run.dp == "central":
                from server.privacy import central_epsilon

                dp_rounds = sum(1 for r in history if r.get("replied")) + 1
                row["dp"] = {"epsilon": central_epsilon(run, dp_rounds), "delta": run.target_delta,
                             "mechanism": "site-level, client-side fixed clipping"}
            if central is not None:
                row["central"] = central(arrays)
            history.append(row)
            save_checkpoint(run_dir, Checkpoint(rnd, numpy_from_arrays(arrays),
                                                strategy_state(strategy), rng_state(), history),
                            keep_last=run.keep_checkpoints)
            runlog.write(row)
            log.info("round %d: %d/%d sites, pooled %s", rnd, len(good), len(out), fed["pooled"])
            if on_round_end is not None:
                on_round_end(rnd, row)
    finally:
        runlog.close()
    return FederationResult(arrays=arrays, rounds=history, sites=sorted(sites_seen))
