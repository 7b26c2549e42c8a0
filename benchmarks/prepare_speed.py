"""`gliofed site prepare`: CPU seconds per session and peak memory (4 sequences at 1 mm), registration
accuracy on synthetic round trips (optionally with ``--deformable``), prediction agreement original vs
prepared through `gliofed train` / `gliofed predict`, and an export for SimpleITK vs ANTsPy.

    python benchmarks/prepare_speed.py --speed-cases 2 --cores 2 --accuracy-cases 12 --deformable \
        --predict-cases 64 --predict-test 16 --ants-export /tmp/ants_cmp
    /tmp/antsvenv/bin/python benchmarks/prepare_ants.py /tmp/ants_cmp   # a venv with antspyx only

Speed: synthetic sessions (synth anatomy rendered at 2 mm, resampled to a 1 mm scanner grid, moved,
bias field, skull; DICOM) prepared one after another in one fresh process pinned to ``--cores`` CPUs
with as many ITK threads; per session its CPU seconds (all threads) and wall seconds, and the
process's peak RSS. Wall seconds depend on the machine's load (printed with them); CPU seconds much
less. Accuracy: round trips at ``--accuracy-spacing`` (known rigid motion up to 15 deg / 20 mm): mean
landmark error (mm) and brain-mask Dice with bootstrap 95% CIs over cases.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _upsample(case, factor: int):
    """The case on a grid ``factor`` times finer (trilinear), same world geometry."""
    from scipy import ndimage as ndi

    shift = (1 - factor) / (2 * factor)  # voxel centres of the fine grid inside the coarse voxels
    for k, v in case.images.items():
        case.images[k] = ndi.zoom(v, factor, order=1, grid_mode=True, mode="nearest").astype(np.float32)
    case.seg = ndi.zoom(case.seg, factor, order=0, grid_mode=True, mode="nearest")
    aff = case.affine.copy()
    aff[:3, :3] /= factor
    aff[:3, 3] += case.affine[:3, :3] @ np.full(3, shift)
    case.affine = aff
    return case


def _bootstrap(x: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    a = np.asarray(x, float)
    rng = np.random.default_rng(seed)
    means = rng.choice(a, (n, a.size)).mean(1)
    return float(a.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _pin(cores: int) -> int:
    """Pin this process to its first ``cores`` allowed CPUs (where the OS allows); returns the count."""
    import os

    try:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:cores])
        return len(allowed[:cores])
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _prepare_timed(raw: Path, root: Path, ids: list[str], cores: int, spacing: float,
                   deformable: bool = False) -> tuple[list[tuple[float, float]], float, int]:
    """In a fresh process: prepare ``ids`` one at a time; ([(wall s, CPU s)], peak RSS MiB, cores)."""
    import os

    n = _pin(cores)
    os.environ["OMP_NUM_THREADS"] = str(n)
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(n)
    from client.prepare import prepare_site

    out = []
    for cid in ids:
        t0, c0 = time.perf_counter(), time.process_time()
        res = prepare_site(raw, root / f"site_{cid}_{deformable}", spacing=spacing, workers=1,
                           sessions_csv=_sessions(root, raw, [cid]), deformable=deformable)
        out.append((time.perf_counter() - t0, time.process_time() - c0))
        if res.errors:
            raise RuntimeError(f"{cid}: {res.errors}")
    return out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, n


def _in_fresh_process(fn, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def speed(root: Path, n: int, cores: int) -> None:
    import os

    from simulations.synth.raw_scans import synth_case, write_raw_case

    raw = root / "raw1mm"
    for i in range(n):
        write_raw_case(raw, _upsample(synth_case(100 + i, 2.0), 2), f"s{i}", seed=200 + i)
    load0 = os.getloadavg()[0]
    per, rss, used = _in_fresh_process(_prepare_timed, raw, root, [f"s{i}" for i in range(n)], cores,
                                       1.0)
    load1 = os.getloadavg()[0]
    for i, (w, c) in enumerate(per):
        print(f"session s{i}: {c:.1f} s CPU, {w:.1f} s wall", flush=True)
    walls, cpus = [w for w, _ in per], [c for _, c in per]
    print(f"SPEED prepare 1 mm, 4 sequences, {used} cores/ITK threads, n={n}: "
          f"{np.mean(cpus):.1f} s CPU/session (min {min(cpus):.1f}, max {max(cpus):.1f}), "
          f"{np.mean(walls):.1f} s wall/session (min {min(walls):.1f}, max {max(walls):.1f}; "
          f"load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs), "
          f"peak RSS {rss:.0f} MiB; target <= 60 s wall/session", flush=True)


def _sessions(root: Path, raw: Path, studies: list[str]) -> Path:
    p = root / f"sessions_{'_'.join(studies)}.csv"
    lines = ["case_id,patient_id,t1,t1ce,t2,flair"]
    lines += [f"{s},p-{s},{s}/t1,{s}/t1ce,{s}/t2,{s}/flair" for s in studies]
    p.write_text("\n".join(lines) + "\n")
    return p


def accuracy(root: Path, n: int, spacing: float, deformable: bool, ants_export: Path | None,
             cores: int) -> None:
    from simulations.synth.raw_scans import synth_case, write_raw_case

    raw = root / "rawacc"
    kinds = ("hgg", "lgg", "metastasis", "meningioma")
    cases = {f"a{i}": write_raw_case(raw, synth_case(300 + i, spacing, kinds[i % 4]), f"a{i}",
                                     seed=400 + i) for i in range(n)}
    for mode in (False, True) if deformable else (False,):
        per, _, _ = _in_fresh_process(_prepare_timed, raw, root, list(cases), cores, spacing, mode)
        _score(root, cases, mode, per)
    if ants_export is not None:
        export_for_ants(raw, cases, ants_export)


def _score(root: Path, cases: dict, deformable: bool, per: list[tuple[float, float]]) -> None:
    from simulations.synth.raw_scans import score_preparation

    label = "affine + B-spline (--deformable)" if deformable else "affine"
    lm, dc, rows = [], [], []
    for cid, case in cases.items():
        s = score_preparation(case, root / f"site_{cid}_{deformable}" / "images" / cid)
        lm.append(s["landmark_mm"])
        dc.append(s["dice"])
        rows.append(f"{cid} ({case.kind}, {label}): landmark {s['landmark_mm']:.2f} mm "
                    f"(max {s['landmark_max_mm']:.2f}), Dice {s['dice']:.3f}")
    print("\n".join(rows))
    ok = sum(a <= 2.0 and d >= 0.90 for a, d in zip(lm, dc))
    m, lo, hi = _bootstrap(lm)
    print(f"ACCURACY {label}: landmark error {m:.2f} mm (95% CI {lo:.2f}-{hi:.2f}), n={len(lm)}; ",
          end="")
    m, lo, hi = _bootstrap(dc)
    print(f"brain-mask Dice {m:.3f} (95% CI {lo:.3f}-{hi:.3f}); {ok}/{len(lm)} cases within 2 mm and "
          f"Dice 0.90; {np.mean([c for _, c in per]):.1f} s CPU/session", flush=True)


def export_for_ants(raw: Path, cases: dict, out: Path) -> None:
    """What the template registration sees (the N4-corrected 2 mm T1ce, the 2 mm template), the
    template landmarks and where they truly are (LPS), and SimpleITK's result (error, CPU seconds),
    for ``benchmarks/prepare_ants.py`` to run ANTsPy on in its own environment."""
    import json

    import SimpleITK as sitk

    from client.prepare import register
    from client.prepare.dicom import load_dicom_dir
    from simulations.synth.raw_scans import LPS, landmarks_mm

    out.mkdir(parents=True, exist_ok=True)
    fixed, _ = register.template(2.0)
    sitk.WriteImage(fixed, str(out / "template.nii.gz"))
    pts = landmarks_mm()
    for cid, case in cases.items():
        vol, _, _ = load_dicom_dir(raw / cid / "t1ce")
        small = register.coarse(register.to_sitk(vol.data, vol.affine), 2.0)
        ref = register.bias_field(small).correct(small)
        sitk.WriteImage(ref, str(out / f"{cid}_t1ce.nii.gz"))
        true = case.motion["t1ce"] @ np.linalg.inv(case.out_to_tpl)
        truth = pts @ true[:3, :3].T + true[:3, 3]
        c0 = time.process_time()
        tf = register.register_to_template(ref).transform
        cpu = time.process_time() - c0
        est = np.array([LPS[:3, :3] @ np.array(tf.TransformPoint(tuple(LPS[:3, :3] @ p))) for p in pts])
        (out / f"{cid}.json").write_text(json.dumps({
            "kind": case.kind, "template_points_lps": (pts @ LPS[:3, :3].T).tolist(),
            "true_points_lps": (truth @ LPS[:3, :3].T).tolist(),
            "sitk_landmark_mm": float(np.linalg.norm(est - truth, axis=1).mean()),
            "sitk_cpu_s": cpu}))
    print(f"ANTS export: {len(cases)} cases in {out} (run benchmarks/prepare_ants.py {out} in a "
          "venv with antspyx)", flush=True)


def _cli(*args: str) -> str:
    import subprocess

    res = subprocess.run([sys.executable, "-m", "gliofed", *args], capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise RuntimeError(f"gliofed {args[0]} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


def _predictions(csv_path: Path) -> dict[str, tuple[str, float]]:
    """case_id -> (predicted class, probability of HGG) from a `gliofed predict` CSV."""
    import csv

    with csv_path.open() as fh:
        return {r["case_id"]: (r["label"], float(r["prob_HGG"])) for r in csv.DictReader(fh)}


def _auc(truth: list[int], score: list[float]) -> float:
    pos = [s for t, s in zip(truth, score) if t]
    neg = [s for t, s in zip(truth, score) if not t]
    if not pos or not neg:
        return float("nan")
    return float(np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg]))


def predict_agreement(root: Path, cases: int, n_test: int, spacing: float, epochs: int,
                      network: str = "resnet10") -> None:
    """`gliofed train` (grading, 32^3) on a synth cohort; its test cases (LGG and HGG in equal numbers
    as far as the split allows) turned into raw DICOM (moved, bias, skull) and prepared; `gliofed
    predict` on the original and on the prepared cases; the classes compared case by case, and the HGG
    probabilities (mean and max absolute difference, correlation, AUC on each), so that a model which
    calls every case one class cannot pass for agreement (seg is not a model input)."""
    import nibabel as nib

    from client.prepare import prepare_site
    from shared.cohort import read_cohort, write_cohort
    from simulations.synth import generate_cohort
    from simulations.synth.raw_scans import RawCase, write_raw_case

    site = generate_cohort(root / "cohort", cases=cases, sites=1, spacing=spacing, seed=5,
                           workers=1, progress=False, tasks=("grading",))
    model = root / "model"
    if not (model / "configs" / "metadata.json").is_file():
        _cli("train", "--task", "grading", "--cohort", str(site), "--out", str(model), "--network",
             network, "--epochs", str(epochs), "--size", "32", "--batch-size", "4", "--cache-dir",
             str(root / "cache"))
    cohort = read_cohort(site)
    graded = [c for c in cohort.cases if c.split == "test" and "grade" in c.labels]
    by = {g: [c for c in graded if c.labels["grade"] == g] for g in ("LGG", "HGG")}
    test = by["LGG"][:n_test // 2] + by["HGG"][:n_test - min(n_test // 2, len(by["LGG"]))]
    raw, orig = root / "rawpred", root / "orig"
    rows_orig, lines = [], ["case_id,patient_id,grade,t1,t1ce,t2,flair"]
    for i, c in enumerate(test):
        imgs = {s: np.asarray(nib.load(str(c.images[s])).dataobj, np.float32)
                for s in ("t1", "t1ce", "t2", "flair")}
        aff = nib.load(str(c.images["t1"])).affine
        rc = RawCase(images=imgs, seg=np.zeros(imgs["t1"].shape, np.uint8), affine=aff,
                     out_to_tpl=np.eye(4))
        write_raw_case(raw, rc, c.case_id, seed=900 + i,
                       patient={"PatientName": "Bench^Patient", "PatientID": f"MRN{900 + i}"})
        row = {"case_id": c.case_id, "patient_id": c.patient_id, "grade": c.labels["grade"],
               "split": "test"}
        for s in imgs:
            (orig / c.case_id).mkdir(parents=True, exist_ok=True)
            shutil.copy(c.images[s], orig / c.case_id / f"{s}.nii.gz")
            row[s] = f"{c.case_id}/{s}.nii.gz"
        rows_orig.append(row)
        lines.append(f"{c.case_id},{c.patient_id},{c.labels['grade']},{c.case_id}/t1,"
                     f"{c.case_id}/t1ce,{c.case_id}/t2,{c.case_id}/flair")
    write_cohort(orig, rows_orig)
    sessions = root / "sessions_pred.csv"
    sessions.write_text("\n".join(lines) + "\n")
    res = prepare_site(raw, root / "prep", spacing=spacing, workers=1, sessions_csv=sessions)
    assert not res.errors, res.errors
    _cli("predict", "--model", str(model), "--cohort", str(orig), "--out", str(root / "p_orig.csv"))
    _cli("predict", "--model", str(model), "--cohort", str(root / "prep"), "--out",
         str(root / "p_prep.csv"))
    p_orig, p_prep = _predictions(root / "p_orig.csv"), _predictions(root / "p_prep.csv")
    ids = sorted(set(p_orig) & set(p_prep))
    truth = {c.case_id: c.labels["grade"] for c in test}
    agree = [float(p_orig[i][0] == p_prep[i][0]) for i in ids]
    m, lo, hi = _bootstrap(agree)
    diff = [abs(p_orig[i][1] - p_prep[i][1]) for i in ids]
    d_m, d_lo, d_hi = _bootstrap(diff)
    po, pp = [p_orig[i][1] for i in ids], [p_prep[i][1] for i in ids]
    r = float(np.corrcoef(po, pp)[0, 1]) if np.std(po) > 0 and np.std(pp) > 0 else float("nan")
    hgg = [int(truth[i] == "HGG") for i in ids]
    acc_o = np.mean([p_orig[i][0] == truth[i] for i in ids])
    acc_p = np.mean([p_prep[i][0] == truth[i] for i in ids])
    counts = {k: sum(p_orig[i][0] == k for i in ids) for k in ("LGG", "HGG")}
    for i in ids:
        print(f"  {i} {truth[i]}: original {p_orig[i][0]} p(HGG)={p_orig[i][1]:.3f}, prepared "
              f"{p_prep[i][0]} p(HGG)={p_prep[i][1]:.3f}")
    print(f"PREDICT gliofed predict, original vs prepared: same class {m:.3f} (95% CI {lo:.3f}-"
          f"{hi:.3f}), n={len(ids)} of {len(test)} test cases ({spacing:g} mm, truth "
          f"{sum(hgg)} HGG / {len(hgg) - sum(hgg)} LGG); |p(HGG) original - prepared| mean "
          f"{d_m:.3f} (95% CI {d_lo:.3f}-{d_hi:.3f}), max {max(diff):.3f}, correlation {r:.3f}; "
          f"AUC original {_auc(hgg, po):.3f}, prepared {_auc(hgg, pp):.3f}; accuracy original "
          f"{acc_o:.3f}, prepared {acc_p:.3f}; classes predicted on the originals {counts}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-cases", type=int, default=2)
    ap.add_argument("--cores", type=int, default=2, help="CPUs (and ITK threads) of the preparation")
    ap.add_argument("--accuracy-cases", type=int, default=8)
    ap.add_argument("--accuracy-spacing", type=float, default=2.0)
    ap.add_argument("--deformable", action="store_true", help="accuracy set also with --deformable")
    ap.add_argument("--ants-export", type=Path, default=None,
                    help="write the accuracy set's registration inputs for prepare_ants.py here")
    ap.add_argument("--predict-cases", type=int, default=0, help="synth cohort size (0: skip)")
    ap.add_argument("--predict-test", type=int, default=16)
    ap.add_argument("--predict-spacing", type=float, default=3.0)
    ap.add_argument("--predict-epochs", type=int, default=8)
    ap.add_argument("--predict-network", default="resnet10")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    a = ap.parse_args()
    root = a.work or Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if a.speed_cases:
            speed(root, a.speed_cases, a.cores)
        if a.accuracy_cases:
            accuracy(root, a.accuracy_cases, a.accuracy_spacing, a.deformable, a.ants_export,
                     a.cores)
        if a.predict_cases:
            predict_agreement(root, a.predict_cases, a.predict_test, a.predict_spacing,
                              a.predict_epochs, a.predict_network)
    finally:
        if a.work is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
