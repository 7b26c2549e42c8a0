"""`gliofed site prepare`: every session of RAW_DIR into SITE_DIR, in parallel, resumably.

Sessions come from ``--sessions``, ``RAW_DIR/sessions.csv``, an earlier inferred ``SITE_DIR/sessions.csv``,
or are inferred from the DICOM (written to ``SITE_DIR/sessions.csv``; preparation goes on only with
``accept_inferred``). Finished sessions (``images/<case>/session.json``) are skipped; ``cohort.csv``,
``qc/qc.csv`` and ``qc/qc.html`` are rewritten from every finished session at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from client.prepare.pipeline import MANIFEST, Options, SessionError, prepare_session
from client.prepare.sessions import (
    Session,
    SessionsError,
    infer_sessions,
    read_sessions,
    write_sessions,
)

SALT_FILE = ".prepare/salt"  # inside SITE_DIR; never shared (pseudonyms cannot be recomputed without it)


class PrepareError(ValueError):
    """The whole run cannot start (bad RAW_DIR, sessions.csv, rules); ``file: reason``."""


@dataclass
class PrepareResult:
    site: Path
    prepared: list[str] = field(default_factory=list)  # sessions prepared by this run
    resumed: list[str] = field(default_factory=list)  # finished earlier, skipped
    errors: list[str] = field(default_factory=list)  # one line each: file: reason
    warnings: list[str] = field(default_factory=list)
    inferred: Path | None = None  # the sessions.csv written from the DICOM
    stopped_for_review: bool = False
    cohort_csv: Path | None = None
    qc_html: Path | None = None


def _resolve_sessions(raw: Path, site: Path, sessions_csv: Path | None, rules_path: Path | None,
                      accept_inferred: bool, progress: bool, res: PrepareResult) -> list[Session]:
    from client.prepare.deid import load_salt
    from client.prepare.rules import RulesError, load_rules

    for candidate in (sessions_csv, raw / "sessions.csv", site / "sessions.csv"):
        if candidate is not None and candidate.exists():
            try:
                sessions, problems = read_sessions(candidate)
            except SessionsError as exc:
                raise PrepareError(str(exc)) from None
            res.errors.extend(problems)
            return sessions
        if candidate is sessions_csv and candidate is not None:
            raise PrepareError(f"{candidate}: no such sessions file")
    try:
        rules = load_rules(rules_path)
    except RulesError as exc:
        raise PrepareError(str(exc)) from None
    sessions, notes = infer_sessions(raw, rules, load_salt(site / SALT_FILE), progress=progress)
    res.warnings.extend(notes)
    if not sessions:
        raise PrepareError(f"{raw}: no session found (no sessions.csv and no recognised DICOM series)")
    res.inferred = site / "sessions.csv"
    write_sessions(res.inferred, sessions)
    if not accept_inferred:
        res.stopped_for_review = True
        return []
    return sessions


def _done(images: Path, case_id: str) -> dict | None:
    m = images / case_id / MANIFEST
    try:
        return json.loads(m.read_text()) if m.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(threads)


def _run_one(sess: Session, raw: Path, images: Path, opts: Options) -> tuple[str, dict | None, str]:
    try:
        return sess.case_id, prepare_session(sess, raw, images, opts), ""
    except SessionError as exc:
        return sess.case_id, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad session never stops the others
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        return sess.case_id, None, (f"case {sess.case_id} (sessions.csv line {sess.line}): "
                                    f"{type(exc).__name__}: {msg}")


def _cores() -> int:
    """CPUs this process may run on (its affinity: a container's or taskset's limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def prepare_site(raw_dir: str | Path, site_dir: str | Path, spacing: float = 1.0,
                 workers: int | None = None, rules: str | Path | None = None,
                 sessions_csv: str | Path | None = None, accept_inferred: bool = False,
                 deformable: bool = False, progress: bool = False) -> PrepareResult:
    """Prepare every session of ``raw_dir`` into the site folder ``site_dir`` (see module doc)."""
    raw, site = Path(raw_dir).resolve(), Path(site_dir).resolve()
    if not raw.is_dir():
        raise PrepareError(f"{raw}: not a folder")
    if site == raw or raw in site.parents:
        raise PrepareError(f"{site}: the site folder must lie outside RAW_DIR (RAW_DIR is never "
                           "modified)")
    if not 0.5 <= spacing <= 4.0:
        raise PrepareError(f"--spacing {spacing}: must be 0.5-4 mm")
    res = PrepareResult(site=site)
    site.mkdir(parents=True, exist_ok=True)
    sessions = _resolve_sessions(raw, site, Path(sessions_csv) if sessions_csv else None,
                                 Path(rules) if rules else None, accept_inferred, progress, res)
    if res.stopped_for_review:
        return res
    images = site / "images"
    images.mkdir(exist_ok=True)
    for stale in images.glob(".tmp-*"):  # half-written sessions of an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    manifests: dict[str, dict] = {}
    todo = []
    for s in sessions:
        m = _done(images, s.case_id)
        if m is not None and m.get("spacing") == spacing and m.get("deformable", False) == deformable:
            manifests[s.case_id] = m
            res.resumed.append(s.case_id)
        else:
            todo.append(s)
    cores = _cores()
    workers = max(1, min(workers or cores, len(todo) or 1))
    opts = Options(spacing=spacing, deformable=deformable, threads=max(1, cores // workers))
    for cid, man, err in _map(todo, raw, images, opts, workers, progress):
        if man is None:
            res.errors.append(err)
        else:
            manifests[cid] = man
            res.prepared.append(cid)
    for m in manifests.values():
        res.warnings.extend(m.get("warnings", []))
    res.cohort_csv, res.qc_html = _write_outputs(site, sessions, manifests)
    return res


def _map(todo: list[Session], raw: Path, images: Path, opts: Options, workers: int, progress: bool):
    from contextlib import nullcontext

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not todo:
        return
    bar = (Progress(TextColumn("preparing sessions"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)
           if progress else nullcontext())
    with bar:
        task = bar.add_task("prepare", total=len(todo)) if progress else None
        if workers == 1:
            _init_worker(opts.threads)
            for s in todo:
                yield _run_one(s, raw, images, opts)
                if progress:
                    bar.advance(task)
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # SimpleITK/ITK threads: never fork a threaded parent
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(opts.threads,)) as pool:
            futs = [pool.submit(_run_one, s, raw, images, opts) for s in todo]
            for f in as_completed(futs):
                yield f.result()
                if progress:
                    bar.advance(task)


def _write_outputs(site: Path, sessions: list[Session], manifests: dict[str, dict]):
    from client.prepare.qc import write_qc
    from shared.cohort import write_cohort

    rows, qc_rows = [], []
    for s in sessions:
        m = manifests.get(s.case_id)
        if m is None:
            continue
        row: dict = {"case_id": s.case_id, "patient_id": s.patient_id, **s.fields}
        for col, name in m["files"].items():
            row[col] = f"images/{s.case_id}/{name}"
        rows.append(row)
        qc_rows.append(dict(m["qc"]))
    if not rows:
        return None, None
    cohort = write_cohort(site, rows)
    _, html = write_qc(site, qc_rows)
    return cohort, html
