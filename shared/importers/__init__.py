"""Importers: write a site's ``cohort.csv`` for public dataset layouts, pointing at the source files.

Images are never copied; only segmentations whose label convention differs from the internal 1/2/4
are converted into ``SITE_DIR/converted/``. Each layout module exposes ``collect(src, out, **kw)``
returning ``(rows, skipped)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shared.cohort import LABEL_VALUES, write_cohort
from shared.importers import brats, lumiere, ucsf
from shared.importers.base import SHOW_PROGRESS, ImportErrorForUser, relpath, track

__all__ = ["LAYOUTS", "ImportErrorForUser", "ImportResult", "relpath", "run_importer", "track"]


@dataclass
class ImportResult:
    cohort_csv: Path
    n_cases: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case, reason): not in cohort.csv
    notes: list[tuple[str, str]] = field(default_factory=list)  # (case, note): written, label left out
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)


LAYOUTS = ("brats2020", "brats2021", "brats2023", "fets", "lumiere", "ucsf-pdgm")


def run_importer(layout: str, src: str | Path, out: str | Path, progress: bool = False,
                 **kw) -> ImportResult:
    """Import ``src`` in ``layout`` into site folder ``out`` (``progress``: bars on stderr)."""
    collectors = {"brats2020": brats.collect_brats2020, "brats2021": brats.collect_brats2021,
                  "brats2023": brats.collect_brats2023, "fets": brats.collect_fets,
                  "lumiere": lumiere.collect, "ucsf-pdgm": ucsf.collect}
    if layout not in collectors:
        raise ImportErrorForUser(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ImportErrorForUser(f"{src}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    token = SHOW_PROGRESS.set(progress)
    try:
        rows, skipped = collectors[layout](src, out, **kw)
    finally:
        SHOW_PROGRESS.reset(token)
    if not rows:
        raise ImportErrorForUser(f"{src}: no {layout} cases found (is this the right layout?)")
    inside = src.resolve().is_relative_to(out.resolve())
    path = write_cohort(out, rows, outside_roots=() if inside else [src])  # images stay in place
    counts = {col: dict(Counter(r[col] for r in rows if r.get(col))) for col in LABEL_VALUES}
    written = {r["case_id"] for r in rows}
    return ImportResult(path, len(rows), [x for x in skipped if x[0] not in written],
                        [x for x in skipped if x[0] in written],
                        {k: v for k, v in counts.items() if v})
