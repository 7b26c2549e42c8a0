"""UCSF-PDGM: UCSF-PDGM-####_nifti folders; grade from the metadata CSV (WHO 2-3 -> LGG, 4 -> HGG)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from shared.importers.base import ImportErrorForUser, relpath, track

SEQS = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR", "seg": "tumor_segmentation"}
_DIR = re.compile(r"UCSF-PDGM-(\d{3,4})(?:_(FU\w+))?_nifti")


def _pad(pid: str) -> str:
    """UCSF-PDGM-004 (metadata) -> UCSF-PDGM-0004 (folder names)."""
    m = re.fullmatch(r"UCSF-PDGM-(\d+)", pid.strip())
    return f"UCSF-PDGM-{int(m.group(1)):04d}" if m else pid.strip()


def read_grades(src: Path) -> dict[str, str]:
    files = sorted(src.rglob("UCSF-PDGM-metadata*.csv"))
    if not files:
        raise ImportErrorForUser(f"{src}: UCSF-PDGM-metadata_v*.csv not found (it carries the grade)")
    out = {}
    with files[-1].open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"ID", "WHO CNS Grade"} <= set(reader.fieldnames or []):
            raise ImportErrorForUser(f"{files[-1]}: header lacks ID and WHO CNS Grade")
        for r in reader:
            g = (r.get("WHO CNS Grade") or "").strip()
            if g in ("2", "3"):
                out[_pad(r["ID"])] = "LGG"
            elif g == "4":
                out[_pad(r["ID"])] = "HGG"
    return out


def collect(src: Path, out: Path):
    grades = read_grades(src)
    rows, skipped = [], []
    for folder in track(sorted(p for p in src.rglob("*_nifti") if p.is_dir()), "reading cases"):
        m = _DIR.fullmatch(folder.name)
        if not m:
            continue
        patient = f"UCSF-PDGM-{int(m.group(1)):04d}"
        stem = folder.name.removesuffix("_nifti")
        row: dict[str, str] = {"case_id": stem, "patient_id": patient,
                               "timepoint": m.group(2) or "baseline"}
        missing = []
        for col, suffix in SEQS.items():
            p = folder / f"{stem}_{suffix}.nii.gz"
            if p.is_file():
                row[col] = relpath(p, out)
            elif col != "seg":
                missing.append(suffix)
        if missing:
            skipped.append((stem, f"missing {', '.join(missing)} in {folder}"))
            continue
        if patient in grades:
            row["grade"] = grades[patient]
        else:
            skipped.append((stem, "no WHO grade in the metadata (kept without label)"))
        rows.append(row)
    return rows, skipped
