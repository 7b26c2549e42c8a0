"""LUMIERE: Patient-NNN/week-NNN[-k] sessions, RANO pairs from the expert-rating CSV."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from shared.importers.base import ImportErrorForUser, relpath, track
from shared.importers.convert import convert_seg

RANO = ("CR", "PR", "SD", "PD")
NATIVE = {"t1ce": "CT1", "t1": "T1", "t2": "T2", "flair": "FLAIR"}
ATLAS = {"t1ce": "ct1", "t1": "t1", "t2": "t2", "flair": "flair"}
# DeepBraTumIA: 1 enhancing, 2 necrotic/non-enhancing, 3 edema -> internal 4 / 1 / 2
DEEPBRATUMIA_TO_INTERNAL = {1: 4, 2: 1, 3: 2}
_WEEK = re.compile(r"week-(\d+)(?:-(\d+))?")


def _session_key(name: str) -> tuple[int, int]:
    m = _WEEK.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (10**9, 0)


def read_ratings(path: Path) -> dict[tuple[str, str], str]:
    """(patient, session) -> rating; columns by position (0 patient, 1 date) or the `Rating (` prefix."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ImportErrorForUser(f"{path}: empty rating file")
    header = [h.strip() for h in rows[0]]
    col = next((i for i, h in enumerate(header) if h.startswith("Rating (")), 4)
    out = {}
    for r in rows[1:]:
        if len(r) > col and r[0].strip():
            out[(r[0].strip(), r[1].strip())] = r[col].strip()
    return out


def rano_label(rating: str) -> str | None:
    """CR/PR/SD/PD, also from mixed values like 'Post-Op/PD'; None for Pre-Op/Post-Op."""
    tokens = [t.strip() for t in rating.replace(" ", "").split("/")]
    found = [t for t in tokens if t in RANO]
    return found[-1] if found else None


def session_images(sdir: Path) -> tuple[dict[str, Path], Path | None]:
    """The co-registered images of one session, and its DeepBraTumIA mask when usable.

    Preference: DeepBraTumIA atlas space (skull-stripped, with the mask), then HD-GLIO-AUTO's registered
    set (co-registered, skull-stripped; its mask is not used: label 1 mixes edema and non-enhancing
    tumour, which has no faithful 1/2/4 equivalent), then whatever native images exist (not
    co-registered: the site check will report their shape/affine mismatches).
    """
    atlas = sdir / "DeepBraTumIA-segmentation" / "atlas"
    deep = {col: atlas / "skull_strip" / f"{name}_skull_strip.nii.gz" for col, name in ATLAS.items()}
    if all(p.is_file() for p in deep.values()):
        seg = atlas / "segmentation" / "seg_mask.nii.gz"
        return deep, seg if seg.is_file() else None
    reg = sdir / "HD-GLIO-AUTO-segmentation" / "registered"
    hdglio = {col: reg / f"{name}_r2s_bet_reg.nii.gz" for col, name in NATIVE.items()}
    if all(p.is_file() for p in hdglio.values()):
        return hdglio, None
    native = {col: sdir / f"{name}.nii.gz" for col, name in NATIVE.items()}
    return {col: p for col, p in native.items() if p.is_file()}, None


def collect(src: Path, out: Path):
    imaging = src / "Imaging" if (src / "Imaging").is_dir() else src
    patients = sorted(p for p in imaging.glob("Patient-*") if p.is_dir())
    if not patients:
        raise ImportErrorForUser(f"{src}: no Imaging/Patient-NNN folders")
    ratings_files = sorted(src.glob("LUMIERE-ExpertRating*.csv"))
    ratings = read_ratings(ratings_files[0]) if ratings_files else {}
    rows, skipped = [], []
    for pdir in track(patients, "reading patients"):
        sessions = sorted((s for s in pdir.iterdir() if s.is_dir() and _WEEK.fullmatch(s.name)),
                          key=lambda s: _session_key(s.name))
        prev_id = None
        for sdir in sessions:
            cid = f"{pdir.name}_{sdir.name}"
            row: dict[str, str] = {"case_id": cid, "patient_id": pdir.name, "timepoint": sdir.name}
            images, seg = session_images(sdir)
            row.update({col: relpath(path, out) for col, path in images.items()})
            if seg is not None:
                dst = out / "converted" / f"{cid}_seg.nii.gz"
                row["seg"] = relpath(convert_seg(seg, dst, DEEPBRATUMIA_TO_INTERNAL), out)
            rating = ratings.get((pdir.name, sdir.name))
            label = rano_label(rating) if rating else None
            if label and prev_id is not None:
                row["rano"], row["baseline_case_id"] = label, prev_id
            elif label:
                skipped.append((cid, f"rated {label} but has no earlier session: no RANO pair"))
            elif rating:
                skipped.append((cid, f"rating {rating!r} is not a response class (session kept)"))
            if not any(c in row for c in NATIVE):
                skipped.append((cid, f"no CT1/T1/T2/FLAIR images in {sdir}"))
                continue
            rows.append(row)
            prev_id = cid
    return rows, skipped
