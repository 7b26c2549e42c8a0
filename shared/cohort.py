"""The site cohort contract: read, validate and split ``cohort.csv`` (the only module that parses it).

A site is a folder with ``cohort.csv`` (one row per imaging session) and NIfTI files referenced by
paths relative to that folder. See ``docs/cohort.md`` for the full contract. Every other module gets
typed :class:`CaseRecord` objects from here, never raw CSV rows.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

COHORT_FILE = "cohort.csv"
ROOTS_FILE = "allowed-roots.txt"  # folders outside the site its images may live in (importers)

COLUMNS: tuple[str, ...] = (
    "case_id",
    "patient_id",
    "timepoint",
    "t1",
    "t1ce",
    "t2",
    "flair",
    "seg",
    "dce",
    "grade",
    "tumor_type",
    "rano",
    "baseline_case_id",
    "recurrence",
    "site",
    "split",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("case_id", "patient_id")
SEQUENCE_COLUMNS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
IMAGE_COLUMNS: tuple[str, ...] = (*SEQUENCE_COLUMNS, "seg", "dce")
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "grade": ("LGG", "HGG"),
    "tumor_type": (
        "hgg",
        "lgg",
        "metastasis",
        "meningioma",
        "pituitary_adenoma",
        "acoustic_neuroma",
        "healthy",
    ),
    "rano": ("CR", "PR", "SD", "PD"),
    "recurrence": ("recurrence", "necrosis"),
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
SEG_LABELS: tuple[int, ...] = (0, 1, 2, 4)  # 1 necrosis/non-enhancing, 2 edema, 4 enhancing


class CohortError(ValueError):
    """Raised when a cohort cannot be read at all (no file, no header, missing required columns)."""


@dataclass(frozen=True)
class CohortProblem:
    """One problem found in a cohort; ``str()`` gives the one-line message users see."""

    severity: str  # "error" | "warning"
    file: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{self.severity.upper()} {where}: {self.message}"


@dataclass(frozen=True)
class CaseRecord:
    """One imaging session of the cohort, with absolute image paths and validated labels."""

    case_id: str
    patient_id: str
    timepoint: str | None
    images: Mapping[str, Path]  # column -> absolute path, only for non-empty cells
    labels: Mapping[str, str]  # label column -> value, only for valid non-empty cells
    baseline_case_id: str | None
    site: str | None
    split: str  # resolved: the row's own split, or the derived patient-level split
    line: int  # 1-based line number in cohort.csv (header = line 1)
    extra: Mapping[str, str] = field(default_factory=dict)  # unknown columns, kept verbatim

    def has_images(self, columns: Iterable[str]) -> bool:
        return all(c in self.images for c in columns)


@dataclass
class Cohort:
    """A parsed site folder."""

    root: Path
    cases: list[CaseRecord]
    problems: list[CohortProblem]
    roots: list[Path] = field(default_factory=list)  # allowed folders outside ``root``

    @property
    def errors(self) -> list[CohortProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[CohortProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    def by_id(self) -> dict[str, CaseRecord]:
        return {c.case_id: c for c in self.cases}

    def in_split(self, split: str) -> list[CaseRecord]:
        return [c for c in self.cases if c.split == split]

    def patients(self) -> list[str]:
        return sorted({c.patient_id for c in self.cases})


def _clean(value: str | None) -> str:
    return (value or "").strip()


def derive_splits(
    patient_strata: Mapping[str, str],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> dict[str, str]:
    """Deterministic patient-level split, stratified by a per-patient stratum string.

    Within each stratum, patients are ordered by a seeded hash (stable across machines and Python
    versions) and cut by ``fractions`` (train, val, test). Strata with few patients still get a test
    patient first, then val, so small cohorts have every split represented where possible.
    """
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for pid, stratum in patient_strata.items():
        by_stratum[stratum].append(pid)
    out: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        pids = sorted(
            by_stratum[stratum],
            key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest(),
        )
        n = len(pids)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        if n >= 3:
            n_test = max(n_test, 1)
            n_val = max(n_val, 1)
        elif n == 2:
            n_test, n_val = 1, 0
        else:
            n_test, n_val = 0, 0
        for i, pid in enumerate(pids):
            out[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def allowed_roots(site_dir: str | Path, extra: Iterable[str | Path] = ()) -> list[Path]:
    """Folders outside the site folder its cohort.csv may reference (resolved).

    ``extra`` (``--allow-outside`` / node config ``allow-outside``) plus the lines of
    ``SITE_DIR/allowed-roots.txt``, which importers write for datasets referenced in place. The
    filesystem root is never allowed.
    """
    listed: list[str | Path] = [*extra]
    f = Path(site_dir) / ROOTS_FILE
    if f.is_file():
        listed += [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()
                   if ln.strip() and not ln.strip().startswith("#")]
    out = []
    for r in listed:
        p = Path(r).expanduser().resolve()
        if p != Path(p.anchor):
            out.append(p)
    return out


def read_cohort(
    site_dir: str | Path,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    allow_outside: Iterable[str | Path] = (),
) -> Cohort:
    """Read and validate ``SITE_DIR/cohort.csv``.

    Row-level problems (bad labels, duplicate ids, a patient in two splits, ...) are collected in
    ``Cohort.problems`` and the offending cells or rows are dropped; nothing stops at the first
    problem. An unreadable file, a missing required column or a duplicated column name raises
    :class:`CohortError`. Every image path is resolved (symlinks followed); one that leads outside the
    site folder and the :func:`allowed_roots` is an error naming row and column, and is dropped.
    Image files are *not* opened here (see ``client.site_check`` for that).
    """
    root = Path(site_dir).resolve()
    path = root / COHORT_FILE
    if not root.is_dir():
        raise CohortError(f"{root}: site folder does not exist")
    if not path.is_file():
        raise CohortError(f"{path}: missing (a site folder needs a cohort.csv, see docs/cohort.md)")
    problems: list[CohortProblem] = []
    fname = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CohortError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    reader = csv.reader(text.splitlines())
    try:
        header = [_clean(h) for h in next(reader)]
    except StopIteration:
        raise CohortError(f"{path}: empty file (the header row is required)") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CohortError(f"{path}:1: header lacks required column(s) {', '.join(missing)}")
    dup_cols = sorted({h for h in header if header.count(h) > 1 and h})
    if dup_cols:  # which of two `grade` columns is meant cannot be guessed: never use either
        raise CohortError(f"{path}:1: duplicate column(s) {', '.join(dup_cols)} in the header")
    roots = [root, *allowed_roots(root, allow_outside)]

    raw: list[tuple[int, dict[str, str]]] = []
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not _clean(v) for v in row):
            continue
        if len(row) != len(header):
            problems.append(
                CohortProblem(
                    "error",
                    fname,
                    f"row has {len(row)} fields, header has {len(header)}; row skipped",
                    lineno,
                )
            )
            continue
        raw.append((lineno, {h: _clean(v) for h, v in zip(header, row, strict=True)}))

    seen: dict[str, int] = {}
    rows: list[tuple[int, dict[str, str]]] = []
    for lineno, row in raw:
        cid, pid = row.get("case_id", ""), row.get("patient_id", "")
        if not cid:
            problems.append(CohortProblem("error", fname, "empty case_id; row skipped", lineno))
            continue
        if not pid:
            problems.append(
                CohortProblem("error", fname, f"case {cid}: empty patient_id; row skipped", lineno)
            )
            continue
        if cid in seen:
            problems.append(
                CohortProblem(
                    "error",
                    fname,
                    f"duplicate case_id {cid} (first on line {seen[cid]}); row skipped",
                    lineno,
                )
            )
            continue
        seen[cid] = lineno
        rows.append((lineno, row))

    # Patient-level split: explicit splits must agree per patient; empty ones are derived.
    explicit: dict[str, dict[str, int]] = defaultdict(dict)
    for lineno, row in rows:
        split = row.get("split", "")
        if split and split not in SPLITS:
            problems.append(
                CohortProblem(
                    "error",
                    fname,
                    f"case {row['case_id']}: split {split!r} is not one of {'|'.join(SPLITS)}",
                    lineno,
                )
            )
            row["split"] = ""
        elif split:
            explicit[row["patient_id"]].setdefault(split, lineno)
    conflicted: set[str] = set()
    for pid, splits in explicit.items():
        if len(splits) > 1:
            conflicted.add(pid)
            where = ", ".join(f"{s} (line {ln})" for s, ln in sorted(splits.items()))
            problems.append(
                CohortProblem(
                    "error",
                    fname,
                    f"patient {pid} is in more than one split: {where}; patient excluded",
                    min(splits.values()),
                )
            )
    strata: dict[str, str] = {}
    for _, row in rows:
        pid = row["patient_id"]
        if pid in explicit or pid in strata:
            continue
        strata[pid] = "|".join(row.get(c, "") for c in LABEL_VALUES)
    derived = derive_splits(strata, seed=seed, fractions=fractions)

    known = set(COLUMNS)
    cases: list[CaseRecord] = []
    for lineno, row in rows:
        cid, pid = row["case_id"], row["patient_id"]
        if pid in conflicted:
            continue
        images: dict[str, Path] = {}
        for col in IMAGE_COLUMNS:
            rel = row.get(col, "")
            if not rel:
                continue
            p = Path(rel)
            target = (root / p).resolve()  # follows symlinks: where the bytes really are
            if not any(target.is_relative_to(r) for r in roots):
                problems.append(
                    CohortProblem(
                        "error",
                        fname,
                        f"case {cid}: column {col} ({rel}) leads outside the site folder; cell"
                        " ignored (allow a folder with --allow-outside DIR or node config"
                        " allow-outside)",
                        lineno,
                    )
                )
                continue
            if p.is_absolute():
                problems.append(
                    CohortProblem(
                        "warning",
                        fname,
                        f"case {cid}: {col} path {rel} is absolute (paths should be relative to the"
                        " site folder)",
                        lineno,
                    )
                )
            images[col] = target
        labels: dict[str, str] = {}
        for col, allowed in LABEL_VALUES.items():
            val = row.get(col, "")
            if not val:
                continue
            if val not in allowed:
                problems.append(
                    CohortProblem(
                        "error",
                        fname,
                        f"case {cid}: {col} {val!r} is not one of {'|'.join(allowed)}; label ignored",
                        lineno,
                    )
                )
                continue
            labels[col] = val
        base = row.get("baseline_case_id", "") or None
        if base is not None and base not in seen:
            problems.append(
                CohortProblem(
                    "error",
                    fname,
                    f"case {cid}: baseline_case_id {base} is not a case_id in this cohort",
                    lineno,
                )
            )
        split = row.get("split", "") or (
            next(iter(explicit[pid])) if pid in explicit else derived[pid]
        )
        cases.append(
            CaseRecord(
                case_id=cid,
                patient_id=pid,
                timepoint=row.get("timepoint", "") or None,
                images=images,
                labels=labels,
                baseline_case_id=base,
                site=row.get("site", "") or None,
                split=split,
                line=lineno,
                extra={k: v for k, v in row.items() if k not in known},
            )
        )
    # A RANO pair must not straddle two patients (the baseline is an earlier session of the same one).
    by_id = {c.case_id: c for c in cases}
    for c in cases:
        b = by_id.get(c.baseline_case_id or "")
        if b is not None and b.patient_id != c.patient_id:
            problems.append(
                CohortProblem(
                    "error",
                    fname,
                    f"case {c.case_id}: baseline {b.case_id} belongs to patient {b.patient_id},"
                    f" not {c.patient_id}",
                    c.line,
                )
            )
    return Cohort(root=root, cases=cases, problems=problems, roots=roots[1:])


def write_cohort(site_dir: str | Path, rows: Iterable[Mapping[str, object]],
                 outside_roots: Iterable[str | Path] = ()) -> Path:
    """Write ``SITE_DIR/cohort.csv`` with the contract's columns (plus any extra keys, appended).

    Used by importers and generators; ``None`` becomes an empty cell. Image paths should already be
    relative to ``site_dir`` (or absolute when they point outside it, as importers do): the folders
    they live in are listed in ``outside_roots`` and recorded in ``allowed-roots.txt``.
    """
    root = Path(site_dir)
    root.mkdir(parents=True, exist_ok=True)
    outside = sorted({str(Path(r).resolve()) for r in outside_roots})
    if outside:
        (root / ROOTS_FILE).write_text(
            "# folders outside this site whose images cohort.csv references (written by gliofed)\n"
            + "".join(f"{r}\n" for r in outside), encoding="utf-8")
    rows = list(rows)
    extra: list[str] = []
    for r in rows:
        for k in r:
            if k not in COLUMNS and k not in extra:
                extra.append(k)
    header = [*COLUMNS, *extra]
    path = root / COHORT_FILE
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if r.get(h) is None else str(r.get(h)) for h in header])
    tmp.replace(path)
    return path

