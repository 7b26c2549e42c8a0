"""`gliofed qtm simulate|train|predict|grade`: the transport simulator, QTMnet and the grading experiment.

:func:`add_commands` puts them on the ``qtm`` group that :mod:`gliofed.commands.qtm` owns (this module
imports nothing from it); heavy imports stay inside commands. The library work lives in ``shared.qtm``
(``centralised`` for training, ``grade`` for the grading experiment): these commands parse options, draw
progress bars and print what comes back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _progress(console, total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task(label, total=total)
    return bar, lambda n=1: bar.advance(task, n)


def _device(name: str) -> str:
    """auto -> cuda when present, else cpu; an unavailable cuda is a clear error (shared.dce)."""
    from shared.dce.fit import pick_device

    try:
        return str(pick_device(name))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--shape {text!r}: expected X,Y,Z (e.g. 32,32,16)") from None
    if len(dims) != 3 or min(dims) < 8:
        raise typer.BadParameter(f"--shape {text!r}: three sides, each >= 8 voxels")
    return dims  # type: ignore[return-value]


def simulate_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Site folder to write (cohort.csv + NIfTI).")],
    cases: Annotated[int, typer.Option(help="Cases, alternating LGG/HGG (one patient each).")] = 30,
    sites: Annotated[int, typer.Option(help="Sites; each has its own acquisition protocol.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed (use another one for a held-out cohort).")] = 0,
    shape: Annotated[str, typer.Option(help="Block size X,Y,Z in 2 mm voxels.")] = "32,32,16",
    workers: Annotated[int, typer.Option(help="Processes simulating cases.")] = 2,
    with_concentration: Annotated[bool, typer.Option(
        help="Also write the noise-free 4D concentration of each case.")] = False,
) -> None:
    """Simulate DCE-MRI cases with the fluid-mechanics transport model; write them as a site."""
    from rich.console import Console

    from simulations.qtm_cohort import generate_qtm_cohort

    console = Console()
    dims = _shape(shape)
    bar, step = _progress(console, cases, "simulating")
    with bar:
        try:
            path = generate_qtm_cohort(out, cases, sites=sites, seed=seed, shape=dims, progress=step,
                                       workers=workers, with_concentration=with_concentration)
        except ValueError as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from None
    console.print(f"{cases} cases ({sites} site(s)) written; cohort: {path}")


def train_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="MODEL_DIR to write.")],
    data: Annotated[list[Path] | None, typer.Option(
        help="Site folder(s) from `qtm simulate` (repeatable); default: simulate --cases in memory.")] = None,
    cases: Annotated[int, typer.Option(help="Training cases to simulate when no --data is given.")] = 160,
    val_cases: Annotated[int, typer.Option(help="Held-out simulated cases for the error report.")] = 16,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine decay).")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed for simulation and training.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes simulating cases.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train QTMnet on simulated DCE-MRI only (no AIF), then report map errors on held-out cases."""
    from rich.console import Console

    from shared.cohort import CohortError
    from shared.qtm.centralised import (
        save_centralised,
        simulated_examples,
        site_examples,
        train_centralised,
    )

    console = Console()
    dev = _device(device)
    if data:
        try:
            examples = site_examples(data, seed)
        except (CohortError, ValueError, FileNotFoundError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from None
    else:
        bar, step = _progress(console, cases + val_cases, "simulating")
        with bar:
            examples = simulated_examples(cases, val_cases, seed, workers=workers, progress=step)
    if not examples.train:
        console.print("[red]error:[/red] no training cases")
        raise typer.Exit(2)
    bar, step = _progress(console, epochs, "training QTMnet")
    with bar:
        result = train_centralised(examples, epochs, lr=lr, batch_size=batch_size, device=dev,
                                   seed=seed, progress=lambda epoch, loss: step())
    save_centralised(result, out)
    console.print(f"QTMnet trained on {result.train_cases} cases in {result.seconds:.0f} s; model: {out}")
    for k in ("param_mae", "fp-mre-tumour", "vp-mre-tumour", "ve-mre-tumour", "ps-mre-tumour"):
        if k in result.metrics:
            console.print(f"  held-out {k}: {result.metrics[k]:.3f}")


def predict_command(
    model_dir: Annotated[Path, typer.Argument(help="QTMnet MODEL_DIR (from `gliofed qtm train`).")],
    dce: Annotated[Path, typer.Argument(help="4D DCE NIfTI with its JSON sidecar.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the parameter-map NIfTIs.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Write QTMnet parameter maps (Fp, vp, ve, PS, Ktrans, |u|) for one DCE series; no AIF needed."""
    import time

    import numpy as np
    from rich.console import Console

    from shared.dce.io import read_dce
    from shared.dce.maps import plot_maps, write_maps
    from shared.qtm.bundle import load_qtmnet
    from shared.qtm.net import predict_volume, resample_curves

    console = Console()
    dev = _device(device)
    try:
        model, _ = load_qtmnet(model_dir, dev)
        series = read_dce(dce)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    t0 = time.perf_counter()
    maps = predict_volume(model, resample_curves(series.concentration(), series.times_s), dev)
    seconds = time.perf_counter() - t0
    prefix = dce.name.removesuffix(".gz").removesuffix(".nii") + "_qtmnet"
    written = write_maps(maps, series.affine, out, prefix)
    leaky_z = int(np.argmax(maps["ktrans"].sum(axis=(0, 1))))  # show the slice with the most leakage
    written.append(plot_maps(maps, np.ones(series.data.shape[:3], bool), out / f"{prefix}_maps.png",
                             f"{dce.name}: QTMnet", z=leaky_z))
    console.print(f"QTMnet maps in {seconds:.2f} s; {len(written)} files in {out}")


def grade_command(
    model_dir: Annotated[Path, typer.Argument(help="QTMnet MODEL_DIR.")],
    data: Annotated[Path, typer.Option(help="Held-out site folder from `qtm simulate` (another seed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the table, JSON and ROC plot.")],
    repeats: Annotated[int, typer.Option(help="Cross-validation repeats.")] = 20,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for CV folds and bootstrap.")] = 0,
) -> None:
    """LGG vs HGG from tumour-ROI features: QTMnet maps vs 2CXM (population AIF), AUC with 95% CIs."""
    from rich.console import Console

    from shared.cohort import CohortError, read_cohort
    from shared.qtm.bundle import load_qtmnet
    from shared.qtm.grade import case_maps, plot_grading_roc, run_grading

    console = Console()
    dev = _device(device)
    try:
        model, _ = load_qtmnet(model_dir, dev)
        cohort = read_cohort(data, seed=seed)
    except (FileNotFoundError, ValueError, CohortError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    rows = [c for c in cohort.cases if "dce" in c.images and "seg" in c.images and c.labels.get("grade")]
    if len(rows) < 4:
        console.print(f"[red]error:[/red] {data}: needs >= 4 cases with dce, seg and grade; has {len(rows)}")
        raise typer.Exit(2)
    cases = []
    bar, step = _progress(console, len(rows), "QTMnet + 2CXM per case")
    with bar:
        for c in rows:
            cases.append(case_maps(c, model, dev))
            step()
    result = run_grading(cases, repeats=repeats, n_boot=n_boot, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grading.json").write_text(json.dumps(result.to_json(), indent=2))
    (out / "grading.md").write_text(result.table() + "\n")
    plot_grading_roc(result, out / "grading_roc.png")
    console.print(result.table())
    console.print(f"written: {out / 'grading.md'}, grading.json, grading_roc.png")


def add_commands(group: typer.Typer) -> None:
    """Put simulate, train, predict and grade on the ``qtm`` group."""
    group.command("simulate")(simulate_command)
    group.command("train")(train_command)
    group.command("predict")(predict_command)
    group.command("grade")(grade_command)
