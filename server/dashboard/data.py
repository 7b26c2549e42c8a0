"""The dashboard's view of a run folder: one JSON snapshot built from what the ServerApp writes.

Sources: ``status.json`` (sites, states, heartbeats, round in progress and deadline; see
``server/status.py``), ``rounds.jsonl`` (one row per finished round), ``eval_counts.jsonl`` (for
bootstrap CIs), ``run_config.json``, ``checkpoints/`` and ``report.html`` / ``model/``. Works on a run
in progress and on a finished one; a folder with none of these files is refused as foreign.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

MARKERS = ("status.json", "rounds.jsonl", "run_config.json")
LOWER_IS_BETTER = ("param_mae",)
SERVED_FILES = ("report.html", "sites.log", "rounds.jsonl", "status.json", "run_config.json")


class RunDirError(ValueError):
    """RUN_DIR is missing or is not a gliofed run folder."""


def check_run_dir(run_dir: str | Path) -> Path:
    """The resolved RUN_DIR, or a RunDirError that says what is wrong with it."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise RunDirError(f"{path}: no such run folder (start the run first, or check the path)")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a folder; pass the run folder (the ServerApp's run-dir)")
    if not any((path / m).is_file() for m in MARKERS):
        raise RunDirError(f"{path}: not a gliofed run folder (none of {', '.join(MARKERS)}); "
                          "pass the run-dir of `gliofed simulate --out` or of a deployed run")
    return path.resolve()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def headline(task: str) -> str:
    try:
        from shared.tasks import get_task

        return get_task(task).headline_metric
    except (KeyError, ValueError, ImportError):
        return "auc"


def _alive(status: dict[str, Any]) -> bool | None:
    """Whether the ServerApp process that writes ``status`` still runs (None: another host)."""
    pid = status.get("pid")
    if not pid or status.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(int(pid))


def _zombie(pid: int) -> bool:
    """An ended process its parent has not reaped yet (flower-superexec reaps its ServerApps late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): trust os.kill
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class RunView:
    """Builds snapshots of one run folder; caches the bootstrap CIs until the counts file changes."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = check_run_dir(run_dir)
        self._ci_key: tuple[float, int] | None = None
        self._cis: dict[int, Any] = {}

    def signature(self) -> tuple:
        """Changes whenever a file the snapshot reads changes (for server-sent events)."""
        out = []
        for name in (*MARKERS, "eval_counts.jsonl", "report.html"):
            try:
                st = (self.dir / name).stat()
                out.append((name, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((name, 0, 0))
        return tuple(out)

    def cis(self) -> dict[int, Any]:
        from server.evalci import round_cis

        path = self.dir / "eval_counts.jsonl"
        key = (path.stat().st_mtime, path.stat().st_size) if path.is_file() else None
        if key != self._ci_key:
            self._cis, self._ci_key = round_cis(self.dir), key
        return self._cis

    def snapshot(self) -> dict[str, Any]:
        from server.runlog import read_rounds

        status = _json(self.dir / "status.json")
        config = _json(self.dir / "run_config.json")
        rounds = read_rounds(self.dir)
        task = str(config.get("task") or status.get("task") or "grading")
        key = headline(task)
        state = status.get("state") or ("finished" if rounds else "unknown")
        alive = _alive(status)
        if state in ("running", "waiting") and alive is False:
            state = "stopped"
            status["reason"] = "the server process has ended without finishing the run"
        for site in (status.get("sites") or {}).values():  # 64-bit ids: exact as text in JS
            site["node_id"] = str(site.get("node_id", ""))
        cis = self.cis()
        return _finite({
            "run_dir": str(self.dir), "name": self.dir.name, "now": time.time(),
            "task": task, "headline": key, "lower_is_better": key in LOWER_IS_BETTER,
            "state": state, "status": status, "config": config,
            "num_rounds": int(config.get("num-server-rounds") or status.get("num_rounds") or 0),
            "rounds": [_slim(r) for r in rounds],
            "cis": {str(k): v for k, v in cis.items()},
            "epsilon": epsilon_by_site(status, config),
            "best": best_round(rounds, key, self.dir),
            "checkpoints": checkpoints(self.dir),
            "links": {"report": (self.dir / "report.html").is_file(),
                      "model": (self.dir / "model").is_dir(),
                      "sites_log": (self.dir / "sites.log").is_file()},
        })


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("round", "time", "seconds", "train_seconds", "site_train_seconds", "sampled", "replied",
            "failed", "bytes_sent", "bytes_received", "pooled", "weighted", "central", "sites", "dp",
            "train", "secagg")
    return {k: row[k] for k in keep if k in row}


def epsilon_by_site(status: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Per site: epsilon after each round it trained (DP-SGD ledgers report it), and the budget."""
    budget = float(config.get("target-epsilon") or status.get("target_epsilon") or 0) or None
    out: dict[str, Any] = {}
    for rnd, sites in sorted((status.get("site_train") or {}).items(), key=lambda kv: int(kv[0])):
        for site, metrics in sites.items():
            if "dp-epsilon" in metrics:
                out.setdefault(site, {"budget": budget, "rounds": []})["rounds"].append(
                    [int(rnd), float(metrics["dp-epsilon"])])
    for site in out.values():
        site["spent"] = site["rounds"][-1][1]
    return out


def best_round(rounds: list[dict[str, Any]], key: str, run_dir: Path) -> dict[str, Any] | None:
    """The selected best round: the one ``checkpoints/best.json`` names when the server selected one,
    else the round with the best headline metric (server test set when present, else pooled)."""
    group = "central" if any(r.get("central") for r in rounds) else "pooled"
    values = {r["round"]: (r.get(group) or {}).get(key) for r in rounds}
    sel = _json(run_dir / "checkpoints" / "best.json")
    if isinstance(sel.get("round"), int):
        return {"round": sel["round"], "metric": f"{group} {key}", "value": values.get(sel["round"]),
                "source": "checkpoints/best.json"}
    scored = [(n, v) for n, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    if not scored:
        return None
    pick = min if key in LOWER_IS_BETTER else max
    rnd, value = pick(scored, key=lambda t: t[1])
    return {"round": rnd, "metric": f"{group} {key}", "value": value, "source": "rounds.jsonl"}


def checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """The checkpoints kept: ``round-NNNN.pt`` files or ``round-NNNN/`` folders, with their sizes."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix == ".pt":
            out.append({"name": p.name, "bytes": p.stat().st_size})
        elif p.is_dir() and p.name.startswith("round-"):
            out.append({"name": p.name, "bytes": sum(f.stat().st_size for f in p.rglob("*")
                                                     if f.is_file())})
    return out
