"""Cohort generation: plan patients across tasks and sites, render them in parallel, write the site.

Owns :func:`generate_cohort` (the public entry point), the cohort plan (which patient serves which task,
with which class, at which site: label mixes differ per site, i.e. non-IID), the per-patient rendering
(one session, or a RANO baseline/follow-up pair), the NIfTI writing and the ``cohort.csv`` rows.

``cases`` counts imaging sessions (rows of cohort.csv, each with T1/T1ce/T2/FLAIR/seg). A RANO patient
has two sessions; every other patient one. The sessions are shared evenly between the requested tasks,
with RANO counting double so it gets as many labelled pairs as the others get cases: for 200 cases and
all four tasks, 40 typing cases (7 classes), 40 grading-only gliomas (+ the typing gliomas, which carry a
grade too), 40 RANO pairs (80 sessions) and 40 recurrence cases.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from simulations.cohort_mix import RECURRENCE_RATIO
from simulations.synth.lesions import CLASSES, build_class
from simulations.synth.rano import RANO_MIX, call_rano, target_ratio
from simulations.synth.recurrence import (
    build_postop_gbm,
    build_radiation_necrosis,
    build_recurrence,
)
from simulations.synth.shapes import make_blob

TASK_NAMES: tuple[str, ...] = ("grading", "typing", "rano", "recurrence")
SEQ_FILES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class PatientPlan:
    """One patient: which task pool it serves, its class (or RANO target), and its site."""

    index: int
    patient_id: str
    pool: str  # typing | grading | rano | recurrence | single
    kind: str  # tumour class, RANO target label, "recurrence"/"necrosis", or "postop"
    site: int  # 0-based


def _counts(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``total`` into ``weights`` (deterministic, sums to total)."""
    w = np.array(list(weights.values()), dtype=np.float64)
    raw = total * w / w.sum()
    base = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - base), kind="stable")[: total - base.sum()]:
        base[i] += 1
    return dict(zip(weights, (int(b) for b in base), strict=True))


def plan_cohort(cases: int, sites: int, tasks: Sequence[str], seed: int,
                recurrence_ratio: float = RECURRENCE_RATIO, hgg_fraction: float = 0.6,
                label_skew: bool = True) -> list[PatientPlan]:
    """Patients of the cohort (see the module docstring for how ``cases`` is shared out).

    ``label_skew=False``: every site gets the same class mix (each class dealt round robin over the
    sites), so the sites differ by scanner profile only (feature skew).
    """
    if isinstance(tasks, str):  # "grading,typing" or "grading"
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = tuple(dict.fromkeys(tasks))
    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad or not tasks:
        raise ValueError(f"unknown task(s) {bad or '(none)'}; choose from {', '.join(TASK_NAMES)}")
    if cases < 1 or sites < 1:
        raise ValueError(f"need at least one case and one site (got cases={cases}, sites={sites})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    pools: dict[str, list[str]] = {}
    leftover = 0
    # rano counts double: it gets as many labelled pairs as the other pools get sessions
    n_sessions = _counts(cases, {t: (2.0 if t == "rano" else 1.0) for t in tasks})
    for t in tasks:
        n = n_sessions[t]
        if t == "rano":
            pairs, odd = divmod(n, 2)
            leftover += odd
            pools[t] = [k for k, c in _counts(pairs, RANO_MIX).items() for _ in range(c)]
        elif t == "typing":
            pools[t] = [k for k, c in _counts(n, dict.fromkeys(CLASSES, 1.0)).items() for _ in range(c)]
        elif t == "grading":
            mix = {"hgg": hgg_fraction, "lgg": 1.0 - hgg_fraction}
            pools[t] = [k for k, c in _counts(n, mix).items() for _ in range(c)]
        else:
            mix = {"recurrence": recurrence_ratio, "necrosis": 1.0 - recurrence_ratio}
            pools[t] = [k for k, c in _counts(n, mix).items() for _ in range(c)]
    if leftover:
        single = next((t for t in ("typing", "grading", "recurrence") if t in pools), None)
        if single is None:
            pools["single"] = ["postop"] * leftover
        else:
            pools[single].append(pools[single][0] if pools[single] else "postop")
    # non-IID sites: every (pool, class) has its own site preference
    plans: list[PatientPlan] = []
    for pool, pool_kinds in pools.items():
        kinds = list(pool_kinds)
        order = rng.permutation(len(kinds))
        if not label_skew:
            dealt: dict[str, int] = {}
            for i in order:
                k = kinds[i]
                plans.append(PatientPlan(0, "", pool, k, dealt.setdefault(k, 0) % sites))
                dealt[k] += 1
            continue
        prefs = {k: rng.gamma(1.0, 1.0, sites) + 0.05 for k in sorted(set(kinds))}
        for i in order:
            k = kinds[i]
            p = prefs[k] / prefs[k].sum()
            plans.append(PatientPlan(0, "", pool, k, int(rng.choice(sites, p=p))))
    counts = np.bincount([p.site for p in plans], minlength=sites)
    for s in np.flatnonzero(counts == 0):  # every site gets at least one patient
        big = int(np.argmax(counts))
        j = max(i for i, p in enumerate(plans) if p.site == big)
        plans[j] = PatientPlan(0, "", plans[j].pool, plans[j].kind, int(s))
        counts[big] -= 1
        counts[s] += 1
    width = max(4, len(str(len(plans))))
    return [
        PatientPlan(i, f"SYN{i:0{width}d}", p.pool, p.kind, p.site) for i, p in enumerate(plans)
    ]


HELD_OUT_INDEX = 1_000_000  # plan indices from here are held-out test patients (own random streams)


def held_out_plans(cases: int, sites: int, tasks: Sequence[str], seed: int,
                   recurrence_ratio: float = RECURRENCE_RATIO) -> list[PatientPlan]:
    """``cases`` more sessions for the test split only: patients ``HT0000``..., planned from another
    seed with the same class mix at every site; indices from :data:`HELD_OUT_INDEX`, so their images
    come from random streams no ``SYN`` patient uses (site scanners are the cohort's own)."""
    extra = plan_cohort(cases, sites, tasks, seed + 7919, recurrence_ratio=recurrence_ratio,
                        label_skew=False)
    width = max(4, len(str(len(extra))))
    return [replace(p, index=HELD_OUT_INDEX + i, patient_id=f"HT{i:0{width}d}")
            for i, p in enumerate(extra)]


@dataclass(frozen=True)
class GridSpec:
    shape: int | None
    spacing: float | None


def _write(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _session_files(out: Path, case_id: str, grid, crop, images: np.ndarray, seg: np.ndarray) -> dict[str, str]:
    folder = out / "images" / case_id
    folder.mkdir(parents=True, exist_ok=True)
    rel: dict[str, str] = {}
    full = np.zeros(grid.shape, dtype=np.int16)
    for s, name in enumerate(SEQ_FILES):
        full[crop] = images[s]
        _write(folder / f"{case_id}_{name}.nii.gz", full, grid.affine)
        rel[name] = f"images/{case_id}/{case_id}_{name}.nii.gz"
    fseg = np.zeros(grid.shape, dtype=np.uint8)
    fseg[crop] = seg
    _write(folder / f"{case_id}_seg.nii.gz", fseg, grid.affine)
    rel["seg"] = f"images/{case_id}/{case_id}_seg.nii.gz"
    return rel


def render_patient(plan: PatientPlan, out: Path, seed: int, grid_spec: GridSpec, sites: int,
                   near_threshold: float, lesion_scale: float = 1.0) -> list[dict[str, object]]:
    """Render and write one patient's session(s); returns its cohort.csv rows.

    ``lesion_scale`` scales every tumour-class and recurrence/necrosis lesion (size shift for test
    cohorts built differently from the training cohort); RANO pairs keep their measured sizes.
    """
    from simulations.synth.anatomy import load_template, make_grid
    from simulations.synth.render import case_tissue_looks, random_deformation, render_session
    from simulations.synth.scanner import acquire, site_profile

    anat = load_template()
    grid = make_grid(anat, grid_spec.shape, grid_spec.spacing)
    site = site_profile(seed, plan.site)
    prng = np.random.default_rng(np.random.SeedSequence([seed, 2, plan.index]))
    looks = case_tissue_looks(prng)
    deform = random_deformation(prng, site.fov_offset)
    spacing = (grid.spacing,) * 3
    base = {"patient_id": plan.patient_id, "site": site.name, "synth_class": plan.kind,
            "synth_pool": plan.pool}
    rows: list[dict[str, object]] = []

    def emit(case_id: str, sess, tp: int, row: dict[str, object]) -> None:
        srng = np.random.default_rng(np.random.SeedSequence([seed, 3, plan.index, tp]))
        vols = acquire(srng, site, sess.images, sess.support, grid.spacing)
        files = _session_files(out, case_id, grid, sess.crop, vols, sess.seg)
        rows.append({"case_id": case_id, **base, **files, **row})

    if plan.pool == "rano" or plan.kind == "postop":
        for _ in range(6):  # the baseline needs a measurable lesion on this grid
            les0 = build_postop_gbm(prng, anat)
            s0 = render_session(anat, grid, deform, les0, looks)
            call0 = call_rano(s0.seg, s0.seg, spacing)
            if call0.spd0 > 0:
                break
        if plan.kind == "postop":
            emit(plan.patient_id, s0, 0, {"timepoint": "baseline"})
            return rows
        margin = 0.10 * (1.0 - float(np.clip(near_threshold, 0.0, 1.0)))
        target = plan.kind
        cavity, residual = les0[0], les0[1:]
        new_lesion = target == "PD" and prng.random() < 0.3
        ratio = target_ratio(prng, target, margin) if target != "CR" else 0.0
        scale = math.sqrt(ratio) if not new_lesion else float(prng.uniform(0.75, 1.1))
        extra_les = []
        if new_lesion:  # a new enhancing metastasis-like nodule away from the treated region
            far = [c for c in anat.gw_junction[prng.permutation(len(anat.gw_junction))[:400]]
                   if all(np.linalg.norm(c - le.blob.centre) > le.reach_mm + 15 for le in les0)]
            c = far[0] if far else anat.wm_deep[0]
            met = build_class("metastasis", prng, anat)[0]
            blob = make_blob(prng, c, max(prng.uniform(7.0, 11.0), 1.2 * grid.spacing), amp=0.05)
            extra_les = [replace(met, pattern="solid", blob=blob)]
        for _attempt in range(8):
            les1 = [cavity] if target == "CR" else [cavity, *(l.scaled(scale) for l in residual), *extra_les]
            s1 = render_session(anat, grid, deform, les1, looks)
            call = call_rano(s0.seg, s1.seg, spacing)
            residual_left = target != "PR" or call.spd1 > 0  # a PR keeps a measurable residue
            if target == "CR" or (call.label == target and call.margin >= margin and residual_left):
                break
            if new_lesion:  # the new lesion must be measurable (>= 10 mm both ways)
                extra_les = [l.scaled(1.25) for l in extra_les]
            elif not residual_left:
                scale *= 1.3
            elif 0 < call.ratio < float("inf"):  # aim the measured ratio at the sampled one
                scale *= math.sqrt(ratio / call.ratio)
            else:
                scale *= 1.2
        b_id, f_id = f"{plan.patient_id}_0", f"{plan.patient_id}_1"
        emit(b_id, s0, 0, {"timepoint": "baseline", "spd_mm2": round(call.spd0, 1)})
        emit(f_id, s1, 1, {"timepoint": "followup", "rano": call.label, "baseline_case_id": b_id,
                           "spd_mm2": round(call.spd1, 1),
                           "spd_ratio": round(call.ratio, 4) if np.isfinite(call.ratio) else "inf",
                           "new_lesions": call.new})
        return rows
    if plan.pool == "recurrence":
        builder = build_recurrence if plan.kind == "recurrence" else build_radiation_necrosis
        les = [l.scaled(lesion_scale) for l in builder(prng, anat)] if lesion_scale != 1.0 else builder(prng, anat)
        sess = render_session(anat, grid, deform, les, looks)
        emit(plan.patient_id, sess, 0, {"timepoint": "post-treatment", "recurrence": plan.kind})
        return rows
    lesions = build_class(plan.kind, prng, anat, min_radius=0.7 * grid.spacing / lesion_scale)
    if lesion_scale != 1.0:
        lesions = [l.scaled(lesion_scale) for l in lesions]
    sess = render_session(anat, grid, deform, lesions, looks)
    row: dict[str, object] = {"timepoint": "baseline"}
    if plan.pool == "typing":
        row["tumor_type"] = plan.kind
    if plan.kind in ("hgg", "lgg"):
        row["grade"] = plan.kind.upper()
    emit(plan.patient_id, sess, 0, row)
    return rows


def _worker_init() -> None:
    import nibabel.openers

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    nibabel.openers.Opener.default_compresslevel = 1


def generate_cohort(
    out_dir: str | Path,
    cases: int = 200,
    sites: int = 4,
    shape: int | None = None,
    spacing: float | None = None,
    tasks: Sequence[str] = TASK_NAMES,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    near_threshold: float = 0.0,
    recurrence_ratio: float = RECURRENCE_RATIO,
    lesion_scale: float = 1.0,
    label_skew: bool = True,
    held_out_test: int = 0,
) -> Path:
    """Write a synthetic multi-site cohort to ``out_dir`` (cohort.csv + NIfTI) and return ``out_dir``.

    Exactly one of ``shape`` (N^3 grid over the brain) and ``spacing`` (mm, the MNI field of view) may
    be given; neither means ``shape=64``. ``near_threshold`` in [0, 1] lets RANO SPD ratios come closer
    to the 50 % / 125 % cut-offs (0: at least 10 points away; 1: anywhere). ``workers`` defaults to all
    cores; the files do not depend on it. Files are identical for the same arguments on any machine.
    ``lesion_scale`` (default 1) multiplies lesion sizes: test cohorts with sizes training never saw.
    ``label_skew=False`` gives every site the same class mix (sites differ by scanner only).
    ``held_out_test`` adds that many more sessions (``HT...`` patients, other random draws, every site's
    class mix the same, the same scanners) whose ``split`` is ``test``: a larger pooled test set that
    leaves the ``SYN...`` cases (their images and their derived splits) exactly as without it.
    """
    from shared.cohort import write_cohort
    from simulations.synth.anatomy import load_template, make_grid

    if shape is None and spacing is None:
        shape = 64
    if shape is not None and spacing is not None:
        raise ValueError("give --shape or --spacing, not both")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    plans = plan_cohort(cases, sites, tasks, seed, recurrence_ratio=recurrence_ratio,
                        label_skew=label_skew)
    if held_out_test < 0:
        raise ValueError(f"held_out_test {held_out_test} is negative")
    if held_out_test > 0:
        plans += held_out_plans(held_out_test, sites, tasks, seed, recurrence_ratio)
    anat = load_template()  # loaded once here; forked workers inherit it
    make_grid(anat, shape, spacing)  # validates the grid before any work
    out.mkdir(parents=True, exist_ok=True)
    spec = GridSpec(shape, spacing)
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(plans)))
    results: dict[int, list[dict[str, object]]] = {}
    total = sum(2 if p.pool == "rano" else 1 for p in plans)
    bar = _progress(progress, total)
    if not 0.25 <= lesion_scale <= 4.0:
        raise ValueError(f"lesion_scale {lesion_scale} is outside 0.25-4")
    args = (out, seed, spec, sites, near_threshold, lesion_scale)
    try:
        if n_workers == 1:
            import nibabel.openers
            import torch

            saved = torch.get_num_threads(), nibabel.openers.Opener.default_compresslevel
            _worker_init()
            try:
                for p in plans:
                    results[p.index] = render_patient(p, *args)
                    bar.advance(len(results[p.index]))
            finally:  # leave the caller's process as it was
                torch.set_num_threads(saved[0])
                nibabel.openers.Opener.default_compresslevel = saved[1]
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork"),
                                     initializer=_worker_init) as pool:
                futs = {pool.submit(render_patient, p, *args): p.index for p in plans}
                for fut in as_completed(futs):
                    results[futs[fut]] = fut.result()
                    bar.advance(len(results[futs[fut]]))
    finally:
        bar.close()
    rows = [{**r, "split": "test"} if i >= HELD_OUT_INDEX else r
            for i in sorted(results) for r in results[i]]
    write_cohort(out, rows)
    return out


class _Bar:
    def __init__(self, enabled: bool, total: int) -> None:
        self._p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._p = Progress("[progress.description]{task.description}", BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn())
            self._p.start()
            self._t = self._p.add_task("synth sessions", total=total)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _progress(enabled: bool, total: int) -> _Bar:
    return _Bar(enabled, total)
