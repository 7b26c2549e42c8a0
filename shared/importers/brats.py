"""BraTS 2020 / 2021 / 2023 (GLI) and FeTS layouts."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from shared.importers.base import ImportErrorForUser, relpath, track
from shared.importers.convert import convert_seg

BRATS_SEQS = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
BRATS23_SEQS = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _case_dirs(src: Path, pattern: str) -> list[Path]:
    rx = re.compile(pattern)
    return sorted(p for p in src.rglob("*") if p.is_dir() and rx.fullmatch(p.name))


def _session_row(folder: Path, out: Path, seqs: dict[str, str], sep: str = "_"):
    cid = folder.name
    row: dict[str, str] = {"case_id": cid, "patient_id": cid}
    missing = []
    for col, suffix in seqs.items():
        p = _find(folder, f"{cid}{sep}{suffix}")
        if p is None and col == "seg":
            # BraTS 2020 (Kaggle) case 355: the seg is named W39_1998.09.19_Segm.nii
            cands = sorted(folder.glob("*[Ss]eg*.nii*"))
            p = cands[0] if cands else None
        if p is None:
            if col != "seg":
                missing.append(col)
            continue
        row[col] = relpath(p, out)
    return row, missing


def _collect(src: Path, out: Path, pattern: str, seqs: dict[str, str], sep: str = "_"):
    rows, skipped = [], []
    seen: dict[str, Path] = {}
    for folder in track(_case_dirs(src, pattern), "reading cases"):
        if folder.name in seen:  # e.g. a second copy of the dataset under SRC
            skipped.append((folder.name, f"duplicate folder {folder} ignored (kept {seen[folder.name]})"))
            continue
        seen[folder.name] = folder
        row, missing = _session_row(folder, out, seqs, sep)
        if missing:
            skipped.append((folder.name, f"missing {', '.join(missing)} in {folder}"))
            continue
        rows.append(row)
    return rows, skipped


def collect_brats2020(src: Path, out: Path):
    rows, skipped = _collect(src, out, r"BraTS20_(Training|Validation)_\d{3}", BRATS_SEQS)
    maps = sorted(src.rglob("name_mapping.csv"))
    if not maps:
        raise ImportErrorForUser(f"{src}: name_mapping.csv not found (it carries the LGG/HGG grade)")
    grade = {}
    with maps[0].open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"Grade", "BraTS_2020_subject_ID"} <= set(reader.fieldnames or []):
            raise ImportErrorForUser(f"{maps[0]}: header lacks Grade and BraTS_2020_subject_ID")
        for r in reader:
            grade[r.get("BraTS_2020_subject_ID", "").strip()] = r.get("Grade", "").strip()
    for r in rows:
        g = grade.get(r["case_id"])
        if g in ("LGG", "HGG"):
            r["grade"] = g
        else:
            skipped.append((r["case_id"], "not in name_mapping.csv: no grade (kept without label)"))
    return rows, skipped


def collect_brats2021(src: Path, out: Path):
    return _collect(src, out, r"BraTS2021_\d{5}", BRATS_SEQS)


def collect_brats2023(src: Path, out: Path):
    rows, skipped = _collect(src, out, r"BraTS-GLI-\d{5}-\d{3}", BRATS23_SEQS, sep="-")
    for r in track(rows, "relabelling segs 3 -> 4"):
        m = re.fullmatch(r"(BraTS-GLI-\d{5})-(\d{3})", r["case_id"])
        r["patient_id"], r["timepoint"] = m.group(1), m.group(2)
        if r.get("seg"):
            src_seg = (out / r["seg"]).resolve()
            dst = out / "converted" / f"{r['case_id']}_seg.nii.gz"
            r["seg"] = relpath(convert_seg(src_seg, dst, {3: 4}), out)
    return rows, skipped


def collect_fets(src: Path, out: Path, partitions: Path | None = None):
    rows, skipped = _collect(src, out, r"(FeTS2022_\d{3,5}|FeTS21_Training_\d{3})", BRATS_SEQS)
    if partitions is None:
        return rows, skipped
    if not Path(partitions).is_file():
        raise ImportErrorForUser(f"{partitions}: partitioning CSV not found")
    site = {}
    with Path(partitions).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"Subject_ID", "Partition_ID"} <= set(reader.fieldnames or []):
            raise ImportErrorForUser(f"{partitions}: header must be Subject_ID,Partition_ID")
        for r in reader:
            part = (r["Partition_ID"] or "").strip()
            if not part.isdigit():
                raise ImportErrorForUser(
                    f"{partitions}:{reader.line_num}: Partition_ID {part!r} is not a number")
            site[(r["Subject_ID"] or "").strip()] = f"fets-{int(part):02d}"
    kept = []
    for r in rows:
        if r["case_id"] in site:
            r["site"] = site[r["case_id"]]
            kept.append(r)
        else:
            skipped.append((r["case_id"], f"not in {Path(partitions).name}"))
    return kept, skipped
