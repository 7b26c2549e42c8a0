"""Write simulated DCE-MRI cases as a site folder in the cohort contract (``gliofed qtm simulate``).

Per case: ``<case>_dce.nii.gz`` (4D SPGR signal with Rician noise, float32) with its JSON sidecar
(frame times, TR, flip angle, T10, relaxivity, baseline frames; ``GroundTruth`` naming the
ground-truth maps; ``Simulation`` with the case's draws), ``<case>_seg.nii.gz`` (4 viable tumour,
1 necrotic core) and ``<case>_gt_<map>.nii.gz`` for fp, vp, ve, ps, ktrans, umag. cohort.csv rows carry
``dce``, ``seg``, ``grade``, ``site`` and a patient-level ``split``.

Sites differ in acquisition protocol (``SITE_PROTOCOLS``): frame rate, duration, flip angle, SNR.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.qtm.phantom import MAP_UNITS, Protocol, baseline_frames, case_summary, simulate_cases

SITE_PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(frame_s=5.0, duration_s=300.0, flip_deg=15.0, snr=40.0),
    Protocol(frame_s=2.5, duration_s=240.0, tr_s=0.004, flip_deg=12.0, snr=25.0),
    Protocol(frame_s=7.0, duration_s=360.0, flip_deg=20.0, snr=60.0),
    Protocol(frame_s=4.0, duration_s=300.0, tr_s=0.006, flip_deg=18.0, snr=18.0),
)


def _write_case(site_dir: Path, case_id: str, case, with_concentration: bool = False) -> dict[str, str]:
    import nibabel as nib

    from shared.dce.io import write_dce

    p = case.protocol
    affine = np.diag([case.params.spacing] * 3 + [1.0])
    gt = {}
    for name, volume in case.maps.items():
        fname = f"{case_id}_gt_{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(site_dir / fname))
        gt[name] = fname
    nib.save(nib.Nifti1Image(case.seg.astype(np.uint8), affine), str(site_dir / f"{case_id}_seg.nii.gz"))
    extra = {}
    if with_concentration:  # the noise-free 4D tissue concentration (mM), same frames as the signal
        write_dce(site_dir / f"{case_id}_conc.nii.gz", case.concentration, case.times_s, affine,
                  Quantity="concentration", Description="noise-free simulated tissue concentration")
        extra["TrueConcentration"] = f"{case_id}_conc.nii.gz"
    write_dce(site_dir / f"{case_id}_dce.nii.gz", case.signal, case.times_s, affine,
              Quantity="signal", RepetitionTime=p.tr_s, FlipAngle=p.flip_deg, T10=p.t10_s,
              Relaxivity=p.r1, NumBaselineFrames=baseline_frames(case.params.bolus_arrival_s, p.frame_s),
              Hematocrit=0.42, GroundTruth=gt, GroundTruthUnits=MAP_UNITS, Simulation=case_summary(case),
              **extra)
    return {"dce": f"{case_id}_dce.nii.gz", "seg": f"{case_id}_seg.nii.gz"}


def generate_qtm_cohort(out: Path, cases: int, sites: int = 1, seed: int = 0,
                        protocols: tuple[Protocol, ...] | None = None,
                        shape: tuple[int, int, int] = (32, 32, 16), test_fraction: float = 0.25,
                        progress: Callable[[int], None] | None = None, workers: int = 1,
                        with_concentration: bool = False) -> Path:
    """``cases`` cases (alternating LGG/HGG) spread over ``sites`` sites; returns cohort.csv's path.

    ``workers`` > 1 simulates in that many processes (files are written by this one, in order);
    ``with_concentration`` also writes each case's noise-free 4D concentration (``<case>_conc.nii.gz``).

    Site k uses ``protocols[k % len(protocols)]``; the split is drawn per patient (one case each)
    with a fixed seed, stratified by grade.
    """
    from shared.cohort import write_cohort

    if cases < 2:
        raise ValueError("qtm simulate: need at least 2 cases (one of each grade)")
    protocols = protocols or SITE_PROTOCOLS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    grades = ["LGG" if i % 2 == 0 else "HGG" for i in range(cases)]
    test = set()
    for g in ("LGG", "HGG"):
        idx = [i for i, x in enumerate(grades) if x == g]
        k = round(test_fraction * len(idx))
        test.update(rng.choice(idx, size=k, replace=False).tolist() if k else [])
    jobs = [(grade, seed * 100003 + 50000 + i, protocols[(i % sites) % len(protocols)], tuple(shape))
            for i, grade in enumerate(grades)]
    for i, case in enumerate(simulate_cases(jobs, workers)):
        site = i % sites
        case_id = f"QTM-{seed:03d}-{i:04d}"
        files = _write_case(out, case_id, case, with_concentration)
        rows.append({"case_id": case_id, "patient_id": case_id, "timepoint": "", **files,
                     "grade": grades[i], "site": f"site-{site}", "split": "test" if i in test else "train"})
        if progress:
            progress(1)
    return write_cohort(out, rows)
