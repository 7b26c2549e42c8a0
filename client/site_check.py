"""Validate a site folder (cohort.csv + NIfTI) without modifying anything; report every problem.

``check_site(site_dir)`` returns a :class:`SiteReport`: all problems (one line each, naming the file and
the reason), and a per-task summary of usable cases and class counts per split. Image checks run in
parallel over cores; one bad file never stops the check of the others. Nothing here prints: the CLI
(``gliofed site check``) renders the report and draws the progress bar from the ``progress`` callback.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.cohort import (
    COHORT_FILE,
    IMAGE_COLUMNS,
    SEG_LABELS,
    CohortError,
    CohortProblem,
    read_cohort,
)
from shared.imageio import ImageError, ImageTooLarge, iter_slabs, open_image, qform_sform_gap_mm
from shared.tasks import TASKS, class_counts, select_samples

HEADER_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")
_DATE = re.compile(r"\b(19|20)\d\d[-./]?(0[1-9]|1[0-2])[-./]?(0[1-9]|[12]\d|3[01])\b|"
                   r"\b(0?[1-9]|[12]\d|3[01])[./](0?[1-9]|1[0-2])[./](19|20)?\d\d\b")
# DICOM person names (Doe^John, DOE^JOHN) and "Doe, John"; plain capitalised words ("Philips Medical")
# are not flagged.
_NAME = re.compile(r"\b[A-Za-z][A-Za-z'-]+\^[A-Za-z][A-Za-z'-]+|\b[A-Z][a-z]+, [A-Z][a-z]+\b")
_HEADER_ERROR_LEVEL = 30  # nibabel's check level for a header it would have to fix or cannot use


@dataclass(frozen=True)
class ImageInfo:
    """What one image check learned (shape and affine for the cross-sequence comparison)."""

    path: str
    column: str
    shape: tuple[int, ...] | None
    affine: tuple[float, ...] | None
    problems: tuple[CohortProblem, ...]


@dataclass
class TaskSummary:
    task: str
    usable: dict[str, dict[str, int]]  # split -> class -> count (usable = eligible, files passed)
    skipped: int  # rows the task cannot use (no label, missing inputs, no baseline)
    excluded: int = 0  # eligible rows left out because one of their files failed the checks

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.usable.values())


@dataclass
class SiteReport:
    site: Path
    n_cases: int
    problems: list[CohortProblem] = field(default_factory=list)
    tasks: list[TaskSummary] = field(default_factory=list)

    @property
    def errors(self) -> list[CohortProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors


def _looks_personal(text: str) -> str | None:
    found = [what for what, rx in (("a personal name", _NAME), ("a date", _DATE)) if rx.search(text)]
    return " and ".join(found) or None


_QUOTED = re.compile(r"""\s*\(?b?(['"]).*?\1\)?""")  # quoted text and bytes: may be file content
HEADER_CHECKS = {  # nibabel's header checks -> what we say (never the offending bytes themselves)
    "sizeof_hdr": "sizeof_hdr should be 348", "datatype": "unsupported data type code",
    "bitpix": "bitpix does not match the data type", "pixdims": "voxel sizes are not positive",
    "qfac": "qfac should be 1 or -1", "magic": "magic string is not a NIfTI one",
    "offset": "invalid vox_offset", "qform_code": "invalid qform_code",
    "sform_code": "invalid sform_code",
}
QFORM_SFORM_MM = 1.0  # qform and sform placing the volume further apart than this draw a warning


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (one line, at most 120 characters, quoted text removed)."""
    msg = _QUOTED.sub("", str(exc).splitlines()[0])[:120].strip() if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def header_problems(path: str) -> list[str]:
    """What is wrong with a NIfTI-1 header as stored (nibabel would silently fix some of it on load)."""
    import gzip

    import nibabel as nib
    from nibabel.batteryrunners import BatteryRunner

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read(540)
    if len(raw) < 348:
        return [f"file is {len(raw)} bytes, shorter than a NIfTI header"]
    size_le, size_be = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")
    if 540 in (size_le, size_be):  # NIfTI-2: nibabel's own load checks are enough
        return []
    hdr = nib.Nifti1Header(raw[:348], check=False)
    checks = hdr._get_checks()
    reports = BatteryRunner(checks).check_only(hdr)
    names = [c.__name__.removeprefix("_chk_") for c in checks]
    return [HEADER_CHECKS.get(n, f"failed header check {n}") for n, r in zip(names, reports, strict=True)
            if r.problem_level >= _HEADER_ERROR_LEVEL]


def dce_sidecar_problems(path: str, n_frames: int | None) -> list[tuple[str, str]]:
    """(file, reason) for a DCE series' JSON sidecar: present, valid, with frame timing (shared.dce.io)."""
    import json

    from shared.dce.io import sidecar_path

    side = sidecar_path(path)
    if not side.is_file():
        return [(str(side), f"JSON sidecar for {Path(path).name} not found (frame timing is required)")]
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [(str(side), f"not valid JSON ({_reason(exc)})")]
    if not isinstance(meta, dict):
        return [(str(side), "must hold a JSON object")]
    out: list[tuple[str, str]] = []
    if "FrameTimes" in meta:
        try:
            times = np.asarray(meta["FrameTimes"], dtype=float).ravel()
        except (TypeError, ValueError):
            times = None
        if times is None:
            out.append((str(side), "FrameTimes must be a list of numbers (seconds)"))
        elif n_frames is not None and times.size != n_frames:
            msg = f"FrameTimes has {times.size} entries but the image has {n_frames} frames"
            out.append((str(side), msg))
        elif np.any(np.diff(times) <= 0):
            out.append((str(side), "FrameTimes must increase strictly"))
    elif "TemporalResolution" not in meta:
        out.append((str(side), "needs FrameTimes or TemporalResolution (seconds)"))
    quantity = str(meta.get("Quantity", "concentration")).lower()
    if quantity not in ("concentration", "signal"):
        out.append((str(side), f"Quantity must be 'concentration' or 'signal', got {quantity!r}"))
    elif quantity == "signal" and not {"RepetitionTime", "FlipAngle"} <= set(meta):
        out.append((str(side), "signal data need RepetitionTime (s) and FlipAngle (deg)"))
    return out


def check_image(path: str, column: str, limit_mb: float | None = None) -> ImageInfo:
    """Open one NIfTI and check it: readable, size, dimensionality, finite, non-constant, seg labels,
    header (personal data, qform vs sform); voxels are streamed, never held whole."""
    problems: list[CohortProblem] = []

    def err(msg: str, sev: str = "error") -> None:
        problems.append(CohortProblem(sev, path, msg))

    p = Path(path)
    if not p.exists():
        err(f"missing file (referenced by column {column})")
        return ImageInfo(path, column, None, None, tuple(problems))
    if not p.is_file():
        err(f"not a file (referenced by column {column}; a folder where an image is expected)")
        return ImageInfo(path, column, None, None, tuple(problems))
    try:
        bad_header = header_problems(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable start of file is a finding, too
        err(f"unreadable NIfTI ({_reason(exc)})")
        return ImageInfo(path, column, None, None, tuple(problems))
    if bad_header:
        err(f"bad NIfTI header ({'; '.join(bad_header)})")
        return ImageInfo(path, column, None, None, tuple(problems))
    try:
        img = open_image(path, limit_mb)  # the size limit, before any voxel is decompressed
        shape = tuple(int(s) for s in img.shape)
        affine = tuple(float(v) for v in np.round(img.affine, 3).ravel())
        hdr = img.header
    except ImageTooLarge as exc:
        err(exc.reason)
        return ImageInfo(path, column, None, None, tuple(problems))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a finding about this file
        err(f"unreadable NIfTI ({exc.cause if isinstance(exc, ImageError) else _reason(exc)})")
        return ImageInfo(path, column, None, None, tuple(problems))
    want = 4 if column == "dce" else 3
    ndim = len([s for s in shape if s > 1]) if len(shape) > want else len(shape)
    if ndim != want:
        err(f"expected a {want}D image for {column}, got shape {shape}")
    gap = qform_sform_gap_mm(img)
    if gap > QFORM_SFORM_MM:
        err(f"qform and sform disagree (they place the volume up to {gap:.1f} mm apart): which "
            "orientation is right is ambiguous; fix the header", "warning")
    if column == "dce":
        for file, msg in dce_sidecar_problems(path, shape[3] if len(shape) == 4 else None):
            problems.append(CohortProblem("error", file, msg))
    for name in HEADER_TEXT_FIELDS:
        try:
            raw = hdr.get(name)
        except Exception:  # noqa: BLE001
            raw = None
        text = raw.item().decode("latin-1", "replace").strip("\x00 ") if raw is not None else ""
        what = _looks_personal(text) if text else None
        if what:
            err(f"header field {name} looks like {what} ({text!r}): possible personal data",
                "warning")
    try:
        stats = _voxel_stats(img, seg=column == "seg")
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, ...
        err(f"truncated or corrupt image data ({_reason(exc)})")
        return ImageInfo(path, column, shape, affine, tuple(problems))
    if stats["bad"]:
        err(f"{stats['bad']} NaN/Inf voxel(s)")
    lo, hi = stats["min"], stats["max"]
    if column != "seg" and lo is not None and lo == hi:
        err(f"constant image (every voxel = {lo:g})")
    if column == "seg" and stats["values"]:
        vals = np.array(sorted(stats["values"]))
        odd = sorted(set(np.round(vals).astype(int).tolist()) - set(SEG_LABELS))
        if odd or not np.allclose(vals, np.round(vals)):
            err(f"segmentation values {odd or 'non-integer'} outside the convention 0/1/2/4 "
                "(1 necrosis, 2 edema, 4 enhancing)")
    return ImageInfo(path, column, shape, affine, tuple(problems))


def _voxel_stats(img, seg: bool, max_values: int = 64) -> dict:
    """NaN/Inf count, finite min/max and (``seg``) distinct values, streamed slab by slab."""
    bad, lo, hi, values = 0, None, None, set()
    for slab in iter_slabs(img):
        if np.issubdtype(slab.dtype, np.floating):
            ok = np.isfinite(slab)
            bad += int(slab.size - ok.sum())
            slab = slab[ok]
        if not slab.size:
            continue
        smin, smax = float(slab.min()), float(slab.max())
        lo, hi = (smin, smax) if lo is None else (min(lo, smin), max(hi, smax))
        if seg and len(values) <= max_values:
            values |= set(np.unique(slab).tolist())
    return {"bad": bad, "min": lo, "max": hi, "values": values}


def _check_chunk(items: list[tuple[str, str]], limit_mb: float | None = None) -> list[ImageInfo]:
    return [check_image(p, c, limit_mb) for p, c in items]


def _pool_context():
    """fork when this process has one thread (fast); spawn otherwise (forking threads, e.g. gRPC's
    or torch's, can deadlock the children)."""
    import multiprocessing
    import threading

    return multiprocessing.get_context("fork" if threading.active_count() == 1 else "spawn")


def _run_image_checks(items: list[tuple[str, str]], workers: int,
                      progress: Callable[[int, int], None] | None,
                      limit_mb: float | None = None) -> list[ImageInfo]:
    """Check every (path, column) in chunks over a process pool; ``progress(done, total)`` after each
    chunk (first called once the pool's workers exist, so a caller may start a display thread then)."""
    n_chunks = max(1, len(items) // 25) if workers <= 1 else max(workers * 4, len(items) // 25)
    chunks = [c for c in (items[i::n_chunks] for i in range(n_chunks)) if c]
    pool = None
    if workers > 1 and len(items) > 40:
        # Start the workers before any progress display thread exists (fork is then safe).
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
        list(pool.map(int, range(workers)))
    infos: list[ImageInfo] = []
    try:
        if progress is not None:
            progress(0, len(items))
        check = functools.partial(_check_chunk, limit_mb=limit_mb)
        results = pool.map(check, chunks) if pool else map(check, chunks)
        for res in results:
            infos.extend(res)
            if progress is not None:
                progress(len(infos), len(items))
    finally:
        if pool:
            pool.shutdown()
    return infos


def check_site(site_dir: str | Path, workers: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               allow_outside: Sequence[str | Path] = (), max_image_mb: float | None = None,
               ) -> SiteReport:
    """Check everything in a site folder and summarise what each task can use.

    ``workers``: processes for the image checks (default: all cores, at most 8); ``progress(done,
    total)``: called as images are checked; ``allow_outside``: folders outside the site its cohort.csv may
    reference; ``max_image_mb``: the per-image limit (default: node config's default).
    """
    site = Path(site_dir)
    try:
        cohort = read_cohort(site, allow_outside=allow_outside)
    except CohortError as exc:
        report = SiteReport(site=site, n_cases=0)
        where, _, msg = str(exc).partition(": ")
        report.problems.append(CohortProblem("error", where, msg or str(exc)))
        return report
    report = SiteReport(site=site, n_cases=len(cohort.cases), problems=list(cohort.problems))
    from client.policy import POLICY_FILE, PolicyError, load_policy

    try:
        load_policy(site)
    except PolicyError as exc:
        report.problems.append(CohortProblem("error", str(cohort.root / POLICY_FILE),
                                             str(exc).removeprefix(f"{POLICY_FILE}: ")))
    if not cohort.cases:
        report.problems.append(CohortProblem(
            "error", str(cohort.root / COHORT_FILE), "no usable rows: an empty site cannot take part"))
    # Every image, once, even when several rows share a file.
    items = sorted({(str(path), col) for c in cohort.cases for col, path in c.images.items()})
    workers = workers or min(os.cpu_count() or 1, 8)
    infos = {(i.path, i.column): i for i in _run_image_checks(items, workers, progress, max_image_mb)}
    for key in items:
        report.problems.extend(infos[key].problems)
    bad_files = {k[0] for k, v in infos.items() if any(p.severity == "error" for p in v.problems)}
    # Cross-sequence geometry: every 3D image of a session must share shape and affine.
    for c in cohort.cases:
        ref = None
        for col in IMAGE_COLUMNS:
            if col == "dce" or col not in c.images:
                continue
            info = infos[(str(c.images[col]), col)]
            if info.shape is None or info.path in bad_files:  # already reported as broken
                continue
            if ref is None:
                ref = info
                continue
            if info.shape != ref.shape:
                report.problems.append(CohortProblem(
                    "error", info.path, f"case {c.case_id} (cohort.csv line {c.line}): shape "
                    f"{info.shape} differs from {ref.column} {ref.shape}"))
                bad_files.add(info.path)
            elif info.affine is not None and ref.affine is not None and not np.allclose(
                    info.affine, ref.affine, atol=1e-2):
                report.problems.append(CohortProblem(
                    "error", info.path, f"case {c.case_id} (cohort.csv line {c.line}): affine "
                    f"differs from {ref.column} (sequences are not co-registered)"))
                bad_files.add(info.path)
    usable_cohort = type(cohort)(root=cohort.root, problems=[], cases=[
        c for c in cohort.cases if not any(str(p) in bad_files for p in c.images.values())])
    for name, spec in TASKS.items():
        per_split: dict[str, dict[str, int]] = {}
        eligible, ineligible = select_samples(spec, cohort)
        for split in ("train", "val", "test"):
            ok, _ = select_samples(spec, usable_cohort, split)
            # qtm (regression) has no classes: count sessions
            per_split[split] = class_counts(spec, ok) if spec.classes else {"sessions": len(ok)}
        summary = TaskSummary(task=name, usable=per_split, skipped=len(ineligible))
        summary.excluded = len(eligible) - summary.total
        report.tasks.append(summary)
    return report
