"""`gliofed site prepare` end to end on a synthetic hospital: round trip, broken inputs, de-identification,
resume, inferred sessions."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simulations.synth.raw_scans import (
    score_preparation,
    synth_case,
    write_dicom_series,
    write_raw_case,
)

SPACING = 3.0
PATIENT = {"PatientName": "Doe^Johnathan", "PatientID": "MRN-778812", "PatientBirthDate": "19580304",
           "InstitutionName": "Saint Example Hospital"}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            st = p.stat()
            h.update(f"{st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """RAW_DIR with one good DICOM session (moved head, bias, skull) plus every kind of broken input."""
    import nibabel as nib

    raw = tmp_path_factory.mktemp("raw")
    case = write_raw_case(raw, synth_case(11, SPACING), "good", seed=4, patient=PATIENT)
    # a 4D DCE series (4 frames, contrast arriving) and a NIfTI tumour mask drawn on the T1ce
    ref_affine = case.motion["t1ce"] @ case.affine
    dce = np.stack([case.images["t1"] * (1 + 0.3 * k * (case.seg == 4)) for k in range(4)], axis=3)
    write_dicom_series(raw / "good" / "dce", dce, ref_affine, "t1 dyn", "9.0", shuffle=2,
                       frame_times=[0.0, 4.5, 9.0, 13.5])
    nib.save(nib.Nifti1Image(case.seg, ref_affine), str(raw / "good_seg.nii.gz"))
    small = np.random.default_rng(0).uniform(0, 100, (10, 10, 8)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    gap = write_dicom_series(raw / "gap" / "t1ce", small, aff, "t1 post", "9.1", shuffle=None)
    gap[3].unlink()
    write_dicom_series(raw / "mixed" / "t1ce", small, aff, "t1 post", "9.2")
    write_dicom_series(raw / "mixed" / "t1ce" / "more", small * 2, aff, "t2", "9.2")
    (raw / "junk").mkdir()
    (raw / "junk" / "report.txt").write_text("not an image\n")
    (raw / "nifti").mkdir()
    nib.save(nib.Nifti1Image(small, aff), str(raw / "nifti" / "t1.nii.gz"))
    (raw / "nifti" / "broken.nii.gz").write_bytes((raw / "nifti" / "t1.nii.gz").read_bytes()[:60])
    (raw / "good" / "t1" / "DICOMDIR.txt").write_text("stray file in a series folder\n")
    rows = [
        ["case_id", "patient_id", "timepoint", "grade", "t1", "t1ce", "t2", "flair", "seg", "dce"],
        ["c-good", "p-1", "001", "HGG", "good/t1", "good/t1ce", "good/t2", "good/flair",
         "good_seg.nii.gz", "good/dce"],
        ["c-not1ce", "p-1", "002", "", "good/t1", "", "good/t2", "good/flair", "", ""],
        ["c-gap", "p-2", "001", "", "", "gap/t1ce", "", "", "", ""],
        ["c-mixed", "p-3", "001", "", "", "mixed/t1ce", "", "", "", ""],
        ["c-junk", "p-4", "001", "", "junk/report.txt", "", "", "", "", ""],
        ["c-badnii", "p-5", "001", "", "nifti/broken.nii.gz", "nifti/t1.nii.gz", "", "", "", ""],
        ["MRN-778812", "p-6", "001", "", "good/t1", "good/t1ce", "", "", "", ""],
    ]
    with (raw / "sessions.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    before = _tree_digest(raw)
    site = tmp_path_factory.mktemp("site")
    result = CliRunner().invoke(_app(), ["site", "prepare", str(raw), "--out", str(site),
                                         "--spacing", str(SPACING), "--workers", "2"])
    return raw, site, case, result, before


def _app():
    from gliofed.cli import app

    return app


def test_round_trip_recovers_brain_and_registration(hospital) -> None:
    _, site, case, _result, _ = hospital
    score = score_preparation(case, site / "images" / "c-good")
    assert score["dice"] >= 0.90, score
    assert score["landmark_mm"] <= 2.0, score


def test_skull_and_bias_are_removed(hospital) -> None:
    import nibabel as nib

    _, site, _, _, _ = hospital
    t1 = np.asarray(nib.load(str(site / "images/c-good/c-good_t1.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(site / "images/c-good/c-good_brain_mask.nii.gz")).dataobj) > 0
    assert np.all(t1[~mask] == 0)
    # the skull shell was 1.6x the brain's 99th percentile: nothing that bright is left
    assert float(np.percentile(t1[mask], 99.9)) < 1.3 * float(np.percentile(t1[mask], 99))
    # N4: the left and right halves of the white matter agree (the bias field made them differ)
    wm = mask & (t1 > np.percentile(t1[mask], 75))
    half = t1.shape[0] // 2
    left, right = np.median(t1[:half][wm[:half]]), np.median(t1[half:][wm[half:]])
    assert abs(left - right) / max(left, right) < 0.08


def test_mask_and_dce_are_carried_with_their_interpolation(hospital) -> None:
    import json

    import nibabel as nib

    _, site, case, _, _ = hospital
    seg = np.asarray(nib.load(str(site / "images/c-good/c-good_seg.nii.gz")).dataobj)
    assert set(np.unique(seg).tolist()) == set(np.unique(case.seg).tolist())  # nearest: no new labels
    # template space is the case scaled by its (known) deformation: volumes scale by its determinant
    scale = abs(np.linalg.det(case.out_to_tpl[:3, :3]))
    for label in (1, 2, 4):
        ratio = (seg == label).sum() / ((case.seg == label).sum() * scale)
        assert 0.85 < ratio < 1.15, (label, ratio)
    dce = nib.load(str(site / "images/c-good/c-good_dce.nii.gz"))
    assert dce.ndim == 4 and dce.shape[3] == 4
    side = json.loads((site / "images/c-good/c-good_dce.json").read_text())
    assert side == {"RepetitionTime": 0.005, "FlipAngle": 15.0, "FrameTimes": [0.0, 4.5, 9.0, 13.5]}
    d = np.asarray(dce.dataobj)
    enh = seg == 4
    assert d[enh, 3].mean() > 1.3 * d[enh, 0].mean()  # the enhancing voxels land on the mask


def test_each_broken_input_is_one_line_naming_the_file(hospital) -> None:
    raw, _site, _, result, _ = hospital
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    expect = {"gap": "missing slice", "mixed": "mixed series in one folder",
              "junk/report.txt": "neither a DICOM folder", "nifti/broken.nii.gz": "unreadable NIfTI"}
    for where, what in expect.items():
        hits = [e for e in errors if str(raw / where) in e and what in e]
        assert len(hits) == 1, (where, errors)
    assert any("case_id of case 'MRN-778812' contains the DICOM PatientID" in e for e in errors)
    assert "1 failed" not in result.output and "5 failed" in result.output
    assert any(f"{raw / 'good/t1/DICOMDIR.txt'}: not a DICOM file, ignored" in ln
               for ln in result.output.splitlines())
    assert any("c-not1ce has no t1ce: sequences co-registered to t1" in ln
               for ln in result.output.splitlines())


def test_output_passes_site_check_without_phi_warning(hospital) -> None:
    from client.site_check import check_site
    from shared.cohort import read_cohort

    raw, site, _, _, before = hospital
    cohort = read_cohort(site)
    assert [c.case_id for c in cohort.cases] == ["c-good", "c-not1ce"]
    assert set(cohort.cases[1].images) == {"t1", "t2", "flair"}
    assert cohort.cases[0].labels == {"grade": "HGG"} and cohort.cases[1].timepoint == "002"
    report = check_site(site, workers=1)
    assert report.problems == [], [str(p) for p in report.problems]
    grading = next(t for t in report.tasks if t.task == "grading")
    assert grading.total == 1
    assert _tree_digest(raw) == before  # RAW_DIR untouched


def test_no_patient_field_reaches_the_site_folder(hospital) -> None:
    import gzip

    _, site, _, _, _ = hospital
    needles = [v.lower().encode() for v in ("Johnathan", "MRN-778812", "19580304", "Saint Example",
                                            "20240131")]
    for p in site.rglob("*"):
        if not p.is_file() or p.parent.name == ".prepare":
            continue
        assert not any(n.decode() in p.name.lower() for n in needles)
        blob = p.read_bytes()
        if p.name.endswith(".gz"):
            blob = gzip.decompress(blob)[:352]  # the NIfTI header
        assert not any(n in blob.lower() for n in needles), p


def test_second_run_resumes_and_ignores_half_written_output(hospital) -> None:
    from client.prepare import prepare_site

    raw, site, _, _, _ = hospital
    stale = site / "images" / ".tmp-c-good-999"
    stale.mkdir()
    (stale / "c-good_t1.nii.gz").write_bytes(b"half")
    res = prepare_site(raw, site, spacing=SPACING, workers=1)
    assert res.prepared == [] and sorted(res.resumed) == ["c-good", "c-not1ce"]
    assert not stale.exists()
    assert (site / "qc" / "qc.html").exists()
    rows = list(csv.DictReader((site / "qc" / "qc.csv").open()))
    assert [r["case_id"] for r in rows] == ["c-good", "c-not1ce"]
    assert float(rows[0]["template_corr"]) > 0.5 and rows[0]["outlier"] == ""


def test_inferred_sessions_stop_for_review_then_prepare(hospital, tmp_path) -> None:
    import shutil

    raw, _, _, _, _ = hospital
    only = tmp_path / "raw"
    shutil.copytree(raw / "good", only / "scanner" / "study-a")
    site = tmp_path / "site"
    res = CliRunner().invoke(_app(), ["site", "prepare", str(only), "--out", str(site)])
    assert res.exit_code == 3, res.output
    rows = list(csv.DictReader((site / "sessions.csv").open()))
    # the DCE series was written under another StudyInstanceUID: a session of its own
    assert sorted(bool(r["dce"]) for r in rows) == [False, True]
    assert [r["t1"] for r in rows if r["dce"]] == [""]
    r = next(r for r in rows if not r["dce"])
    assert {r[c] for c in ("t1", "t1ce", "t2", "flair")} == {
        f"scanner/study-a/{s}" for s in ("t1", "t1ce", "t2", "flair")}
    # names come from the shipped rules: "t1ce axial" is t1ce, "t1 axial" is t1 (descriptions)
    assert r["t1ce"].endswith("t1ce") and r["patient_id"].startswith("pat-")
    assert "MRN" not in (site / "sessions.csv").read_text()
    assert r["timepoint"] == "001"
