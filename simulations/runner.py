"""The simulation harness behind ``gliofed simulate``: cohort -> partition -> federation -> baselines.

Generates a synthetic cohort when none is given, writes one site folder per partition, runs the
ServerApp/ClientApp with Flower's simulation engine (Ray backend, per-client CPU/GPU resources), runs
the centralised and local-only baselines on the same splits, and writes ``RUN_DIR/summary.json`` and
``RUN_DIR/report.html``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import RunConfig


@dataclass
class SimulationSpec:
    """What ``gliofed simulate`` asked for (CLI options, one to one; the CLI takes its defaults here).

    Options that are run-config keys default to :class:`RunConfig`'s values, except these, chosen for
    a demo that finishes in minutes on a laptop and still learns: ``local_epochs = 3`` (small
    synthetic sites need several passes per round, RunConfig: 1), ``network = "small_cnn"`` and
    ``size = 32`` (a 32^3 volume and a small CNN instead of the task's default network and size),
    ``gpus_per_client = 0.25`` (four simulated sites share one GPU when CUDA is present).
    """

    task: str = RunConfig.task
    cohort: Path | None = None
    sites: int = 3
    partition: str = "dirichlet:1.0"
    rounds: int = RunConfig.num_server_rounds
    out: Path = Path("runs/demo")
    strategy: str = RunConfig.strategy
    local_epochs: int = 3  # RunConfig: 1 (see above)
    size: int = 32  # RunConfig input-size: 0 = the task's default
    cases: int = 160
    seed: int = RunConfig.seed
    network: str = "small_cnn"  # RunConfig: "" = the task's default
    lr: float = RunConfig.lr
    batch_size: int = RunConfig.batch_size
    cpus_per_client: int = 1
    gpus_per_client: float = 0.25  # used only when CUDA is present
    baselines: bool = True
    ray_address: str = ""  # "" = start a local Ray; "auto" or HOST:PORT = join an existing cluster
    extra: dict[str, Any] = field(default_factory=dict)  # more run-config keys (kebab-case)
    min_report_cases: int = 1  # node config of every simulated site (synthetic patients)


def run_config_for(spec: SimulationSpec, sites_root: Path) -> RunConfig:
    """The federation's run config (parsed and validated once, here; ``extra`` keys on top)."""
    return RunConfig.from_flower({
        "task": spec.task, "num-server-rounds": spec.rounds, "local-epochs": spec.local_epochs,
        "strategy": spec.strategy, "network": spec.network, "input-size": spec.size,
        "lr": spec.lr, "batch-size": spec.batch_size, "seed": spec.seed,
        "run-dir": str(spec.out.resolve()), "sites-root": str(sites_root.resolve()),
        "min-available-nodes": spec.sites, "quorum-timeout": 120.0,
        "cache-dir": str((spec.out / "cache").resolve()), **spec.extra,
    })


def prepare_sites(spec: SimulationSpec, echo: Any = print) -> tuple[Path, Any, Any]:
    """Generate (if needed) and partition the cohort; returns (sites_root, cohort, partition)."""
    from shared.cohort import read_cohort
    from shared.tasks import get_task
    from simulations.partition import partition_cohort, write_partition

    spec.out.mkdir(parents=True, exist_ok=True)
    cohort_dir = spec.cohort
    if cohort_dir is None and spec.task == "qtm":
        from simulations.qtm_cohort import generate_qtm_cohort

        cohort_dir = spec.out / "cohort"
        if not (cohort_dir / "cohort.csv").is_file():
            echo(f"simulating a DCE cohort: {spec.cases} cases, one acquisition protocol per site, "
                 f"in {cohort_dir}")
            generate_qtm_cohort(cohort_dir, spec.cases, sites=spec.sites, seed=spec.seed, workers=2)
    elif cohort_dir is None:
        from simulations.synth import generate_cohort

        cohort_dir = spec.out / "cohort"
        if not (cohort_dir / "cohort.csv").is_file():
            echo(f"generating a synthetic cohort: {spec.cases} cases, {spec.size}^3, in {cohort_dir}")
            generate_cohort(cohort_dir, cases=spec.cases, sites=max(spec.sites, 2), shape=spec.size,
                            tasks=[spec.task], seed=spec.seed)
    cohort = read_cohort(cohort_dir, seed=spec.seed)
    if cohort.errors:
        raise ValueError(f"{cohort_dir}/cohort.csv: {cohort.errors[0]}")
    task = get_task(spec.task)
    scheme = spec.partition
    if spec.task == "qtm" and scheme == SimulationSpec.partition:
        scheme = "site"  # DCE sites differ by acquisition protocol: keep each protocol at its site
    part = partition_cohort(cohort, task, spec.sites, scheme, seed=spec.seed)
    sites_root = spec.out / "sites"
    write_partition(cohort, part, sites_root)
    return sites_root, cohort, part


def run_federation(spec: SimulationSpec, run: RunConfig, num_sites: int) -> None:
    """Run the ServerApp and ``num_sites`` ClientApps with Flower's Ray simulation engine."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, spec.cpus_per_client)))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import torch
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    gpus = spec.gpus_per_client if torch.cuda.is_available() else 0.0
    run_simulation(
        server_app=make_server_app(run),
        client_app=make_client_app(run, {"min-report-cases": spec.min_report_cases}),
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": spec.cpus_per_client, "num_gpus": gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True,
                          **({"address": spec.ray_address} if spec.ray_address else {})},
        },
    )


def simulate(spec: SimulationSpec, echo: Callable[[str], Any] = print,
             show_table: Callable[[list[dict[str, Any]]], Any] | None = None) -> Path:
    """Everything ``gliofed simulate`` does; returns the report path.

    ``echo`` gets one line per step; ``show_table`` (the CLI renders it) gets the per-site class table
    (``simulations.partition.class_table`` rows) before the federation starts.
    """
    from server.report import write_report
    from server.runlog import read_rounds
    from shared.tasks import get_task
    from simulations.baselines import run_baselines
    from simulations.partition import class_table

    t0 = time.perf_counter()
    sites_root, cohort, part = prepare_sites(spec, echo)
    table = class_table(cohort, get_task(spec.task), part)
    if show_table is not None:
        show_table(table)
    run = run_config_for(spec, sites_root)
    if not run.resume:  # a fresh run must not pick up an old checkpoint
        for stale in ("rounds.jsonl", "checkpoints/last.json", "checkpoints/last.pt", "summary.json"):
            (spec.out / stale).unlink(missing_ok=True)
        # simulated sites' privacy ledgers belong to the run: a fresh run starts with none spent
        for ledger in (spec.out / "privacy").glob("site-*.json"):
            ledger.unlink()
    t_fl = time.perf_counter()
    run_federation(spec, run, len(part.sites))
    fl_seconds = time.perf_counter() - t_fl
    rounds = read_rounds(spec.out)
    if len(rounds) < spec.rounds and not stopped_early(run, rounds):
        raise RuntimeError(f"{spec.out}/rounds.jsonl: the federation finished only {len(rounds)} of "
                           f"{spec.rounds} rounds (see the log above)")
    echo(f"federated ({spec.strategy}, {len(rounds)} rounds, pooled test set): "
         f"{_fmt(rounds[-1].get('pooled', {}))}")
    baselines: dict[str, Any] = {}
    if spec.baselines:
        site_dirs = [sites_root / f"site-{i}" for i in range(len(part.sites))]
        baselines = run_baselines(
            run, site_dirs, progress=lambda name, m: echo(f"{name}: {_fmt(m)}"))
    summary = {
        "spec": {k: str(v) if isinstance(v, Path) else v for k, v in vars(spec).items()},
        "run_config": run.to_flower(), "site_names": list(part.names), "class_table": table,
        "rounds": rounds, "baselines": baselines, "fl_seconds": fl_seconds,
        "total_seconds": time.perf_counter() - t0,
    }
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report = write_report(spec.out, summary)
    if run.tracking_uri:
        from server.tracking import log_run

        echo(f"MLflow run {log_run(spec.out, run.tracking_uri)} in {run.tracking_uri}")
    return report


def stopped_early(run: RunConfig, rounds: list[dict[str, Any]]) -> bool:
    """Whether ``early-stop-patience`` ended the run (no better validation score for that long)."""
    if run.early_stop_patience <= 0 or not rounds:
        return False
    best = (rounds[-1].get("selection") or {}).get("best_round") or 0
    return rounds[-1]["round"] - best >= run.early_stop_patience


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("auc", "balanced_accuracy", "accuracy", "param_mae", "vp-mre-tumour", "ps-mre-tumour")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))
