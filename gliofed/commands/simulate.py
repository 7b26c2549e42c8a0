"""`gliofed simulate`: a whole multi-site federation on one machine (heavy imports stay inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simulations.runner import SimulationSpec

D = SimulationSpec()  # the simulation's defaults (named and explained in SimulationSpec)

def simulate(
    out: Annotated[Path, typer.Option("--out", help="Run folder (report, rounds.jsonl, model/).")],
    task: Annotated[str, typer.Option(help="grading | typing | rano | recurrence | qtm.")] = D.task,
    cohort: Annotated[
        Path | None, typer.Option(help="Cohort folder to partition (default: generate one).")
    ] = None,
    sites: Annotated[int, typer.Option(help="Number of simulated sites.")] = D.sites,
    partition: Annotated[
        str, typer.Option(help="iid | dirichlet:ALPHA | quantity:ALPHA | site | fets:CSV.")
    ] = D.partition,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = D.rounds,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox, fedadam, fedyogi, fedavgm, scaffold, "
                                          "fedmedian, fedtrimmedavg, krum, multikrum, bulyan.")] = D.strategy,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = D.local_epochs,
    size: Annotated[int, typer.Option(help="Cubic input size (and synthetic volume size).")] = D.size,
    cases: Annotated[int, typer.Option(help="Synthetic cohort size (without --cohort).")] = D.cases,
    held_out_test: Annotated[int, typer.Option(
        help="More synthetic sessions in the test split only (without --cohort): a larger pooled test "
             "set, training cases unchanged.")] = D.held_out_test,
    recurrence_ratio: Annotated[float, typer.Option(
        help="Recurrence share of a generated recurrence cohort (default: the clinical mix; 0.5 "
             "gives a balanced one).")] = D.recurrence_ratio,
    network: Annotated[str, typer.Option(help="Network ('' = the task's default).")] = D.network,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = D.lr,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = D.batch_size,
    seed: Annotated[int, typer.Option(help="Seed for cohort, partition and training.")] = D.seed,
    cpus_per_client: Annotated[int, typer.Option(help="Ray CPUs per simulated site.")] = D.cpus_per_client,
    gpus_per_client: Annotated[
        float, typer.Option(help="Ray GPU share per site (used only with CUDA).")
    ] = D.gpus_per_client,
    no_baselines: Annotated[
        bool, typer.Option("--no-baselines", help="Skip centralised and local-only baselines.")
    ] = False,
    ray_address: Annotated[
        str, typer.Option(help="Join an existing Ray cluster ('auto' or HOST:PORT); sites-root and "
                               "the cohort must be on a filesystem every node sees.")
    ] = "",
    engine: Annotated[
        str, typer.Option(help="ray: Flower's simulation engine; inprocess: the sites answer one after "
                               "the other in this process (same round loop and ClientApp, no Ray "
                               "start-up; for sweeps of small runs).")
    ] = D.engine,
    prepare_only: Annotated[
        bool, typer.Option("--prepare-only", help="Only write the site folders and print the "
                                                  "`flwr run` command that trains on them.")
    ] = False,
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="Extra run-config KEY=VALUE (repeat).")
    ] = None,
    cross_site: Annotated[bool, typer.Option(
        "--cross-site/--no-cross-site",
        help="Score the global and every local-only model on every site's test split (a heatmap).")
    ] = D.cross_site,
    loso: Annotated[bool, typer.Option(
        "--loso", help="Leave-one-site-out: one more federation per site, each scored on the site "
                       "it left out (K extra federations).")] = D.loso,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show Flower's INFO log and the simulated sites' own output.")] = D.verbose,
    min_report_cases: Annotated[int, typer.Option(
        help="Each simulated site's node config min-report-cases: fewest test cases behind a metric "
             "it sends (synthetic patients; a real site's default is 10).")] = 1,
) -> None:
    """Partition a cohort into sites, run the federation with Flower's simulation engine and the
    centralised / local-only baselines on the same splits, and write RUN_DIR/report.html."""
    from rich.console import Console

    from simulations.runner import prepare_sites, run_config_for

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
        held_out_test=held_out_test, recurrence_ratio=recurrence_ratio,
        network=network, lr=lr, batch_size=batch_size, cpus_per_client=cpus_per_client,
        gpus_per_client=gpus_per_client, baselines=not no_baselines, extra=extra,
        ray_address=ray_address, engine=engine, min_report_cases=min_report_cases, cross_site=cross_site,
        loso=loso, verbose=verbose,
    )
    try:
        if prepare_only:
            from shared.tasks import get_task
            from simulations.partition import class_table

            sites_root, coh, part = prepare_sites(spec, console.print)
            print_class_table(class_table(coh, get_task(task), part))
            raw = run_config_for(spec, sites_root).to_flower()
            keys = ("task", "num-server-rounds", "local-epochs", "strategy", "network", "input-size",
                    "sites-root", "run-dir", "min-available-nodes")
            overrides = " ".join(f"{k}={_toml(raw[k])}" for k in keys)
            typer.echo(f"flwr run . --stream -c '{overrides}' --federation-config "
                       f"'num-supernodes={len(part.sites)} client-resources-num-cpus={cpus_per_client}'")
            return
        from simulations.runner import simulate as run_simulate

        report = run_simulate(spec, console.print, show_table=print_class_table)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"report: {report}")


def print_class_table(rows: list[dict]) -> None:
    """The per-site class table (``simulations.partition.class_table`` rows) as a rich table."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title="patients per site (cases per class and split)")
    for col in rows[0]:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("simulate")(simulate)
