"""The sessions a site prepares: read from ``sessions.csv``, or inferred from the DICOM in RAW_DIR.

A sequence cell names, relative to RAW_DIR, a DICOM folder (``FOLDER#SeriesInstanceUID`` when the
folder holds several series) or a NIfTI file. Inferred sessions group series by StudyInstanceUID,
name sequences by the rules (:mod:`.rules`), and carry pseudonyms only: ``case_id`` and ``patient_id``
are salted hashes of StudyInstanceUID / PatientID, ``timepoint`` the study's rank for its patient
(never its date).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shared.cohort import COLUMNS, IMAGE_COLUMNS

SOURCE_COLUMNS = IMAGE_COLUMNS  # t1 t1ce t2 flair seg dce
CARRIED = tuple(c for c in COLUMNS if c not in IMAGE_COLUMNS)  # ids, timepoint, labels, split, site


class SessionsError(ValueError):
    """A sessions.csv that cannot be used at all (``file: reason``)."""


@dataclass
class Session:
    case_id: str
    patient_id: str
    line: int
    sources: dict[str, str]  # column -> cell (relative to RAW_DIR)
    fields: dict[str, str] = field(default_factory=dict)  # carried contract columns (labels, ...)


def read_sessions(path: Path) -> tuple[list[Session], list[str]]:
    """Rows of a sessions.csv, and one-line problems for rows left out (duplicates, no images)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise SessionsError(f"{path}: cannot read ({exc.strerror})") from None
    if not rows:
        raise SessionsError(f"{path}: empty file (a header row is required)")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("case_id", "patient_id") if c not in header]
    if missing:
        raise SessionsError(f"{path}: missing required column(s) {', '.join(missing)}")
    out: list[Session] = []
    problems: list[str] = []
    seen: set[str] = set()
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            problems.append(f"{path}:{n}: {len(row)} fields, header has {len(header)}")
            continue
        rec = {h: c.strip() for h, c in zip(header, row, strict=True)}
        cid = rec["case_id"]
        if not cid or not rec["patient_id"]:
            problems.append(f"{path}:{n}: empty case_id or patient_id")
            continue
        if cid in seen:
            problems.append(f"{path}:{n}: duplicate case_id {cid}")
            continue
        if "/" in cid or "\\" in cid or cid.startswith("."):
            problems.append(f"{path}:{n}: case_id {cid!r} is not usable as a folder name")
            continue
        seen.add(cid)
        sources = {c: rec[c] for c in SOURCE_COLUMNS if rec.get(c)}
        if not sources:
            problems.append(f"{path}:{n}: case {cid} names no image")
            continue
        out.append(Session(case_id=cid, patient_id=rec["patient_id"], line=n, sources=sources,
                           fields={c: rec[c] for c in CARRIED if rec.get(c)}))
    return out, problems


def write_sessions(path: Path, sessions: list[Session]) -> None:
    """Write a sessions.csv (the inferred one, for a person to check and edit)."""
    cols = ["case_id", "patient_id", "timepoint", *SOURCE_COLUMNS]
    extra = sorted({k for s in sessions for k in s.fields} - set(cols))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*cols, *extra])
        for s in sessions:
            rec = {"case_id": s.case_id, "patient_id": s.patient_id, **s.fields, **s.sources}
            w.writerow([rec.get(c, "") for c in (*cols, *extra)])
    tmp.replace(path)


def infer_sessions(raw: Path, rules, salt: bytes, progress: bool = False
                   ) -> tuple[list[Session], list[str]]:
    """Sessions from the DICOM under ``raw``; notes (one line each) on what was ignored and why."""
    from client.prepare.deid import pseudonym
    from client.prepare.dicom import scan_tree

    series, non_dicom, _ = scan_tree(raw, progress=progress)
    notes = [f"{p}: not a DICOM file, ignored" for p in non_dicom]
    folders: dict[Path, set[str]] = defaultdict(set)
    for s in series.values():
        for f in s.files:
            folders[Path(f).parent].add(s.uid)
    studies: dict[str, list] = defaultdict(list)
    for s in series.values():
        studies[s.study_uid].append(s)
    by_patient: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for uid, members in studies.items():
        by_patient[members[0].patient_id or uid].append((members[0].study_date, uid))
    rank = {uid: f"{i + 1:03d}" for items in by_patient.values()
            for i, (_, uid) in enumerate(sorted(items))}
    sessions: list[Session] = []
    for study_uid, members in sorted(studies.items(), key=lambda kv: rank[kv[0]]):
        chosen: dict[str, object] = {}
        for s in sorted(members, key=lambda s: s.series_number):
            what = rules.classify(s.description, s.protocol, temporal=s.n_temporal > 1)
            if what is None:
                notes.append(f"{Path(s.files[0]).parent}: series {s.series_number} "
                             f"({s.description or s.protocol or 'no description'}) not recognised "
                             f"by {rules.source}, ignored")
                continue
            prev = chosen.get(what)
            if prev is None or s.n_positions > prev.n_positions:  # type: ignore[attr-defined]
                chosen[what] = s
        if not chosen:
            continue
        patient = members[0].patient_id or study_uid
        case_id = pseudonym("case", study_uid, salt)
        srcs = {}
        for col, s in chosen.items():
            common = Path(s.files[0]).parent  # type: ignore[attr-defined]
            for f in s.files[1:]:  # type: ignore[attr-defined]
                while common not in Path(f).parents:
                    common = common.parent
            rel = common.relative_to(raw).as_posix() or "."
            mixed = any(u != s.uid for f in s.files for u in folders[Path(f).parent])  # type: ignore[attr-defined]
            srcs[col] = f"{rel}#{s.uid}" if mixed else rel  # type: ignore[attr-defined]
        sessions.append(Session(case_id=case_id, patient_id=pseudonym("pat", patient, salt),
                                line=0, sources=srcs, fields={"timepoint": rank[study_uid]}))
    return sessions, notes
