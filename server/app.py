"""Flower ServerApp: parse the run config, run the round loop, export the global model."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config (``pyproject.toml`` or ``-c`` overrides)."""
    from server.export import export_global_model, federation_provenance
    from server.rounds import run_rounds
    from shared.config import RunConfig

    run = RunConfig.from_flower(context.run_config)
    result = run_rounds(grid, run)
    last = result.rounds[-1] if result.rounds else {}
    model_dir = Path(run.run_dir) / "model"
    export_global_model(
        result.arrays,
        run,
        model_dir,
        federation_provenance(run, result.sites, len(result.rounds)),
        {"pooled": last.get("pooled", {}), "central": last.get("central", {})},
    )
    log.info("global model exported to %s", model_dir)
