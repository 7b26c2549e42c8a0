"""The federated round loop: quorum, eligible sites, train, evaluate, log, checkpoint; one loop for all.

Flower's ``Strategy.start`` runs rounds in memory with no deadline on the quorum and no resume; this loop
uses the same strategy objects (``configure_train``/``aggregate_train``/``configure_evaluate``) but owns
sampling, reply filtering, the run log and checkpoints, so an interrupted server resumes bit-exactly.
The training half of a round is a pluggable step (``server/train_step.py``): plain send-and-aggregate,
or the SecAgg+ exchange (``server/secagg.py``) when the run sets ``secagg = true``. Everything else a
round does (and any new per-round feature) is written once, here.
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
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from server.checkpoint import (
    Checkpoint,
    clear_best,
    load_checkpoint,
    read_round,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from server.model import central_evaluator, initial_arrays
from server.personal import evaluate_config, personal_row
from server.pooled import round_metrics
from server.privacy import central_epsilon, noisy_rounds
from server.quorum import SubsetGrid, query_eligibility, wait_for_quorum
from server.runlog import RunLog
from server.secagg import SecAggTrainStep
from server.selection import Selection, mark_best_round, validate_round
from server.strategy import accepted_replies, build_strategy, restore_strategy_state, strategy_state
from server.train_step import PlainTrainStep, TrainOutcome, TrainStep
from shared.config import RunConfig
from shared.contract import (
    ELIGIBLE_PREFIX,
    ELIGIBLE_TOTAL,
    METRICS,
    TRAIN_SECONDS,
    numpy_weights,
    payload_bytes,
    site_of,
    state_dict,
)
from shared.round_average import STATE_KEY, RoundAverage

log = logging.getLogger(__name__)


@dataclass
class FederationResult:
    arrays: ArrayRecord  # the final global model (with global-ema: the final moving average)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    selection: Selection | None = None  # the best round by pooled validation score
    best_arrays: ArrayRecord | None = None  # its global model (None: no round had a score)
    stopped_early: bool = False  # early-stop-patience ended the run before num-server-rounds


def start_state(run: RunConfig, run_dir: Path, strategy: Any = None
                ) -> tuple[ArrayRecord, list, int, dict | None]:
    """Seeded initial weights, or the checkpoint's (weights, history, RNG, strategy state) on resume.

    Returns (global weights, round rows so far, first round to run, the checkpoint's ``global-ema``
    average or None).
    """
    random.seed(run.seed)
    np.random.seed(run.seed)
    arrays = initial_arrays(run)
    ckpt = load_checkpoint(run_dir) if run.resume else None
    if ckpt is None:
        return arrays, [], 1, None
    if strategy is not None:
        restore_strategy_state(strategy, ckpt.strategy_state)
    restore_rng(ckpt.rng_state)
    log.info("resuming after round %d from %s", ckpt.round, run_dir / "checkpoints")
    return (ArrayRecord(state_dict(ckpt.weights)), list(ckpt.history), ckpt.round + 1,
            ckpt.strategy_state.get(STATE_KEY))


def holders(nodes: list[int], eligible: dict[int, dict[str, int]], split: str) -> list[int]:
    """The nodes whose eligibility counts name cases of ``split`` (test or val)."""
    return [n for n in nodes
            if any(k.startswith(f"{ELIGIBLE_PREFIX}{split}-") for k in eligible.get(n, {}))]


def participants(grid: Grid, run: RunConfig, eligible: dict[int, dict[str, int]]
                 ) -> tuple[list[int], list[int], list[int], int, int]:
    """Wait for the quorum, ask new nodes what they hold (``eligible`` is updated in place).

    Returns (nodes with training data, with a test split, with a validation split, query bytes sent,
    received).
    """
    nodes = wait_for_quorum(grid, run)
    new = [n for n in nodes if n not in eligible]
    q_sent = q_recv = 0
    if new:
        found, q_sent, q_recv = query_eligibility(grid, new, run)
        eligible.update(found)
    trainers = [n for n in nodes if eligible.get(n, {}).get(ELIGIBLE_TOTAL, 0) > 0]
    testers = holders(nodes, eligible, "test")
    return trainers, testers, holders(nodes, eligible, "val"), q_sent, q_recv


def evaluate_round(grid: Grid, run: RunConfig, rnd: int, strategy: Any, arrays: ArrayRecord,
                   testers: list[int], config: ConfigRecord | None = None
                   ) -> tuple[list, list, dict[str, Any]]:
    """Federated evaluation of ``arrays`` on the testers; (messages out, replies, round metrics).
    ``config``: the evaluate messages' options (personalisation asks for fine-tuning with it)."""
    e_out: list = []
    e_replies: list = []
    if testers and run.fraction_evaluate > 0:
        strategy.min_evaluate_nodes = min(run.min_evaluate_nodes, len(testers))
        e_out = list(strategy.configure_evaluate(rnd, arrays, config or ConfigRecord(),
                                                 SubsetGrid(grid, testers)))
        e_replies = list(grid.send_and_receive(e_out, timeout=run.round_timeout))
    site_eval = {site_of(m): dict(m.content[METRICS])
                 for m in accepted_replies(e_replies, run, "evaluate")}
    return e_out, e_replies, round_metrics(site_eval)


def traffic(train: TrainOutcome, e_out: list, e_replies: list, q_sent: int, q_recv: int,
            arrays: ArrayRecord, v_out: list, v_replies: list) -> dict[str, Any]:
    """The run log's byte counters for one round (v_*: the validation messages)."""
    e_sent, e_recv = payload_bytes(e_out), payload_bytes(e_replies)
    v_sent, v_recv = payload_bytes(v_out), payload_bytes(v_replies)
    return {"bytes_sent": train.sent + e_sent + v_sent + q_sent,
            "bytes_received": train.received + e_recv + v_recv + q_recv,
            "bytes": {"train_sent": train.sent, "train_received": train.received,
                      "eval_sent": e_sent, "eval_received": e_recv,
                      "val_sent": v_sent, "val_received": v_recv,
                      "query_sent": q_sent, "query_received": q_recv,
                      "model": int(arrays.count_bytes())}}


def train_step_for(run: RunConfig, strategy: Any) -> TrainStep:
    """The train step the run asks for: SecAgg+ with ``secagg = true``, else plain."""
    return SecAggTrainStep(run) if run.secagg else PlainTrainStep(run, strategy)


def run_rounds(
    grid: Grid,
    run: RunConfig,
    on_round_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FederationResult:
    """Run (or resume) ``num-server-rounds`` rounds; returns the final global weights and round rows."""
    run_dir = Path(run.run_dir)
    strategy = build_strategy(run)  # sends the evaluate messages; trains too in a plain run
    step = train_step_for(run, strategy)
    arrays, history, first, saved_average = start_state(run, run_dir, strategy)
    smooth = round_average(run, history, saved_average)
    scored = arrays if smooth is None or not history else ArrayRecord(state_dict(smooth.avg))
    selection, best_arrays = best_so_far(run, run_dir, history, scored)
    stopped_early = False
    runlog = RunLog(run_dir, first_round=first)
    central = central_evaluator(run)
    eligible: dict[int, dict[str, int]] = {}
    sites_seen: set[str] = {s for row in history for s in row.get("sites", {})}
    try:
        for rnd in range(first, run.num_server_rounds + 1):
            if selection.should_stop(run.early_stop_patience):
                log.info("early stop before round %d: no better validation %s for %d round(s) "
                         "(best: round %s)", rnd, selection.metric, selection.stale_rounds(),
                         selection.best_round)
                stopped_early = True
                break
            t0 = time.perf_counter()
            trainers, testers, validators, q_sent, q_recv = participants(grid, run, eligible)
            if not trainers:
                raise RuntimeError(f"round {rnd}: no connected site has eligible data for {run.task}")
            train = step(grid, rnd, arrays, trainers, eligible)
            if train.arrays is not None:
                arrays = train.arrays
            weights = numpy_weights(arrays)  # once a round: the finiteness check and the checkpoint
            if train.arrays is not None and not all(
                    np.isfinite(a).all() for a in weights.values() if np.issubdtype(a.dtype, np.floating)):
                log.error("round %d: the aggregated global model holds NaN or infinite values: "
                          "the federation diverged (strategy %s, server-lr %s). Sites refuse it "
                          "(model-not-finite); the best round so far (%s) stays the exported "
                          "model. Lower server-lr or choose another strategy.", rnd, run.strategy,
                          run.effective_server_lr(), selection.best_round)
            t_train = time.perf_counter() - t0
            # what is scored, selected and exported: the aggregate, or its moving average (global-ema)
            average = None if smooth is None else smooth.update(weights)
            scored = arrays if average is None else ArrayRecord(state_dict(average))
            v_out, v_replies, val = validate_round(grid, run, rnd, scored, validators)
            improved = selection.update(rnd, val.get("pooled", {}))
            if improved:
                best_arrays = scored
            last = rnd == run.num_server_rounds or selection.should_stop(run.early_stop_patience)
            e_out, e_replies, fed = evaluate_round(grid, run, rnd, strategy, scored, testers,
                                                   evaluate_config(run, rnd, last))
            sites_seen.update(train.trained)
            row: dict[str, Any] = {
                "round": rnd,
                "time": time.time(),
                "seconds": time.perf_counter() - t0,
                "train_seconds": t_train,
                "site_train_seconds": {s: float(m[TRAIN_SECONDS]) for s, m in train.trained.items()
                                       if TRAIN_SECONDS in m},
                "sampled": train.sampled,
                "replied": train.replied,
                "failed": train.sampled - train.replied,
                **traffic(train, e_out, e_replies, q_sent, q_recv, arrays, v_out, v_replies),
                "train": train.metrics,
                **train.row,
                **fed,
                "val": val,
                "selection": selection.record(val.get("pooled", {})),
                **personal_row(run, e_replies, fed.get("sites", {}), selection.metric),
            }
            if run.dp == "central":
                row["dp"] = {"epsilon": central_epsilon(run, noisy_rounds([*history, row])),
                             "delta": run.target_delta,
                             "mechanism": "site-level, client-side fixed clipping"}
            if central is not None:
                row["central"] = central(scored)
            history.append(row)
            state = strategy_state(strategy)
            if average is not None:
                state[STATE_KEY] = average
            save_checkpoint(run_dir, Checkpoint(rnd, weights, state, rng_state(), history),
                            keep_last=run.keep_checkpoints)
            if improved:
                mark_best_round(run_dir, selection, int(val["pooled"].get("num_examples", 0)))
            runlog.write(row)
            log.info("round %d (%s): %d/%d sites, pooled %s", rnd, step.label, train.replied,
                     train.sampled, fed["pooled"])
            if on_round_end is not None:
                on_round_end(rnd, row)
    finally:
        runlog.close()
    return FederationResult(arrays=scored, rounds=history, sites=sorted(sites_seen),
                            selection=selection, best_arrays=best_arrays, stopped_early=stopped_early)


def round_average(run: RunConfig, history: list[dict[str, Any]],
                  state: dict | None) -> RoundAverage | None:
    """``global-ema``'s moving average (None when off); on resume, ``state`` is the last checkpoint's."""
    if run.global_ema <= 0:
        return None
    if history and not state:
        raise RuntimeError(f"resume with global-ema = {run.global_ema}: the checkpoint of round "
                           f"{history[-1]['round']} holds no moving average (the run was started "
                           "without global-ema); resume with the run's own settings")
    return RoundAverage(run.global_ema, state)


def best_so_far(run: RunConfig, run_dir: Path, history: list[dict[str, Any]],
                arrays: ArrayRecord) -> tuple[Selection, ArrayRecord | None]:
    """The selection state at the start of a run: empty (a stale ``best.json`` is removed), or on
    resume replayed from the run log, with the best round's scored weights read from its checkpoint
    (``arrays``: the last round's scored weights)."""
    selection = Selection.for_run(run, history)
    if not history:
        clear_best(run_dir)
        return selection, None
    if selection.best_round is None:
        return selection, None
    if selection.best_round == history[-1]["round"]:
        return selection, arrays
    best = read_round(run_dir, selection.best_round)
    weights = best.strategy_state.get(STATE_KEY) if run.global_ema > 0 else best.weights
    return selection, ArrayRecord(state_dict(weights))
