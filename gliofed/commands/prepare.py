"""`gliofed site prepare`: a hospital's raw scans (DICOM or NIfTI) become a site folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gliofed.commands.data import site_app


@site_app.command("prepare")
def site_prepare(
    raw_dir: Annotated[Path, typer.Argument(help="Raw scans (DICOM folders / NIfTI; read only).")],
    out: Annotated[Path, typer.Option("--out", help="Site folder to write (cohort.csv + NIfTI).")],
    spacing: Annotated[float, typer.Option(help="Output voxel size, mm (template grid).")] = 1.0,
    workers: Annotated[int, typer.Option(help="Sessions in parallel (0: one per core).")] = 0,
    rules: Annotated[Path | None, typer.Option(help="Sequence-recognition rules TOML.")] = None,
    sessions: Annotated[Path | None, typer.Option(
        help="sessions.csv to use (default: RAW_DIR/sessions.csv, else OUT/sessions.csv).")] = None,
    accept_inferred: Annotated[bool, typer.Option(
        "--accept-inferred", help="Go on with the sessions inferred from the DICOM.")] = False,
    deformable: Annotated[bool, typer.Option(
        "--deformable", help="Add a B-spline stage to the template registration.")] = False,
) -> None:
    """DICOM to NIfTI, N4, co-registration, template alignment, skull stripping, de-identification, QC.

    Exit 0 when every session was prepared, 1 when some failed (the others are written), 2 when
    nothing could start, 3 when sessions were inferred and wait for review.
    """
    from client.prepare import PrepareError, prepare_site

    try:
        res = prepare_site(raw_dir, out, spacing=spacing, workers=workers or None, rules=rules,
                           sessions_csv=sessions, accept_inferred=accept_inferred,
                           deformable=deformable, progress=True)
    except PrepareError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    for w in res.warnings:
        typer.echo(f"warning: {w}")
    for e in res.errors:
        typer.secho(f"error: {e}", fg="red")
    if res.stopped_for_review:
        typer.echo(f"inferred sessions written to {res.inferred}: check and edit it, then run again "
                   "(it is picked up from there), or pass --accept-inferred")
        raise typer.Exit(3)
    typer.echo(f"{len(res.prepared)} session(s) prepared, {len(res.resumed)} already done, "
               f"{len(res.errors)} failed")
    if res.cohort_csv:
        typer.echo(f"cohort: {res.cohort_csv}\nQC: {res.qc_html}\nnext: gliofed site check {res.site}")
    if res.errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """`site prepare` joins the `site` group on import (the group is added by commands.data)."""
