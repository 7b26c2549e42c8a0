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
from simulations.cohort_mix import RECURRENCE_RATIO


@dataclass
class SimulationSpec:
    """What ``gliofed simulate`` asked for (CLI options, one to one; the CLI takes its defaults here).

    Options that are run-config keys default to :class:`RunConfig`'s values, except these, chosen for
    a demo that finishes in minutes on a laptop and shows what federation is for (measured,
    benchmarks/README.md "Demo"): ``network = "resnet10"`` and ``size = 32`` (a 32^3 whole-brain
    input; ``small_cnn`` measured too slow to find the lesion signal in it: centralised AUC 0.39-0.71
    over 4 epochs with every probability within 0.47-0.60, so a 3-round federation stayed a constant
    predictor), ``rounds = 5`` with ``local_epochs = 1`` (RunConfig: 3 and 1; more, shorter rounds
    keep label-skewed sites from drifting apart), ``cases = 240`` (a 36-case pooled test set),
    ``gpus_per_client = 0.25`` (four simulated sites share one GPU when CUDA is present).
    """

    task: str = RunConfig.task
    cohort: Path | None = None
    sites: int = 3
    partition: str = "dirichlet:1.0"
    rounds: int = 5  # RunConfig: 3 (see above)
    out: Path = Path("runs/demo")
    strategy: str = RunConfig.strategy
    local_epochs: int = RunConfig.local_epochs
    size: int = 32  # RunConfig input-size: 0 = the task's default
    cases: int = 240
    held_out_test: int = 0  # more generated sessions in the test split only (a larger pooled test set)
    recurrence_ratio: float = RECURRENCE_RATIO  # recurrence share of a generated recurrence cohort
    seed: int = RunConfig.seed
    network: str = "resnet10"  # RunConfig: "" = the task's default
    lr: float = RunConfig.lr
    batch_size: int = RunConfig.batch_size
    cpus_per_client: int = 1
    gpus_per_client: float = 0.25  # used only when CUDA is present
    baselines: bool = True
    ray_address: str = ""  # "" = start a local Ray; "auto" or HOST:PORT = join an existing cluster
    engine: str = "ray"  # ray = Flower's simulation engine | inprocess = the sites one after the other
    #                      in this process (simulations.inprocess; no Ray start-up, for sweeps)
    extra: dict[str, Any] = field(default_factory=dict)  # more run-config keys (kebab-case)
    min_report_cases: int = 1  # node config of every simulated site (synthetic patients)
    progress: bool = True  # progress bars (cohort synthesis, baselines)
    cross_site: bool = True  # NVFlare's matrix: local-only and global models on every site's test split
    loso: bool = False  # leave-one-site-out: K more federations, each scored on the site left out
    verbose: bool = False  # Flower's INFO log and the sites' (Ray actors') output on the screen


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

    if spec.held_out_test < 0:
        raise ValueError(f"--held-out-test {spec.held_out_test} is negative")
    if spec.held_out_test and (spec.cohort is not None or spec.task == "qtm"):
        raise ValueError("--held-out-test adds generated cases to a generated cohort: not with --cohort "
                         "or for qtm")
    if not 0.0 < spec.recurrence_ratio < 1.0:
        raise ValueError(f"--recurrence-ratio {spec.recurrence_ratio} must lie strictly between 0 and 1 "
                         "(both classes are needed)")
    mixed = spec.recurrence_ratio != RECURRENCE_RATIO
    if mixed and (spec.cohort is not None or spec.task != "recurrence"):
        raise ValueError("--recurrence-ratio sets the class mix of a generated recurrence cohort: only "
                         "with --task recurrence and without --cohort")
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

        # scanner: one class mix at every site, so the sites differ by scanner profile only
        scanner = spec.partition == "scanner"
        held = f"-ht{spec.held_out_test}" if spec.held_out_test > 0 else ""
        mix = f"-r{spec.recurrence_ratio:g}" if mixed else ""
        cohort_dir = spec.out / (("cohort-scanner" if scanner else "cohort") + mix + held)
        if not (cohort_dir / "cohort.csv").is_file():
            echo(f"generating a synthetic cohort: {spec.cases} cases, {spec.size}^3, in {cohort_dir}"
                 + (" (same class mix at every site)" if scanner else "")
                 + (f", and {spec.held_out_test} held-out test cases" if held else "")
                 + (f", recurrence share {spec.recurrence_ratio:g}" if mixed else ""))
            generate_cohort(cohort_dir, cases=spec.cases, sites=max(spec.sites, 2), shape=spec.size,
                            tasks=[spec.task], seed=spec.seed, progress=spec.progress,
                            label_skew=not scanner, held_out_test=spec.held_out_test,
                            recurrence_ratio=spec.recurrence_ratio)
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


def run_federation(spec: SimulationSpec, run: RunConfig, num_sites: int,
                   echo: Callable[[str], Any] | None = None) -> None:
    """Run the ServerApp and ``num_sites`` ClientApps with Flower's Ray simulation engine.

    In-process ``run_simulation`` (deprecated in Flower 1.41 in favour of ``flwr run``) is kept on
    purpose: the harness partitions, trains baselines and scores the cross-site matrix in the same
    process, and ``flwr run`` rewrites pyproject.toml and leaves a SuperLink running (README). Unless
    ``spec.verbose``, the screen shows progress and results only: Flower's INFO lines and its
    deprecation notice are filtered, Ray's accelerator FutureWarning is answered by setting
    ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` (no GPU share: leave the device variables alone), and the
    sites' own output (Ray actors) stays in Ray's log folder; site failures still come back as error
    replies that the server reports. ``echo`` gets one line per finished round.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, spec.cpus_per_client)))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import torch
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from simulations.progress import QuietFlower, RoundWatcher

    gpus = spec.gpus_per_client if torch.cuda.is_available() else 0.0
    with QuietFlower(enabled=not spec.verbose), RoundWatcher(Path(run.run_dir), run, echo):
        run_simulation(
            server_app=make_server_app(run),
            client_app=make_client_app(run, {"min-report-cases": spec.min_report_cases}),
            num_supernodes=num_sites,
            backend_config={
                "client_resources": {"num_cpus": spec.cpus_per_client, "num_gpus": gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": spec.verbose,
                              **({"address": spec.ray_address} if spec.ray_address else {})},
            },
        )


def run_inprocess(spec: SimulationSpec) -> tuple[list[dict[str, Any]], Any]:
    """Prepare ``spec``'s sites and run only its round loop in process (no export, report or
    baselines: the benchmarks' sweeps); returns the round rows (also in ``spec.out/rounds.jsonl``) and
    the ``simulations.inprocess.InProcessGrid``, whose message log keeps the metrics, not the weights."""
    from server.rounds import run_rounds
    from simulations.inprocess import site_grid

    sites_root, _, part = prepare_sites(spec, echo=lambda *a: None)
    run = run_config_for(spec, sites_root)
    for stale in ("rounds.jsonl", "checkpoints/last.json", "summary.json"):
        (Path(spec.out) / stale).unlink(missing_ok=True)
    grid = site_grid(spec, run, len(part.sites))
    return run_rounds(grid, run).rounds, grid


ENGINES = ("ray", "inprocess")


def federate(spec: SimulationSpec, run: RunConfig, num_sites: int,
             echo: Callable[[str], Any] | None = None) -> None:
    """One federation with ``spec.engine``: Flower's Ray simulation or the in-process sites."""
    if spec.engine == "inprocess":
        from simulations.inprocess import serve_inprocess
        from simulations.progress import QuietFlower, RoundWatcher

        with QuietFlower(enabled=not spec.verbose), RoundWatcher(Path(run.run_dir), run, echo):
            serve_inprocess(spec, run, num_sites)
    else:
        run_federation(spec, run, num_sites, echo)


def simulate(spec: SimulationSpec, echo: Callable[[str], Any] = print,
             show_table: Callable[[list[dict[str, Any]]], Any] | None = None) -> Path:
    """Everything ``gliofed simulate`` does; returns the report path.

    ``echo`` gets one line per step; ``show_table`` (the CLI renders it) gets the per-site class table
    (``simulations.partition.class_table`` rows) before the federation starts.
    """
    from server.report import write_report
    from server.runlog import read_rounds
    from shared.tasks import get_task
    from simulations.partition import class_table

    if spec.engine not in ENGINES:
        raise ValueError(f"engine={spec.engine!r} is not one of {', '.join(ENGINES)}")
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
    federate(spec, run, len(part.sites), echo)
    fl_seconds = time.perf_counter() - t_fl
    rounds = read_rounds(spec.out)
    if len(rounds) < spec.rounds and not stopped_early(run, rounds):
        raise RuntimeError(f"{spec.out}/rounds.jsonl: the federation finished only {len(rounds)} of "
                           f"{spec.rounds} rounds (see the log above)")
    summary = {
        "spec": {k: str(v) if isinstance(v, Path) else v for k, v in vars(spec).items()},
        "run_config": run.to_flower(), "site_names": list(part.names), "class_table": table,
        "rounds": rounds, "fl_seconds": fl_seconds,
    }
    summary.update(evaluate_arms(spec, run, sites_root, len(part.sites), echo))
    summary["total_seconds"] = time.perf_counter() - t0
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report = write_report(spec.out, summary)
    if run.tracking_uri:
        from server.tracking import log_run

        echo(f"MLflow run {log_run(spec.out, run.tracking_uri)} in {run.tracking_uri}")
    return report


def evaluate_arms(spec: SimulationSpec, run: RunConfig, sites_root: Path, num_sites: int,
                  echo: Callable[[str], Any]) -> dict[str, Any]:
    """Baselines (centralised, local-only), the cross-site matrix and leave-one-site-out, as asked."""
    from shared.tasks import get_task
    from simulations.baselines import run_baselines, site_samples, without_models
    from simulations.crosseval import GLOBAL, cross_site_matrix, leave_one_site_out, load_exported

    out: dict[str, Any] = {"baselines": {}}
    classify = bool(get_task(run.task).classes)  # the matrix and LOSO score classification tasks
    # the matrix needs the local-only models, which are baselines
    cross, loso = spec.cross_site and spec.baselines and classify, spec.loso and classify
    if not (spec.baselines or cross or loso):
        return out
    site_dirs = [sites_root / f"site-{i}" for i in range(num_sites)]
    per_site = site_samples(site_dirs, run.task, run.seed)
    global_model = load_exported(run, spec.out / "model") if cross or loso else None
    base: dict[str, Any] = {}
    if spec.baselines or cross:
        base = run_baselines(run, site_dirs, per_site=per_site,
                             progress=lambda name, m: echo(f"{name}: {_fmt(m)}"))
        out["baselines"] = without_models(base)
    if cross:
        models = {GLOBAL: global_model, **{f"local-only {n}": r["model"]
                                           for n, r in base.get("local", {}).items()}}
        out["cross_site"] = cross_site_matrix(run, per_site, models)
    if loso:
        out["loso"] = leave_one_site_out(
            run, sites_root, per_site, global_model,
            lambda sub, k: federate(spec, sub, k), spec.out / "loso", echo)
    return out


def stopped_early(run: RunConfig, rounds: list[dict[str, Any]]) -> bool:
    """Whether ``early-stop-patience`` ended the run (no better validation score for that long)."""
    if run.early_stop_patience <= 0 or not rounds:
        return False
    best = (rounds[-1].get("selection") or {}).get("best_round") or 0
    return rounds[-1]["round"] - best >= run.early_stop_patience


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("auc", "balanced_accuracy", "accuracy", "param_mae", "vp-mre-tumour", "ps-mre-tumour")
    ci = metrics.get("ci") or {}
    shown = [f"{k} {metrics[k]:.3f}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else "")
             for k in keys if isinstance(metrics.get(k), float)]
    n = metrics.get("n", metrics.get("num_examples"))
    return ", ".join(shown) + (f" (n={int(n)})" if isinstance(n, (int, float)) else "")
