"""`gliofed site prepare`: seconds per session and peak memory (4 sequences at 1 mm), registration
accuracy on synthetic round trips, and SimpleITK vs ANTsPy for the template registration.

    python benchmarks/prepare_speed.py --speed-cases 2 --accuracy-cases 8 --threads 2

Speed: synthetic sessions (synth anatomy rendered at 2 mm, resampled to a 1 mm scanner grid, moved,
bias field, skull; DICOM) prepared one at a time with ``--threads`` ITK threads; wall seconds per
session and the process's peak RSS. Accuracy: round trips at ``--accuracy-spacing`` (known rigid
motion up to 15 deg / 20 mm): mean landmark error (mm) and brain-mask Dice with bootstrap 95% CIs.
``--ants``: the same N4-corrected reference registered to the same template by ANTsPy's ``Affine``
(if antspyx is installed), landmark error and seconds side by side with SimpleITK's two passes.
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


def speed(root: Path, n: int, threads: int) -> None:
    from client.prepare import prepare_site
    from simulations.synth.raw_scans import synth_case, write_raw_case

    raw = root / "raw1mm"
    for i in range(n):
        write_raw_case(raw, _upsample(synth_case(100 + i, 2.0), 2), f"s{i}", seed=200 + i)
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)
    per = []
    for i in range(n):
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = prepare_site(raw, root / f"site1mm_{i}", spacing=1.0, workers=1,
                           sessions_csv=_sessions(root, raw, [f"s{i}"]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert res.prepared == [f"s{i}"], res.errors
        per.append((wall, cpu))
        print(f"session {i}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    walls = [w for w, _ in per]
    print(f"SPEED 1 mm, 4 sequences, {threads} threads: {np.mean(walls):.1f} s/session wall "
          f"(min {min(walls):.1f}, max {max(walls):.1f}, n={n}), "
          f"{np.mean([c for _, c in per]):.1f} s CPU; peak RSS {rss:.0f} MiB")


def _sessions(root: Path, raw: Path, studies: list[str]) -> Path:
    p = root / f"sessions_{'_'.join(studies)}.csv"
    lines = ["case_id,patient_id,t1,t1ce,t2,flair"]
    lines += [f"{s},p-{s},{s}/t1,{s}/t1ce,{s}/t2,{s}/flair" for s in studies]
    p.write_text("\n".join(lines) + "\n")
    return p


def accuracy(root: Path, n: int, spacing: float, ants: bool) -> None:
    from client.prepare import prepare_site
    from simulations.synth.raw_scans import score_preparation, synth_case, write_raw_case

    raw = root / "rawacc"
    kinds = ("hgg", "lgg", "metastasis", "meningioma")
    cases = {f"a{i}": write_raw_case(raw, synth_case(300 + i, spacing, kinds[i % 4]), f"a{i}",
                                     seed=400 + i) for i in range(n)}
    t0 = time.perf_counter()
    res = prepare_site(raw, root / "siteacc", spacing=spacing, workers=1,
                       sessions_csv=_sessions(root, raw, list(cases)))
    print(f"accuracy set prepared in {time.perf_counter() - t0:.0f} s; errors: {res.errors}")
    lm, dc, rows = [], [], []
    for cid, case in cases.items():
        s = score_preparation(case, root / "siteacc" / "images" / cid)
        lm.append(s["landmark_mm"])
        dc.append(s["dice"])
        rows.append(f"{cid} ({case.kind}): landmark {s['landmark_mm']:.2f} mm "
                    f"(max {s['landmark_max_mm']:.2f}), Dice {s['dice']:.3f}")
    print("\n".join(rows))
    m, lo, hi = _bootstrap(lm)
    print(f"ACCURACY landmark error {m:.2f} mm (95% CI {lo:.2f}-{hi:.2f}), n={n}")
    m, lo, hi = _bootstrap(dc)
    print(f"ACCURACY brain-mask Dice {m:.3f} (95% CI {lo:.3f}-{hi:.3f}), n={n}")
    if ants:
        compare_ants(raw, cases, spacing)


def compare_ants(raw: Path, cases: dict, spacing: float) -> None:
    """Template registration only: SimpleITK (this pipeline's two passes) vs ANTsPy Affine."""
    try:
        import ants
    except ImportError:
        print("ANTS not installed (pip install antspyx): comparison skipped")
        return
    import SimpleITK as sitk

    from client.prepare import register
    from client.prepare.dicom import load_dicom_dir
    from simulations.synth.raw_scans import LPS, landmarks_mm

    fixed, brain = register.template(2.0)
    tmp = Path(tempfile.mkdtemp())
    sitk.WriteImage(fixed, str(tmp / "tpl.nii.gz"))
    ants_fixed = ants.image_read(str(tmp / "tpl.nii.gz"))
    out = {"sitk": ([], []), "ants": ([], [])}
    for cid, case in cases.items():
        vol, _, _ = load_dicom_dir(raw / cid / "t1ce")
        ref = register.n4(register.to_sitk(vol.data, vol.affine))
        true = case.motion["t1ce"] @ np.linalg.inv(case.out_to_tpl)
        pts = landmarks_mm()

        def err(fn, true=true, pts=pts) -> float:
            return float(np.mean([np.linalg.norm(fn(p) - (true[:3, :3] @ p + true[:3, 3]))
                                  for p in pts]))

        t0 = time.perf_counter()
        first = register.to_template(ref)
        bn = register.resample(brain, ref, first.transform.GetInverse(), label=True)
        tf = register.refine_to_template(ref, bn, first.transform).transform
        out["sitk"][1].append(time.perf_counter() - t0)
        out["sitk"][0].append(err(lambda p, tf=tf: LPS[:3, :3] @ np.array(
            tf.TransformPoint(tuple(LPS[:3, :3] @ p)))))
        sitk.WriteImage(ref, str(tmp / "mov.nii.gz"))
        mov = ants.image_read(str(tmp / "mov.nii.gz"))
        t0 = time.perf_counter()
        reg = ants.registration(ants_fixed, mov, type_of_transform="Affine")
        out["ants"][1].append(time.perf_counter() - t0)
        # ants_apply_transforms_to_points maps fixed-space points to moving space with the
        # fwdtransforms when whichtoinvert is False (points are LPS/ITK physical points)
        import pandas as pd

        df = pd.DataFrame((pts @ LPS[:3, :3].T), columns=["x", "y", "z"])
        moved = ants.apply_transforms_to_points(3, df, reg["invtransforms"],
                                                whichtoinvert=[True]).to_numpy()
        est = moved @ LPS[:3, :3].T
        out["ants"][0].append(float(np.mean(np.linalg.norm(
            est - (pts @ true[:3, :3].T + true[:3, 3]), axis=1))))
    for k, (e, t) in out.items():
        m, lo, hi = _bootstrap(e)
        print(f"TEMPLATE {k}: landmark {m:.2f} mm (95% CI {lo:.2f}-{hi:.2f}), "
              f"{np.mean(t):.1f} s/registration, n={len(e)}")
    shutil.rmtree(tmp, ignore_errors=True)


def predict_agreement(root: Path, cases: int, n_test: int, spacing: float, epochs: int) -> None:
    """A small grading model trained on a synth cohort (MNI field of view at ``spacing``); the test
    cases are turned into raw DICOM (moved, bias, skull) and prepared; the model's class on the
    prepared case is compared with its class on the original (seg left out of both)."""
    import nibabel as nib

    from client.prepare import prepare_site
    from shared.cohort import read_cohort, write_cohort
    from shared.models import build_model
    from shared.tasks import TASKS, select_samples
    from shared.training import TrainConfig, predict_probs, train_epochs
    from simulations.synth import generate_cohort
    from simulations.synth.raw_scans import RawCase, write_raw_case

    spec = TASKS["grading"]
    site = generate_cohort(root / "cohort", cases=cases, sites=1, spacing=spacing, seed=5, workers=1,
                           progress=False, tasks=("grading",))
    cohort = read_cohort(site)
    train, _ = select_samples(spec, cohort, "train")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(32, 32, 32), batch_size=4,
                      cache_dir=str(root / "cache"))
    model = build_model("small_cnn", 4, 2)
    train_epochs(model, train, spec, cfg, epochs=epochs)
    test = [c for c in cohort.cases if c.split != "train" and "grade" in c.labels][:n_test]
    raw = root / "rawpred"
    rows_orig, rows_prep = [], []
    for i, c in enumerate(test):
        imgs = {s: np.asarray(nib.load(str(c.images[s])).dataobj, np.float32)
                for s in ("t1", "t1ce", "t2", "flair")}
        aff = nib.load(str(c.images["t1"])).affine
        rc = RawCase(images=imgs, seg=np.zeros(imgs["t1"].shape, np.uint8), affine=aff,
                     out_to_tpl=np.eye(4))
        write_raw_case(raw, rc, c.case_id, seed=900 + i,
                       patient={"PatientName": "Bench^Patient", "PatientID": f"MRN{900 + i}"})
        base = {"case_id": c.case_id, "patient_id": c.patient_id, "grade": c.labels["grade"],
                "split": "test"}
        rows_orig.append({**base, **{s: str(c.images[s]) for s in imgs}})
        rows_prep.append(base)
    write_cohort(root / "orig", rows_orig)
    sessions = root / "sessions_pred.csv"
    sessions.write_text("case_id,patient_id,grade,t1,t1ce,t2,flair\n" + "".join(
        f"{r['case_id']},{r['patient_id']},{r['grade']},{r['case_id']}/t1,{r['case_id']}/t1ce,"
        f"{r['case_id']}/t2,{r['case_id']}/flair\n" for r in rows_prep))
    res = prepare_site(raw, root / "prep", spacing=spacing, workers=1, sessions_csv=sessions)
    assert not res.errors, res.errors
    cfg_eval = TrainConfig(task="grading", network="small_cnn", input_size=(32, 32, 32),
                           batch_size=4, cache_dir=None)
    s_orig, _ = select_samples(spec, read_cohort(root / "orig"), require_label=True)
    s_prep, _ = select_samples(spec, read_cohort(root / "prep"), require_label=True)
    p_orig = predict_probs(model, s_orig, spec, cfg_eval).argmax(1)
    p_prep = predict_probs(model, s_prep, spec, cfg_eval).argmax(1)
    truth = np.array([spec.classes.index(s.label) for s in s_orig])
    agree = (p_orig == p_prep).astype(float)
    m, lo, hi = _bootstrap(list(agree))
    print(f"PREDICT agreement original vs prepared {m:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
          f"n={len(agree)}; accuracy original {(p_orig == truth).mean():.3f}, prepared "
          f"{(p_prep == truth).mean():.3f}; classes predicted (orig) {np.bincount(p_orig, minlength=2)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-cases", type=int, default=2)
    ap.add_argument("--accuracy-cases", type=int, default=8)
    ap.add_argument("--accuracy-spacing", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ants", action="store_true")
    ap.add_argument("--predict-cases", type=int, default=0, help="synth cohort size (0: skip)")
    ap.add_argument("--predict-test", type=int, default=8)
    ap.add_argument("--predict-spacing", type=float, default=4.0)
    ap.add_argument("--predict-epochs", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    a = ap.parse_args()
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(a.threads)
    root = a.work or Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if a.speed_cases:
            speed(root, a.speed_cases, a.threads)
        if a.accuracy_cases:
            accuracy(root, a.accuracy_cases, a.accuracy_spacing, a.ants)
        if a.predict_cases:
            predict_agreement(root, a.predict_cases, a.predict_test, a.predict_spacing,
                              a.predict_epochs)
    finally:
        if a.work is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
