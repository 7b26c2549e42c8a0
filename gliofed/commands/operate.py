"""Operating a federation: `gliofed dashboard`, `gliofed report`, `gliofed track` (any run folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (simulate --out, or a deployed run-dir).")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    token: Annotated[str | None, typer.Option(help="Access token (required off loopback); open "
                                                   "the page as http://HOST:PORT/?token=T.")] = None,
) -> None:
    """A live, read-only web page of a run: sites and heartbeats, round progress, metrics with CIs,
    learning curves, training time per site, bytes, privacy budget, best round, report and model."""
    from server.dashboard.app import check_bind, serve
    from server.dashboard.data import RunDirError, check_run_dir

    try:
        check_run_dir(run_dir)
        check_bind(host, token)
    except (RunDirError, ValueError) as exc:
        _fail(str(exc))
    suffix = f"?token={token}" if token else ""
    typer.echo(f"dashboard of {run_dir.resolve()} on http://{host}:{port}/{suffix} (Ctrl-C stops it)")
    serve(run_dir, host=host, port=port, token=token)


def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (simulation or deployed run).")],
) -> None:
    """Render RUN_DIR/report.html (learning curves, per-site metrics with CIs, bytes, time per round)."""
    from server.dashboard.data import RunDirError, check_run_dir
    from server.report import write_run_report

    try:
        check_run_dir(run_dir)
        path = write_run_report(run_dir)
    except (RunDirError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"report: {path}")


def track(
    run_dir: Annotated[Path, typer.Argument(help="Run folder to record.")],
    uri: Annotated[str, typer.Option(help="MLflow tracking URI ('' = sqlite:///RUN_DIR/../mlflow.db).")]
    = "",
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "gliofed",
) -> None:
    """Record a run folder in MLflow (config, per-round metrics, report, model); needs the optional
    extra `tracking` (pip install gliofed with it)."""
    from server.dashboard.data import RunDirError, check_run_dir
    from server.tracking import default_uri, log_run

    try:
        check_run_dir(run_dir)
        uri = uri or default_uri(run_dir)
        run_id = log_run(run_dir, uri, experiment)
    except (RunDirError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    typer.echo(f"MLflow run {run_id} in {uri}; open it with: mlflow ui --backend-store-uri {uri}")


def register(app: typer.Typer) -> None:
    """Add `dashboard`, `report` and `track`."""
    app.command("dashboard")(dashboard)
    app.command("report")(report)
    app.command("track")(track)
