"""gliofed synth: determinism, RANO labels recomputed independently, class properties, site effects.

The RANO check below measures lesions its own way (Feret diameters by an angle sweep on the slice of
largest area) and never calls simulations.synth.rano.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from shared.cohort import read_cohort
from shared.tasks import select_samples
from simulations.synth import generate_cohort, plan_cohort


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "site"
    return generate_cohort(out, cases=72, sites=3, shape=32, tasks=("typing", "rano", "recurrence"),
                           seed=3, workers=1, progress=False)


@pytest.fixture(scope="session")
def cohort(cohort_dir: Path):
    return read_cohort(cohort_dir)


def _vol(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_same_seed_same_bytes_for_any_worker_count(tmp_path: Path) -> None:
    kw = {"cases": 10, "sites": 2, "shape": 24, "seed": 11, "progress": False}
    a = _digest(generate_cohort(tmp_path / "a", workers=1, **kw))
    b = _digest(generate_cohort(tmp_path / "b", workers=2, **kw))
    c = _digest(generate_cohort(tmp_path / "c", workers=1, **{**kw, "seed": 12}))
    assert len(a) == 1 + 10 * 5  # cohort.csv + 5 NIfTI per session
    assert a == b
    assert a["cohort.csv"] != c["cohort.csv"]
    assert sum(a[k] == c.get(k) for k in a) <= 1


def test_held_out_test_cases_leave_the_cohort_as_it_was(tmp_path: Path) -> None:
    """``held_out_test``: more cases, all in the test split, every class; the SYN cases' images and
    derived splits are byte for byte those of the cohort without them (same training data)."""
    kw = {"cases": 14, "sites": 3, "shape": 16, "tasks": ("typing",), "seed": 5, "workers": 1,
          "progress": False}
    plain = generate_cohort(tmp_path / "plain", **kw)
    more = generate_cohort(tmp_path / "more", held_out_test=14, **kw)
    a, b = read_cohort(plain, seed=5), read_cohort(more, seed=5)
    assert not b.errors, [str(p) for p in b.errors]
    held = [c for c in b.cases if c.case_id.startswith("HT")]
    assert len(held) == 14 and {c.split for c in held} == {"test"}
    samples, _ = select_samples("typing", b)
    assert len({s.label for s in samples if s.case_id.startswith("HT")}) == 7  # every class, twice
    assert {c.case_id: c.split for c in a.cases} == {c.case_id: c.split for c in b.cases
                                                      if not c.case_id.startswith("HT")}
    da, db = _digest(plain), _digest(more)
    assert all(db[k] == v for k, v in da.items() if k != "cohort.csv")
    images = {v for k, v in da.items() if not k.endswith(("seg.nii.gz", ".csv"))}  # (a healthy seg:
    assert not images & {v for k, v in db.items() if "/HT" in k}  # all zero) new images, not copies


def test_cohort_contract_and_every_task_served(cohort) -> None:
    assert not cohort.errors, [str(p) for p in cohort.errors]
    assert {c.site for c in cohort.cases} == {"site-1", "site-2", "site-3"}
    for task in ("typing", "rano", "recurrence"):
        samples, _ = select_samples(task, cohort)
        assert len(samples) >= 15, task
    case = cohort.cases[0]
    assert case.images["t1"].name == f"{case.case_id}_t1.nii.gz"
    seg, _ = _vol(case.images["seg"])
    assert set(np.unique(seg)) <= {0, 1, 2, 4}


def test_plan_shares_cases_between_tasks_with_non_iid_sites() -> None:
    plans = plan_cohort(200, 4, ("grading", "typing", "rano", "recurrence"), seed=0)
    assert sum(2 if p.pool == "rano" else 1 for p in plans) == 200
    by_pool = {pool: [p for p in plans if p.pool == pool] for pool in ("typing", "grading", "rano", "recurrence")}
    assert all(len(v) >= 40 for v in by_pool.values()), {k: len(v) for k, v in by_pool.items()}
    rec = [p.kind for p in by_pool["recurrence"]]
    assert abs(rec.count("recurrence") / len(rec) - 0.82) < 0.03
    rano = [p.kind for p in by_pool["rano"]]
    assert rano.count("SD") + rano.count("PD") > len(rano) / 2  # LUMIERE-like: SD and PD dominate
    mixes = []
    for s in range(4):
        kinds = [p.kind for p in by_pool["typing"] if p.site == s]
        mixes.append(np.array([kinds.count(k) for k in sorted(set(rec + [p.kind for p in by_pool["typing"]]))]) / max(len(kinds), 1))
    assert max(np.abs(mixes[i] - mixes[j]).sum() for i in range(4) for j in range(i)) > 0.3


def test_bad_arguments_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['foo'\]"):
        generate_cohort(tmp_path / "x", cases=4, tasks=("foo",), progress=False)
    with pytest.raises(ValueError, match="not both"):
        generate_cohort(tmp_path / "x", cases=4, shape=32, spacing=2.0, progress=False)


# ---- independent RANO measurement -------------------------------------------------------------

def _feret(points: np.ndarray) -> tuple[float, float]:
    """Longest in-plane diameter and the extent perpendicular to it, by a 0.5-degree angle sweep."""
    ang = np.deg2rad(np.arange(0, 180, 0.5))
    dirs = np.stack([np.cos(ang), np.sin(ang)], 1)
    proj = points @ dirs.T
    extent = proj.max(0) - proj.min(0)
    i = int(np.argmax(extent))
    return float(extent[i]), float(extent[(i + 180) % 360])


def _my_spd(seg: np.ndarray, mm: float) -> tuple[float, list[np.ndarray]]:
    lab, n = ndi.label(np.isin(seg, (1, 4)), structure=np.ones((3, 3, 3)))
    total, comps = [], []
    for k in range(1, n + 1):
        comp = lab == k
        if not (seg[comp] == 4).any():
            continue
        comps.append(comp)
        per_slice = comp.sum((0, 1))
        z = int(np.argmax(per_slice))
        d1, d2 = _feret(np.argwhere(comp[:, :, z]) * mm)
        d1, d2 = d1 + mm, d2 + mm
        if d1 >= 10 and d2 >= 10 and (per_slice > 0).sum() >= 2:
            total.append(d1 * d2)
    return float(sum(sorted(total, reverse=True)[:5])), comps


def _measured_rano(cohort) -> tuple[dict[str, str], dict[str, str], list[float]]:
    """RANO labels of the follow-ups: (as written in cohort.csv, as measured here from the masks with
    an independent SPD / new-lesion rule), and each non-new-lesion pair's SPD-ratio distance to the
    50 % / 125 % cut-offs."""
    by_id = cohort.by_id()
    written: dict[str, str] = {}
    measured: dict[str, str] = {}
    gaps: list[float] = []
    for fu in (c for c in cohort.cases if "rano" in c.labels):
        seg1, aff = _vol(fu.images["seg"])
        seg0, _ = _vol(by_id[fu.baseline_case_id].images["seg"])
        mm = float(abs(aff[0, 0]))
        spd0, _ = _my_spd(seg0, mm)
        assert spd0 > 0, f"{fu.baseline_case_id}: baseline has no measurable lesion"
        if not (seg1 == 4).any():
            expect = "CR"
        else:
            spd1, comps = _my_spd(seg1, mm)
            old = ndi.binary_dilation(seg0 > 0, iterations=2)
            new = sum(
                1 for c in comps if not (c & old).any() and _my_spd(np.where(c, seg1, 0), mm)[0] > 0
            )
            ratio = spd1 / spd0
            expect = "PD" if new or ratio >= 1.25 else "PR" if ratio <= 0.5 else "SD"
            if not new and spd1 > 0:
                gaps.append(min(abs(ratio - 0.5), abs(ratio - 1.25)))
        written[fu.case_id], measured[fu.case_id] = fu.labels["rano"], expect
    return written, measured, gaps


def test_rano_labels_recomputed_from_masks(cohort) -> None:
    written, measured, gaps = _measured_rano(cohort)
    assert len(written) >= 15
    assert written == measured
    assert {"SD", "PD"} <= set(measured.values())
    # near_threshold=0 keeps SPD ratios about 10 points away from the 50 % / 125 % cut-offs
    assert gaps and np.mean(np.array(gaps) >= 0.05) >= 0.8, sorted(gaps)[:5]


# ---- class properties -------------------------------------------------------------------------

def _cases(cohort, cls: str):
    out = [c for c in cohort.cases if c.extra.get("synth_class") == cls and c.extra.get("synth_pool") == "typing"]
    assert out, f"no {cls} case in the test cohort"
    return out


def _centroid_mm(seg: np.ndarray, aff: np.ndarray, labels=(1, 4)) -> np.ndarray:
    idx = np.argwhere(np.isin(seg, labels)).mean(0)
    return aff[:3, :3] @ idx + aff[:3, 3]


def test_healthy_has_no_tumour_and_tumours_have_masks(cohort) -> None:
    for c in _cases(cohort, "healthy"):
        seg, _ = _vol(c.images["seg"])
        assert not seg.any()
    for cls in ("hgg", "lgg", "metastasis", "meningioma", "pituitary_adenoma", "acoustic_neuroma"):
        for c in _cases(cohort, cls):
            seg, _ = _vol(c.images["seg"])
            assert np.isin(seg, (1, 4)).any(), f"{c.case_id} ({cls}) has an empty tumour mask"


def test_meningioma_touches_the_brain_surface(cohort) -> None:
    for c in _cases(cohort, "meningioma"):
        seg, _ = _vol(c.images["seg"])
        t1, _ = _vol(c.images["t1"])
        outside = ndi.binary_fill_holes(t1 > 0) == 0
        near_surface = ndi.binary_dilation(outside, iterations=2)
        assert (near_surface & (seg == 4)).any(), f"{c.case_id}: meningioma away from the surface"


def test_hgg_rings_and_lgg_faint(cohort) -> None:
    for c in _cases(cohort, "hgg"):
        seg, _ = _vol(c.images["seg"])
        assert {1, 2, 4} <= set(np.unique(seg)), c.case_id  # necrosis, edema, enhancing rim
    for c in _cases(cohort, "lgg"):
        seg, _ = _vol(c.images["seg"])
        core = np.isin(seg, (1, 4)).sum()
        assert (seg == 4).sum() <= 0.35 * core, c.case_id  # non- or faintly enhancing


def test_metastasis_lesion_count(cohort) -> None:
    counts = []
    for c in _cases(cohort, "metastasis"):
        seg, _ = _vol(c.images["seg"])
        _, n = ndi.label(np.isin(seg, (1, 4)), structure=np.ones((3, 3, 3)))
        assert 1 <= n <= 5, f"{c.case_id}: {n} lesions"
        counts.append(n)
    from simulations.synth.anatomy import load_template
    from simulations.synth.lesions import build_class

    anat = load_template()
    rng = np.random.default_rng(0)
    multiple = np.mean([len(build_class("metastasis", rng, anat)) > 1 for _ in range(300)])
    assert 0.4 < multiple < 0.7  # "often multiple (about half or more)"


def _relative_to_head(c) -> np.ndarray:
    """Tumour centroid minus head centroid, mm (cases are rotated/shifted, so use the head itself)."""
    seg, aff = _vol(c.images["seg"])
    t1, _ = _vol(c.images["t1"])
    head = np.argwhere(t1 > 0).mean(0)
    return _centroid_mm(seg, aff) - (aff[:3, :3] @ head + aff[:3, 3])


def test_pituitary_sellar_and_schwannoma_at_cpa(cohort) -> None:
    for c in _cases(cohort, "pituitary_adenoma"):
        dx, dy, dz = _relative_to_head(c)  # midline, anterior-inferior (MNI: sella ~ (0, 15, -36))
        assert abs(dx) < 10 and -10 < dy < 35 and -55 < dz < -18, (c.case_id, dx, dy, dz)
    for c in _cases(cohort, "acoustic_neuroma"):
        dx, dy, dz = _relative_to_head(c)  # lateral, posterior fossa level (CPA ~ (+-26, -13, -40))
        assert 12 < abs(dx) < 45 and -35 < dy < 10 and -60 < dz < -18, (c.case_id, dx, dy, dz)


def test_recurrence_brighter_than_radiation_necrosis(cohort) -> None:
    ratios: dict[str, list[float]] = {"recurrence": [], "necrosis": []}
    for c in cohort.cases:
        lab = c.labels.get("recurrence")
        if lab is None:
            continue
        seg, _ = _vol(c.images["seg"])
        t1ce, _ = _vol(c.images["t1ce"])
        brain = (t1ce > 0) & (seg == 0)
        if (seg == 4).any():
            ratios[lab].append(float(t1ce[seg == 4].mean() / np.median(t1ce[brain])))
    assert ratios["recurrence"] and ratios["necrosis"]
    assert np.mean(ratios["recurrence"]) > np.mean(ratios["necrosis"])


def test_sites_differ_in_intensity(cohort) -> None:
    med: dict[str, list[float]] = {}
    for c in cohort.cases:
        t1, _ = _vol(c.images["t1"])
        med.setdefault(c.site, []).append(float(np.median(t1[t1 > 0])))
    site_medians = sorted(np.median(v) for v in med.values())
    assert site_medians[-1] / site_medians[0] > 1.15, site_medians


def test_no_single_size_or_enhancement_separates_classes() -> None:
    """Lesion volume and T1ce enhancement ranges of every pair of tumour classes overlap."""
    from simulations.synth.anatomy import load_template
    from simulations.synth.lesions import CLASSES, build_class

    anat = load_template()
    rng = np.random.default_rng(5)
    vol: dict[str, list[float]] = {}
    enh: dict[str, list[float]] = {}
    for cls in CLASSES[:-1]:
        for _ in range(150):
            les = build_class(cls, rng, anat)
            vol.setdefault(cls, []).append(sum(4.19 * le.blob.mean_radius**3 for le in les))
            enh.setdefault(cls, []).append(float(les[0].looks["enh"][1]))
    for a, va in vol.items():
        for b, vb in vol.items():
            if a < b:
                assert min(va) < max(vb) and min(vb) < max(va), (a, b)
    for a, b in (("hgg", "metastasis"), ("meningioma", "acoustic_neuroma"), ("hgg", "meningioma")):
        assert min(enh[a]) < max(enh[b]) and min(enh[b]) < max(enh[a]), (a, b)


@pytest.mark.slow
def test_rano_labels_recomputed_at_2mm(tmp_path: Path) -> None:
    """The same independent RANO check on the 2 mm MNI grid (30 pairs, about 35 s on 2 cores)."""
    out = generate_cohort(tmp_path / "r", cases=60, sites=2, spacing=2.0, tasks="rano", seed=1,
                          progress=False)
    written, measured, gaps = _measured_rano(read_cohort(out))
    assert len(written) >= 15
    assert written == measured
    assert {"SD", "PD"} <= set(measured.values())
    assert gaps and np.mean(np.array(gaps) >= 0.05) >= 0.8, sorted(gaps)[:5]
