"""The training half of a round, as the round loop sees it: one call in, one :class:`TrainOutcome` out.

``server/rounds.py`` owns everything a round does around training (quorum, eligibility, evaluation,
run log, checkpoints); a train step only decides how the sites' updates become new global weights.
Two steps exist: :class:`PlainTrainStep` here (the strategy sends the weights, the sites reply with
theirs, the strategy aggregates) and ``server.secagg.SecAggTrainStep`` (Flower's SecAgg+ exchange: the
server learns only the sum). A new kind of round (SCAFFOLD's control variates, say) is a new step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from server.fedbn import keep_global_norm
from server.quorum import SubsetGrid
from server.running_stats import averaged_running_stats
from server.strategy import accepted_replies
from shared.config import RunConfig
from shared.contract import METRICS, is_number, payload_bytes, site_of


@dataclass
class TrainOutcome:
    """What one round's training produced (the round loop turns it into the run-log row)."""

    arrays: ArrayRecord | None  # the new global weights; None = the model is unchanged
    sampled: int  # sites asked to train
    replied: int  # sites whose update went into the aggregate
    trained: dict[str, dict[str, Any]]  # site -> the train metrics it reported
    metrics: dict[str, float]  # the aggregated train metrics
    sent: int  # bytes sent for training
    received: int  # bytes received for training
    row: dict[str, Any] = field(default_factory=dict)  # extra run-log entries of this kind of step


class TrainStep(Protocol):
    label: str  # shown in the round's log line

    def __call__(self, grid: Grid, rnd: int, arrays: ArrayRecord, trainers: list[int],
                 eligible: dict[int, dict[str, int]]) -> TrainOutcome: ...


class PlainTrainStep:
    """Send-and-aggregate with a Message-API strategy (sampling, FedProx's mu, central DP inside it)."""

    label = "plain"

    def __init__(self, run: RunConfig, strategy: Any) -> None:
        self.run, self.strategy = run, strategy

    def __call__(self, grid: Grid, rnd: int, arrays: ArrayRecord, trainers: list[int],
                 eligible: dict[int, dict[str, int]]) -> TrainOutcome:
        run, strategy = self.run, self.strategy
        strategy.min_train_nodes = min(run.min_train_nodes, len(trainers))
        if hasattr(strategy, "num_sampled_clients"):  # central DP: noise scales with sites
            strategy.num_sampled_clients = len(trainers)
        out = list(strategy.configure_train(rnd, arrays, ConfigRecord(), SubsetGrid(grid, trainers)))
        replies = list(grid.send_and_receive(out, timeout=run.round_timeout))
        good = accepted_replies(replies, run, "train", global_arrays=arrays)
        new_arrays, aggregated = strategy.aggregate_train(rnd, good) if good else (None, None)
        new_arrays = averaged_running_stats(new_arrays, good, run, strategy)
        if run.fedbn and new_arrays is not None:
            new_arrays = keep_global_norm(new_arrays, run, arrays)
        return TrainOutcome(
            arrays=new_arrays,
            sampled=len(out),
            replied=len(good),
            trained={site_of(m): dict(m.content[METRICS]) for m in good},
            metrics={k: float(v) for k, v in (aggregated or {}).items() if is_number(v)},
            sent=payload_bytes(out),
            received=payload_bytes(replies),
        )
