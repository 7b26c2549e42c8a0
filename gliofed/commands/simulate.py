"""`gliofed simulate`: a whole multi-site federation on one machine (heavy imports stay inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def simulate(
    out: Annotated[Path, typer.Option("--out", help="Run folder (report, rounds.jsonl, model/).")],
    task: Annotated[str, typer.Option(help="grading | typing | rano | recurrence | qtm.")] = "grading",
    cohort: Annotated[
        Path | None, typer.Option(help="Cohort folder to partition (default: generate one).")
    ] = None,
    sites: Annotated[int, typer.Option(help="Number of simulated sites.")] = 3,
    partition: Annotated[
        str, typer.Option(help="iid | dirichlet:ALPHA | quantity:ALPHA | site | fets:CSV.")
    ] = "dirichlet:1.0",
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox, fedadam, fedyogi, fedavgm, "
                                          "fedmedian, fedtrimmedavg, krum, multikrum, bulyan.")] = "fedavg",
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 3,
    size: Annotated[int, typer.Option(help="Cubic input size (and synthetic volume size).")] = 32,
    cases: Annotated[int, typer.Option(help="Synthetic cohort size (without --cohort).")] = 160,
    network: Annotated[str, typer.Option(help="Network ('' = the task's default).")] = "small_cnn",
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for cohort, partition and training.")] = 0,
    cpus_per_client: Annotated[int, typer.Option(help="Ray CPUs per simulated site.")] = 1,
    gpus_per_client: Annotated[
        float, typer.Option(help="Ray GPU share per site (used only with CUDA).")
    ] = 0.25,
    no_baselines: Annotated[
        bool, typer.Option("--no-baselines", help="Skip centralised and local-only baselines.")
    ] = False,
    ray_address: Annotated[
        str, typer.Option(help="Join an existing Ray cluster ('auto' or HOST:PORT); sites-root and "
                               "the cohort must be on a filesystem every node sees.")
    ] = "",
    prepare_only: Annotated[
        bool, typer.Option("--prepare-only", help="Only write the site folders and print the "
                                                  "`flwr run` command that trains on them.")
    ] = False,
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="Extra run-config KEY=VALUE (repeat).")
    ] = None,
    min_report_cases: Annotated[int, typer.Option(
        help="Each simulated site's node config min-report-cases: fewest test cases behind a metric "
             "it sends (synthetic patients; a real site's default is 10).")] = 1,
) -> None:
    """Partition a cohort into sites, run the federation with Flower's simulation engine and the
    centralised / local-only baselines on the same splits, and write RUN_DIR/report.html."""
    from rich.console import Console

    from simulations.runner import SimulationSpec, echo_table, prepare_sites, run_config_for

    console = Console(stderr=True)
    extra: dict[str, str] = {}
    for item in config or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--config {item!r}: expected KEY=VALUE")
        extra[key.strip()] = value.strip()
    spec = SimulationSpec(
        task=task, cohort=cohort, sites=sites, partition=partition, rounds=rounds, out=out,
        strategy=strategy, local_epochs=local_epochs, size=size, cases=cases, seed=seed,
        network=network, lr=lr, batch_size=batch_size, cpus_per_client=cpus_per_client,
        gpus_per_client=gpus_per_client, baselines=not no_baselines, extra=extra,
        ray_address=ray_address, min_report_cases=min_report_cases,
    )
    try:
        if prepare_only:
            from shared.tasks import get_task
            from simulations.partition import class_table

            sites_root, coh, part = prepare_sites(spec, console.print)
            echo_table(class_table(coh, get_task(task), part))
            raw = run_config_for(spec, sites_root)
            keys = ("task", "num-server-rounds", "local-epochs", "strategy", "network", "input-size",
                    "sites-root", "run-dir", "min-available-nodes")
            overrides = " ".join(f"{k}={_toml(raw[k])}" for k in keys)
            typer.echo(f"flwr run . --stream -c '{overrides}' --federation-config "
                       f"'num-supernodes={len(part.sites)} client-resources-num-cpus={cpus_per_client}'")
            return
        from simulations.runner import simulate as run_simulate

        report = run_simulate(spec, console.print)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"report: {report}")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("simulate")(simulate)
