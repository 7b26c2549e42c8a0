"""Global model selection: score each round's NEW global model on the sites' validation splits.

After aggregation the round loop sends the new global weights to every site holding a validation split
(``eval-split = "val"``); the replies pool exactly like the test metrics (summed confusion matrices and
score histograms, ``server/pooled.py``), so the score of round r is the score of round r's model (no
one-round lag as when the next round's training replies carry it). The selection metric is the task's
headline metric (``shared/tasks.py``; lower is better for errors such as ``param_mae``). The best round
so far is kept; on equal scores (a validation AUC of 1.0 is common on small splits) the lower pooled
validation cross-entropy wins, and on a full tie the earlier round stays. With ``select-tolerance``
(relative, 0.01 by default) a later round whose score is within that share of the best score so far (the
peak) takes the place of the earlier one: on a few dozen validation cases the peak of twelve noisy scores
is often an early round that only drew a lucky validation sample (winner's curse), and the later round,
equally good on the evidence, has trained longer (benchmarks/README.md, "Which round to export").
The chosen round is named in ``checkpoints/best.json`` and exported by default (``export = "best"``);
``early-stop-patience`` stops a run that has not had such a round for that many rounds.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.checkpoint import mark_best
from server.pooled import round_metrics
from server.strategy import accepted_replies
from shared.config import RunConfig
from shared.contract import ARRAYS, CONFIG, EVAL_SPLIT, METRICS, SERVER_ROUND, site_of

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("param_mae", "loss", "mae", "rmse")


def selection_metric(run: RunConfig) -> tuple[str, bool]:
    """(metric name, higher is better) used to pick the best round."""
    from shared.tasks import get_task

    name = get_task(run.task).headline_metric
    return name, name not in LOWER_IS_BETTER


def validate_round(grid: Grid, run: RunConfig, rnd: int, arrays: ArrayRecord,
                   validators: list[int]) -> tuple[list, list, dict[str, Any]]:
    """Every validator scores ``arrays`` on its validation split; (messages out, replies, metrics)."""
    if not validators:
        return [], [], {}
    config = ConfigRecord({EVAL_SPLIT: "val", SERVER_ROUND: rnd})
    out = [Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=n,
                   message_type=MessageType.EVALUATE) for n in validators]
    replies = list(grid.send_and_receive(out, timeout=run.round_timeout))
    site_val = {site_of(m): dict(m.content[METRICS])
                for m in accepted_replies(replies, run, "evaluate")}
    return out, replies, round_metrics(site_val) if site_val else {}


@dataclass
class Selection:
    """The best round so far by pooled validation score, and how long since it improved."""

    metric: str
    higher_is_better: bool
    best_round: int | None = None
    best_value: float | None = None
    best_loss: float | None = None  # pooled validation cross-entropy of the best round (tie-break)
    last_round: int = 0
    tolerance: float = 0.0  # relative: a later round within tolerance x |peak| of the peak is chosen
    peak_round: int | None = None  # the first round that reached the best score so far
    peak_value: float | None = None

    @classmethod
    def for_run(cls, run: RunConfig, history: list[dict[str, Any]]) -> Selection:
        """A fresh tracker, or the one a resumed run had (replayed from the run-log rows)."""
        metric, higher = selection_metric(run)
        sel = cls(metric, higher, tolerance=run.select_tolerance)
        for row in history:
            sel.update(int(row["round"]), (row.get("val") or {}).get("pooled", {}))
        return sel

    def update(self, rnd: int, pooled_val: dict[str, Any]) -> bool:
        """Take round ``rnd``'s pooled validation metrics; True when it is the new best."""
        self.last_round = rnd
        value = pooled_val.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        loss = pooled_val.get("cross_entropy")
        loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        value = float(value)
        sign = 1.0 if self.higher_is_better else -1.0
        if self.peak_value is None or sign * (value - self.peak_value) > 0:
            self.peak_round, self.peak_value = rnd, value  # a new peak is always chosen
            self.best_round, self.best_value, self.best_loss = rnd, value, loss
            return True
        within = (self.tolerance > 0
                  and sign * (value - self.peak_value) >= -self.tolerance * abs(self.peak_value))
        tie_won = (value == self.best_value and loss is not None
                   and (self.best_loss is None or loss < self.best_loss))
        if within or tie_won:
            self.best_round, self.best_value, self.best_loss = rnd, value, loss
            return True
        return False

    def stale_rounds(self) -> int:
        """Rounds since the best one (all rounds so far when none has a validation score)."""
        return self.last_round - (self.best_round or 0)

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.stale_rounds() >= patience

    def record(self, pooled_val: dict[str, Any]) -> dict[str, Any]:
        """The run-log entry of one round: its score and the best so far."""
        value = pooled_val.get(self.metric)
        return {"metric": self.metric, "higher_is_better": self.higher_is_better,
                "value": float(value) if isinstance(value, (int, float)) else None,
                "n": int(pooled_val.get("num_examples", 0)),
                "best_round": self.best_round, "best_value": self.best_value,
                "peak_round": self.peak_round, "peak_value": self.peak_value, "tolerance": self.tolerance}


def mark_best_round(run_dir: str | Path, sel: Selection, n: int) -> None:
    """``checkpoints/best.json`` names the best round with the metric and value that chose it."""
    mark_best(run_dir, sel.best_round, metric=sel.metric, value=sel.best_value, n=n,
              split="val", higher_is_better=sel.higher_is_better)


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """The content of ``checkpoints/best.json``, or None when the run has none."""
    path = Path(run_dir) / "checkpoints" / "best.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
