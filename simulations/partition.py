"""Patient-level, seeded partitions of one cohort into K simulated sites.

Schemes: ``iid`` (class-stratified round robin), ``dirichlet:ALPHA`` (per-class Dirichlet label skew),
``quantity:ALPHA`` (Dirichlet site sizes, labels untouched), ``site`` (the cohort's own ``site`` column;
``scanner`` is the same grouping, named for a cohort whose sites differ by scanner profile only, which
``gliofed simulate`` generates itself), ``fets:CSV`` (a FeTS ``partitioning_*.csv`` with Partition_ID and
Subject_ID columns: those exact subjects) and ``sizes:CSV`` (only the site *sizes* of such a file, or of
a ``site,patients`` file, scaled to this cohort: a real federation's quantity skew on any cohort). Every patient
lands in exactly one site; each site folder gets a cohort.csv whose image paths point at the source
cohort (no images are copied) and whose splits are the source cohort's, so the pooled test set is the
union of the sites' test splits.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.cohort import CaseRecord, Cohort, write_cohort
from shared.tasks import TaskSpec, select_samples


@dataclass(frozen=True)
class Partition:
    """Patients per site (site index -> sorted patient ids) and how they were chosen."""

    scheme: str
    sites: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]

    def site_of(self) -> dict[str, int]:
        return {p: i for i, pats in enumerate(self.sites) for p in pats}


def patient_labels(spec: TaskSpec, cohort: Cohort) -> dict[str, str]:
    """One label per patient with eligible cases (its first eligible case's label, or "all")."""
    samples, _ = select_samples(spec, cohort)
    out: dict[str, str] = {}
    for s in samples:
        out.setdefault(s.case.patient_id, s.label if s.label is not None else "all")
    return out


def partition_cohort(cohort: Cohort, spec: TaskSpec, sites: int, scheme: str,
                     seed: int = 0) -> Partition:
    """Split ``cohort``'s eligible patients into ``sites`` groups by ``scheme`` (deterministic)."""
    labels = patient_labels(spec, cohort)
    if not labels:
        raise ValueError(f"{cohort.root}: no patients eligible for task {spec.name}")
    patients = sorted(labels)
    rng = np.random.default_rng(seed)
    kind, _, arg = scheme.partition(":")
    if kind in ("site", "scanner"):
        by_site: dict[str, list[str]] = defaultdict(list)
        site_col = {c.patient_id: c.site or "unknown" for c in cohort.cases}
        for p in patients:
            by_site[site_col[p]].append(p)
        names = sorted(by_site)
        return Partition(scheme, tuple(tuple(sorted(by_site[n])) for n in names), tuple(names))
    if kind == "fets":
        return _fets_partition(Path(arg), patients, cohort, scheme)
    if kind == "sizes":
        sizes = scaled_sizes(read_site_sizes(Path(arg)), len(patients))
        order = [str(p) for p in rng.permutation(patients)]
        cuts = np.cumsum(sizes)[:-1]
        return Partition(scheme, tuple(tuple(sorted(g)) for g in np.split(np.array(order), cuts)),
                         tuple(f"site-{i}" for i in range(len(sizes))))
    if sites < 1:
        raise ValueError(f"--sites must be >= 1 (got {sites})")
    if sites > len(patients):
        raise ValueError(f"cannot split {len(patients)} eligible patients into {sites} sites")
    groups: list[list[str]] = [[] for _ in range(sites)]
    if kind == "iid":
        by_class: dict[str, list[str]] = defaultdict(list)
        for p in patients:
            by_class[labels[p]].append(p)
        offset = 0
        for cls in sorted(by_class):
            members = list(rng.permutation(by_class[cls]))
            for j, p in enumerate(members):
                groups[(j + offset) % sites].append(str(p))
            offset += len(members)
    elif kind in ("dirichlet", "quantity"):
        alpha = _alpha(arg, scheme)
        for _attempt in range(100):
            groups = [[] for _ in range(sites)]
            if kind == "quantity":
                pools = {"all": list(rng.permutation(patients))}
            else:
                pools = defaultdict(list)
                for p in patients:
                    pools[labels[p]].append(p)
                pools = {c: list(rng.permutation(v)) for c, v in sorted(pools.items())}
            for members in pools.values():
                share = rng.dirichlet([alpha] * sites)
                cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
                for i, chunk in enumerate(np.split(np.array(members, dtype=object), cuts)):
                    groups[i].extend(str(p) for p in chunk)
            if min(len(g) for g in groups) >= min(2, len(patients) // sites):
                break
        else:
            raise ValueError(f"{scheme}: could not give every site 2 patients in 100 draws")
    else:
        raise ValueError(
            f"unknown partition {scheme!r}; use iid, dirichlet:ALPHA, quantity:ALPHA, site, scanner, "
            "fets:CSV or sizes:CSV"
        )
    return Partition(scheme, tuple(tuple(sorted(g)) for g in groups),
                     tuple(f"site-{i}" for i in range(sites)))


def _alpha(arg: str, scheme: str) -> float:
    try:
        alpha = float(arg)
    except ValueError:
        raise ValueError(f"{scheme}: ALPHA must be a number, e.g. dirichlet:0.5") from None
    if alpha <= 0:
        raise ValueError(f"{scheme}: ALPHA must be > 0")
    return alpha


MIN_SITE_PATIENTS = 2  # a scaled site keeps at least this many patients (one may land in test)


def read_site_sizes(path: Path) -> list[int]:
    """Site sizes (largest first) from a FeTS ``Partition_ID,Subject_ID`` file (rows per partition) or
    a ``site,patients`` file (one row per site)."""
    if not path.is_file():
        raise ValueError(f"{path}: site-sizes file not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        counts: dict[str, int] = defaultdict(int)
        if {"Partition_ID", "Subject_ID"} <= cols:
            for row in reader:
                counts[row["Partition_ID"].strip()] += 1
        elif {"site", "patients"} <= cols:
            for row in reader:
                try:
                    counts[row["site"].strip()] += int(row["patients"])
                except ValueError:
                    raise ValueError(f"{path}: patients={row['patients']!r} is not a whole number "
                                     f"(site {row['site']!r})") from None
        else:
            raise ValueError(f"{path}: needs columns Partition_ID,Subject_ID (FeTS) or site,patients")
    sizes = sorted((n for n in counts.values() if n > 0), reverse=True)
    if not sizes:
        raise ValueError(f"{path}: no site with patients")
    return sizes


def scaled_sizes(sizes: list[int], total: int, floor: int = MIN_SITE_PATIENTS) -> list[int]:
    """``sizes`` scaled to ``total`` patients (largest remainder), every site at least ``floor``;
    the relative order (largest first) is kept."""
    k = len(sizes)
    if k * floor > total:
        raise ValueError(f"{k} sites of at least {floor} patients need {k * floor} eligible patients; "
                         f"the cohort has {total} (generate more cases)")
    spare = total - k * floor  # shared in proportion to the sizes above the floor
    want = np.asarray(sizes, dtype=np.float64)
    share = want / want.sum() * spare
    out = np.floor(share).astype(int)
    for i in np.argsort(-(share - out), kind="stable")[:spare - int(out.sum())]:
        out[i] += 1
    return [int(v) + floor for v in out]


def _fets_partition(path: Path, patients: list[str], cohort: Cohort, scheme: str) -> Partition:
    """FeTS partitioning CSV (Partition_ID, Subject_ID); subjects match patient or case ids."""
    if not path.is_file():
        raise ValueError(f"{path}: FeTS partition file not found")
    case_to_patient = {c.case_id: c.patient_id for c in cohort.cases}
    groups: dict[str, set[str]] = defaultdict(set)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or {"Partition_ID", "Subject_ID"} - set(reader.fieldnames):
            raise ValueError(f"{path}: needs columns Partition_ID and Subject_ID")
        for row in reader:
            subject = row["Subject_ID"].strip()
            patient = subject if subject in patients else case_to_patient.get(subject)
            if patient in patients:
                groups[row["Partition_ID"].strip()].add(patient)
    if not groups:
        raise ValueError(f"{path}: no Subject_ID matches an eligible patient of {cohort.root}")
    names = sorted(groups, key=lambda n: (len(n), n))
    return Partition(scheme, tuple(tuple(sorted(groups[n])) for n in names),
                     tuple(f"fets-{n}" for n in names))


def cohort_row(case: CaseRecord) -> dict[str, object]:
    row: dict[str, object] = {
        "case_id": case.case_id, "patient_id": case.patient_id, "timepoint": case.timepoint,
        "baseline_case_id": case.baseline_case_id, "site": case.site, "split": case.split,
    }
    row.update({k: str(Path(v).resolve()) for k, v in case.images.items()})
    row.update(case.labels)
    row.update(case.extra)
    return row


def write_partition(cohort: Cohort, part: Partition, sites_root: Path) -> list[Path]:
    """One folder per site (``site-<i>/cohort.csv``) referencing the source images by absolute path."""
    site_of = part.site_of()
    rows: dict[int, list[dict[str, object]]] = defaultdict(list)
    for case in cohort.cases:
        if case.patient_id in site_of:
            rows[site_of[case.patient_id]].append(cohort_row(case))
    folders = []
    for i in range(len(part.sites)):
        folder = Path(sites_root) / f"site-{i}"
        write_cohort(folder, rows[i], outside_roots=[cohort.root, *cohort.roots])
        folders.append(folder)
    return folders


def class_table(cohort: Cohort, spec: TaskSpec, part: Partition) -> list[dict[str, object]]:
    """Rows of (site, split, count per class) for printing and the report."""
    samples, _ = select_samples(spec, cohort)
    site_of = part.site_of()
    counts: dict[tuple[int, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in samples:
        if s.case.patient_id in site_of:
            split = "test" if s.split == "test" else "train"
            counts[(site_of[s.case.patient_id], split)][s.label or "all"] += 1
    classes = list(spec.classes) or ["all"]
    out = []
    for i, name in enumerate(part.names):
        for split in ("train", "test"):
            c = counts[(i, split)]
            out.append({"site": name, "split": split, **{k: c.get(k, 0) for k in classes},
                        "patients": len(part.sites[i]) if split == "train" else ""})
    return out
