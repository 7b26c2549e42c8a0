"""The run log: one JSON line per round in ``RUN_DIR/rounds.jsonl`` plus TensorBoard events.

On resume, lines for rounds that are redone are dropped so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


class RunLog:
    """Append-only per-round record of a federated run."""

    def __init__(self, run_dir: str | Path, first_round: int = 1, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "rounds.jsonl"
        kept = [r for r in read_rounds(self.path) if r.get("round", 0) < first_round]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=first_round)
            except ImportError:  # tensorboard missing: the JSON log still has everything
                self._writer = None

    def write(self, row: dict[str, Any]) -> None:
        """Append one round's row and mirror its scalars to TensorBoard."""
        row = _finite(row)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self._writer is None:
            return
        step = int(row["round"])
        for group in ("pooled", "weighted", "central", "train"):
            for key, value in (row.get(group) or {}).items():
                if isinstance(value, (int, float)) and value is not None:
                    self._writer.add_scalar(f"{group}/{key}", value, step)
        for key, value in ((row.get("val") or {}).get("pooled") or {}).items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"val/{key}", value, step)
        for site, metrics in (row.get("sites") or {}).items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._writer.add_scalar(f"site/{site}/{key}", value, step)
        for key in ("seconds", "bytes_sent", "bytes_received"):
            if key in row:
                self._writer.add_scalar(f"round/{key}", row[key], step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_rounds(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a rounds.jsonl file (missing file: empty list; a torn last line is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / "rounds.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
