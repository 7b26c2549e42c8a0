"""`gliofed synth`: write a synthetic multi-site brain-tumour cohort (heavy imports stay inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simulations.cohort_mix import RECURRENCE_RATIO


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write (cohort.csv + images/).")],
    cases: Annotated[int, typer.Option(help="Imaging sessions (a RANO pair counts two).")] = 200,
    sites: Annotated[int, typer.Option(help="Number of sites (site-1 .. site-K).")] = 4,
    shape: Annotated[int | None, typer.Option(help="N^3 grid over the brain (default 64).")] = None,
    spacing: Annotated[
        float | None, typer.Option(help="Voxel size in mm on the MNI field of view (2.0 -> 99x117x95).")
    ] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks to serve.")] = (
        "grading,typing,rano,recurrence"
    ),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
    near_threshold: Annotated[
        float, typer.Option(help="0: RANO SPD ratios >= 10 points from the cut-offs; 1: anywhere.")
    ] = 0.0,
    recurrence_ratio: Annotated[
        float, typer.Option(help="Fraction of recurrence (vs radiation necrosis) cases.")
    ] = RECURRENCE_RATIO,
    lesion_scale: Annotated[
        float, typer.Option(help="Multiply lesion sizes (e.g. 1.3 for a test cohort of larger lesions).")
    ] = 1.0,
    held_out_test: Annotated[int, typer.Option(
        help="More sessions (HT... patients, other random draws, every site's class mix the same) "
             "marked split=test: a larger test set; the other cases stay as without it.")] = 0,
    gallery: Annotated[Path | None, typer.Option(help="Also write a class gallery PNG.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Write a synthetic cohort on MNI152 anatomy whose labels follow from the image content."""
    import time

    from rich.console import Console

    from simulations.synth import generate_cohort

    console = Console(stderr=True)
    if shape is not None and spacing is not None:
        raise typer.BadParameter("give --shape or --spacing, not both")
    if not 0.0 <= near_threshold <= 1.0:
        raise typer.BadParameter(f"--near-threshold {near_threshold} is outside 0-1")
    if held_out_test < 0:
        raise typer.BadParameter(f"--held-out-test {held_out_test} is negative")
    if not 0.0 <= recurrence_ratio <= 1.0:
        raise typer.BadParameter(f"--recurrence-ratio {recurrence_ratio} is outside 0-1")
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip())
    t0 = time.perf_counter()
    try:
        generate_cohort(
            out, cases=cases, sites=sites, shape=shape, spacing=spacing, tasks=task_list, seed=seed,
            workers=workers, progress=not quiet, near_threshold=near_threshold,
            recurrence_ratio=recurrence_ratio, lesion_scale=lesion_scale, held_out_test=held_out_test,
        )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    elapsed = time.perf_counter() - t0
    from shared.cohort import read_cohort
    from shared.tasks import class_counts, get_task, select_samples

    cohort = read_cohort(out, seed=seed)
    console.print(f"wrote {len(cohort.cases)} sessions to {out} in {elapsed:.1f} s")
    for t in task_list:
        spec = get_task(t)
        samples, _ = select_samples(spec, cohort)
        counts = ", ".join(f"{k} {v}" for k, v in class_counts(spec, samples).items())
        console.print(f"  {t}: {len(samples)} eligible ({counts})")
    if gallery is not None:
        from simulations.synth.gallery import write_gallery

        console.print(f"gallery: {write_gallery(out, gallery)}")


def register(app: typer.Typer) -> None:
    """Add ``gliofed synth`` to the top-level app."""
    app.command("synth")(synth)
