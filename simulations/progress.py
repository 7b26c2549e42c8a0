"""What a simulation shows while the federation runs: one line per finished round, nothing else.

:class:`QuietFlower` keeps Flower's INFO lines and its ``run_simulation`` deprecation notice off the
screen (warnings and errors still show); :class:`RoundWatcher` follows ``RUN_DIR/rounds.jsonl`` from a
background thread and reports each finished round's pooled headline metric with its CI and n.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from shared.config import RunConfig

NOISE = ("DEPRECATED FEATURE", "deprecated feature", "entirely in future versions of Flower")


class _Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        text = record.getMessage()
        return not any(n in text for n in NOISE)


class QuietFlower:
    """Context manager: filter the ``flwr`` logger (INFO and the deprecation notice) while enabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._filter = _Filter()

    def __enter__(self) -> Self:
        if self.enabled:
            logging.getLogger("flwr").addFilter(self._filter)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("flwr").removeFilter(self._filter)


def round_line(row: dict[str, Any], run: RunConfig) -> str:
    """``round 2/5: pooled auc 0.913 [0.842, 0.969] (n=40), 3/3 sites, 12.1 s``."""
    from shared.tasks import get_task

    key = get_task(run.task).headline_metric
    pooled = row.get("pooled") or {}
    value = pooled.get(key)
    ci = ((row.get("ci") or {}).get("pooled") or {}).get(key)
    shown = f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "n/a"
    if ci:
        shown += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    n = int(pooled.get("num_examples", 0) or 0)
    return (f"round {row['round']}/{run.num_server_rounds}: pooled {key} {shown} (n={n}), "
            f"{row.get('replied', '?')}/{row.get('sampled', '?')} sites, {row.get('seconds', 0):.1f} s")


class RoundWatcher:
    """Context manager: echo each new row of ``run_dir/rounds.jsonl`` (polled once a second)."""

    def __init__(self, run_dir: Path, run: RunConfig, echo: Callable[[str], Any] | None) -> None:
        self.path = Path(run_dir) / "rounds.jsonl"
        self.run, self.echo = run, echo
        self._stop = threading.Event()
        self._seen = 0
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        if self.echo is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for line in lines[self._seen:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return  # a half-written line: read it again next time
            self._seen += 1
            self.echo(round_line(row, self.run))

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._poll()

    def __enter__(self) -> Self:
        if self.path.is_file():  # a resumed run: only the new rounds
            self._seen = len(self.path.read_text(encoding="utf-8").splitlines())
        if self.echo is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._poll()
