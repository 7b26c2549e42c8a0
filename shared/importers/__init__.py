"""Importers: write a site's ``cohort.csv`` for public dataset layouts, pointing at the source files.

Images are never copied; only segmentations whose label convention differs from the internal 1/2/4
are converted into ``SITE_DIR/converted/``. Each layout module exposes ``collect(src, out, **kw)``
returning ``(rows, skipped)``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shared.cohort import LABEL_VALUES, write_cohort


class ImportErrorForUser(ValueError):
    """A layout problem the user must fix (wrong folder, missing CSV, ...)."""


@dataclass
class ImportResult:
    cohort_csv: Path
    n_cases: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case, reason): not in cohort.csv
    notes: list[tuple[str, str]] = field(default_factory=list)  # (case, note): written, label left out
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)


_T = TypeVar("_T")
_SHOW_PROGRESS: ContextVar[bool] = ContextVar("gliofed_import_progress", default=False)


def track(items: Iterable[_T], label: str) -> Iterator[_T]:
    """Iterate ``items``, with a transient progress bar on stderr while an import asked for one."""
    items = list(items)
    if not _SHOW_PROGRESS.get() or not items:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=label, console=Console(stderr=True), transient=True)


LAYOUTS = ("brats2020", "brats2021", "brats2023", "fets", "lumiere", "ucsf-pdgm")


def relpath(path: Path, out: Path) -> str:
    """Path of ``path`` relative to the site folder when possible (else absolute)."""
    try:
        return os.path.relpath(path.resolve(), out.resolve())
    except ValueError:  # different drive
        return str(path.resolve())


def run_importer(layout: str, src: str | Path, out: str | Path, progress: bool = False,
                 **kw) -> ImportResult:
    """Import ``src`` in ``layout`` into site folder ``out`` (``progress``: bars on stderr)."""
    from shared.importers import brats, lumiere, ucsf

    collectors = {"brats2020": brats.collect_brats2020, "brats2021": brats.collect_brats2021,
                  "brats2023": brats.collect_brats2023, "fets": brats.collect_fets,
                  "lumiere": lumiere.collect, "ucsf-pdgm": ucsf.collect}
    if layout not in collectors:
        raise ImportErrorForUser(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ImportErrorForUser(f"{src}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    token = _SHOW_PROGRESS.set(progress)
    try:
        rows, skipped = collectors[layout](src, out, **kw)
    finally:
        _SHOW_PROGRESS.reset(token)
    if not rows:
        raise ImportErrorForUser(f"{src}: no {layout} cases found (is this the right layout?)")
    inside = src.resolve().is_relative_to(out.resolve())
    path = write_cohort(out, rows, outside_roots=() if inside else [src])  # images stay in place
    counts = {col: dict(Counter(r[col] for r in rows if r.get(col))) for col in LABEL_VALUES}
    written = {r["case_id"] for r in rows}
    return ImportResult(path, len(rows), [x for x in skipped if x[0] not in written],
                        [x for x in skipped if x[0] in written],
                        {k: v for k, v in counts.items() if v})
