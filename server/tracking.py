"""MLflow experiment tracking for a finished run folder (optional: ``pip install gliofed[tracking]``).

``log_run(run_dir, uri)`` records one MLflow run: the run config as parameters, every round's metrics
(pooled, weighted, central, train, per site by site-id, seconds, bytes, bootstrap CI bounds) with the
round as the step, and as artifacts the report (HTML + PNGs), the run log files and the exported model
bundle. The ServerApp calls it at the end of a deployed run when ``tracking-uri`` is set, ``gliofed
simulate`` after its baselines, and ``gliofed track RUN_DIR`` for any run folder. Open the store with
``mlflow ui --backend-store-uri URI``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

EXPERIMENT = "gliofed"
LOG_FILES = ("report.html", "sites.log", "rounds.jsonl", "status.json", "run_config.json",
             "summary.json", "eval_counts.jsonl")
_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _mlflow():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise RuntimeError("MLflow tracking needs the optional extra: pip install 'gliofed[tracking]'") \
            from None
    return MlflowClient


def default_uri(run_dir: str | Path) -> str:
    """A SQLite store next to the run folder: RUN_DIR/../mlflow.db (one store for a folder of runs)."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def artifact_root(uri: str) -> str | None:
    """Where a SQLite store keeps artifacts (beside the database, not in the current directory)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def round_metrics(row: dict[str, Any], cis: dict[str, Any] | None = None) -> dict[str, float]:
    """Flat MLflow metric names -> values for one rounds.jsonl row."""
    out: dict[str, float] = {}
    for group in ("pooled", "weighted", "central", "train"):
        for key, value in (row.get(group) or {}).items():
            out[f"{group}/{key}"] = value
    for site, metrics in (row.get("sites") or {}).items():
        for key, value in metrics.items():
            out[f"site/{site}/{key}"] = value
    for site, value in (row.get("site_train_seconds") or {}).items():
        out[f"site/{site}/train_seconds"] = value
    for key in ("seconds", "bytes_sent", "bytes_received", "replied", "failed"):
        if key in row:
            out[f"round/{key}"] = row[key]
    for key, (lo, hi) in ((cis or {}).get("pooled") or {}).items():
        out[f"pooled/{key}_ci_low"], out[f"pooled/{key}_ci_high"] = lo, hi
    return {_BAD.sub("_", k): float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_run(run_dir: str | Path, uri: str = "", experiment: str = EXPERIMENT) -> str:
    """Record the run folder in the MLflow store at ``uri``; returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    from server.evalci import round_cis
    from server.runlog import read_rounds

    client_cls = _mlflow()
    run_dir = Path(run_dir).resolve()
    rows = read_rounds(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no rounds.jsonl rows to track")
    uri = uri or default_uri(run_dir)
    client = client_cls(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_root(uri))
    cfg_path = run_dir / "run_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    mode = "simulation" if (run_dir / "summary.json").is_file() else "deployment"
    run = client.create_run(exp_id, run_name=run_dir.name, tags={
        "gliofed.run_dir": str(run_dir), "gliofed.mode": mode, "gliofed.task": str(cfg.get("task", ""))})
    rid = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in sorted(cfg.items())]
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i:i + 100])
    cis = round_cis(run_dir)
    metrics: list[Metric] = []
    for row in rows:
        stamp = int(float(row.get("time", 0)) * 1000)
        metrics += [Metric(k, v, stamp, int(row["round"]))
                    for k, v in round_metrics(row, cis.get(int(row["round"]))).items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(rid, metrics=metrics[i:i + 500])
    client.log_batch(rid, tags=[RunTag("gliofed.rounds", str(len(rows)))])
    for name in LOG_FILES:
        if (run_dir / name).is_file():
            client.log_artifact(rid, str(run_dir / name))
    for png in sorted(run_dir.glob("*.png")):
        client.log_artifact(rid, str(png), "report")
    if (run_dir / "model").is_dir():
        client.log_artifacts(rid, str(run_dir / "model"), "model")
    client.set_terminated(rid)
    return rid
