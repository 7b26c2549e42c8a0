"""Flower ServerApp: the run config, parsed once, drives the round loop; the global model is exported.

``make_server_app(defaults)`` bakes a run config in (``run_simulation`` hands apps an empty one);
values from ``flwr run`` / ``-c`` still override the defaults. ``secagg = true`` makes the round loop
use the SecAgg+ train step (``server/secagg.py``); the loop and the export are the same.
``server/status.py`` watches the grid (status.json, sites.log) and the run ends with ``report.html``
and, with ``tracking-uri`` set on a deployed run, an MLflow record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.config import RunConfig

log = logging.getLogger(__name__)


def serve(grid: Grid, run: RunConfig | Mapping[str, Any]) -> Path:
    """Run the federation and export the global model; returns the MODEL_DIR."""
    from server.model import export_global_model, federation_provenance, selection_provenance
    from server.rounds import run_rounds
    from server.status import RunStatus

    run = run if isinstance(run, RunConfig) else RunConfig.from_flower(run)
    status = RunStatus(run, mode="simulation" if run.sites_root else "deployment")
    grid = status.watch(grid)
    try:
        with status.marked_on_flower_exit():
            result = run_rounds(grid, run, status.round_done)
    except BaseException as err:
        status.failed(err)
        raise
    chosen = selection_provenance(run, result)
    arrays = result.best_arrays if chosen["exported"] == "best" else result.arrays
    row = next((r for r in result.rounds if r["round"] == chosen["round"]), {})
    model_dir = Path(run.run_dir) / "model"
    export_global_model(
        arrays,
        run,
        model_dir,
        {**federation_provenance(run, result.sites, result.rounds), "selection": chosen},
        {"round": chosen["round"], "pooled": row.get("pooled", {}), "central": row.get("central", {}),
         "val": (row.get("val") or {}).get("pooled", {})},
    )
    log.info("global model of round %s (%s) exported to %s", chosen["round"], chosen["reason"],
             model_dir)
    finish(run, status, model_dir)
    return model_dir


def finish(run: Any, status: Any, model_dir: Path) -> None:
    """End of a run: report.html, MLflow (deployed runs; a simulation logs after its baselines)."""
    from server.report import write_run_report

    try:
        log.info("report written to %s", write_run_report(run.run_dir))
    except Exception as err:  # noqa: BLE001 - a report failure must not lose the trained model
        log.warning("report.html not written: %s", err)
    if run.tracking_uri and not run.sites_root:
        from server.tracking import log_run

        log_run(run.run_dir, run.tracking_uri)
    status.finished(model_dir)


def make_server_app(defaults: RunConfig | Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to ``defaults`` (a RunConfig or flat kebab-case keys)."""
    base = defaults if isinstance(defaults, RunConfig) else RunConfig.from_flower(defaults)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, base.overridden(dict(context.run_config)))

    return server_app


app = make_server_app()
