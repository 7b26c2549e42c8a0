"""`gliofed qtm ...`: DCE-MRI kinetic fitting (``fit``) and QTMnet (simulate/train/predict/grade).

``qtm_app`` is the group; each command keeps heavy imports (torch, nibabel) inside its function so
``gliofed --help`` stays fast. ``fit`` lives here; the QTMnet commands live in ``qtmnet.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gliofed.commands.qtmnet import add_commands

qtm_app = typer.Typer(
    help="DCE-MRI: kinetic-model fitting and QTMnet (AIF-free quantitative transport mapping).",
    no_args_is_help=True,
)


@qtm_app.command("fit")
def fit_command(
    dce: Annotated[
        Path, typer.Argument(help="4D DCE NIfTI; its JSON sidecar (same stem) gives frame times.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the parameter-map NIfTIs.")],
    model: Annotated[
        str, typer.Option(help="2cxm (Fp, PS, ve, vp) or etofts (Ktrans, ve, vp).")
    ] = "2cxm",
    mask: Annotated[
        Path | None, typer.Option(help="Mask NIfTI of voxels to fit (default: enhancing voxels).")
    ] = None,
    bolus_arrival: Annotated[
        float | None,
        typer.Option(help="AIF start in s (default: sidecar BolusArrivalTime, else estimated)."),
    ] = None,
    fit_delay: Annotated[
        bool, typer.Option(help="Fit a per-voxel arterial delay in [-10, 10] s.")
    ] = True,
    min_peak: Annotated[
        float, typer.Option(help="Without a mask: fit voxels whose peak reaches this (mM).")
    ] = 0.02,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    chunk_size: Annotated[
        int, typer.Option(help="Voxels fitted together (memory vs speed).")
    ] = 20000,
    plot: Annotated[bool, typer.Option(help="Write a quick-look PNG of the maps.")] = True,
) -> None:
    """Fit 2CXM or extended Tofts to every voxel with the Parker population AIF; write maps."""
    import json
    import time

    import nibabel as nib
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from shared.dce.io import read_dce
    from shared.dce.maps import enhancing_mask, fit_series, plot_maps, write_maps

    console = Console()
    try:
        series = read_dce(dce)
        mask_arr = None
        if mask is not None:
            if not mask.is_file():
                raise FileNotFoundError(f"{mask}: mask not found")
            mask_arr = np.asarray(nib.load(str(mask)).dataobj) > 0
            if mask_arr.shape != series.data.shape[:3]:
                raise ValueError(
                    f"{mask}: mask shape {mask_arr.shape} != DCE volume {series.data.shape[:3]}"
                )
        conc = series.concentration()
        selected = mask_arr if mask_arr is not None else enhancing_mask(conc, min_peak)
        n_vox = int(selected.sum())
        start = time.perf_counter()
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"fitting {model}", total=max(n_vox, 1))
            maps, summary = fit_series(
                series,
                model=model,
                mask=selected,
                bolus_arrival_s=bolus_arrival,
                fit_delay=fit_delay,
                min_peak_mM=min_peak,
                device=device,
                chunk_size=chunk_size,
                progress=lambda n: bar.advance(task, n),
            )
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    elapsed = time.perf_counter() - start
    prefix = dce.name.removesuffix(".gz").removesuffix(".nii")
    written = write_maps(maps, series.affine, out, prefix)
    summary["seconds"] = round(elapsed, 3)
    summary["voxels_per_second"] = round(summary["voxels_fitted"] / max(elapsed, 1e-9), 1)
    (out / f"{prefix}_{model}_fit.json").write_text(json.dumps(summary, indent=2))
    if plot:
        written.append(
            plot_maps(maps, selected, out / f"{prefix}_{model}_maps.png", f"{prefix}: {model}")
        )
    console.print(
        f"{model}: {summary['voxels_converged']}/{summary['voxels_fitted']} voxels converged in "
        f"{elapsed:.1f} s (AIF start {summary['bolus_arrival_s']:.1f} s); {len(written)} files in {out}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``qtm`` group (fit here; simulate/train/predict/grade from ``qtmnet``) to the app."""
    add_commands(qtm_app)
    app.add_typer(qtm_app, name="qtm")
