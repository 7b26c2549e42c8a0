"""`gliofed site check`: every kind of broken input reported, one line each, naming file and reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.site_check import check_site
from gliofed.cli import app
from shared.cohort import write_cohort
from tests.nifti_helpers import seg_array, write_nii


def _good_case(site: Path, cid: str, pid: str, **extra) -> dict:
    row = {"case_id": cid, "patient_id": pid, "grade": "HGG", "tumor_type": "hgg"}
    for s in ("t1", "t1ce", "t2", "flair"):
        row[s] = str(write_nii(site / cid / f"{s}.nii.gz").relative_to(site))
    row["seg"] = str(write_nii(site / cid / "seg.nii.gz", seg_array()).relative_to(site))
    row.update(extra)
    return row


@pytest.fixture()
def broken_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    rows = [_good_case(site, f"ok{i}", f"p{i}", split="train") for i in range(3)]
    # 1 missing file
    r = _good_case(site, "missing", "p10"); r["t2"] = "missing/nowhere.nii.gz"; rows.append(r)
    # 2 truncated gzip
    r = _good_case(site, "trunc", "p11")
    f = site / r["flair"]; f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]); rows.append(r)
    # 3 not a NIfTI at all
    r = _good_case(site, "garbage", "p12"); (site / r["t1"]).write_bytes(b"hello" * 100); rows.append(r)
    # 4 4D where 3D expected
    r = _good_case(site, "fourd", "p13")
    write_nii(site / r["t1ce"], np.random.rand(8, 8, 8, 3).astype(np.float32)); rows.append(r)
    # 5 NaN voxels
    r = _good_case(site, "nan", "p14"); d = np.random.rand(8, 8, 8).astype(np.float32); d[0, 0, :2] = np.nan
    write_nii(site / r["t2"], d); rows.append(r)
    # 6 constant image
    r = _good_case(site, "const", "p15"); write_nii(site / r["flair"], np.full((8, 8, 8), 7, np.float32))
    rows.append(r)
    # 7 shape mismatch
    r = _good_case(site, "shape", "p16"); write_nii(site / r["t2"], shape=(8, 8, 9)); rows.append(r)
    # 8 affine mismatch
    r = _good_case(site, "affine", "p17"); aff = np.eye(4); aff[0, 0] = 2.0
    write_nii(site / r["flair"], affine=aff); rows.append(r)
    # 9 seg label outside convention (BraTS 2023 style 3)
    r = _good_case(site, "seglab", "p18"); write_nii(site / r["seg"], seg_array(labels=(1, 2, 3)))
    rows.append(r)
    # 10 personal data in the header
    r = _good_case(site, "phi", "p19"); write_nii(site / r["t1"], descrip="Doe^John 1970-01-31")
    rows.append(r)
    # 11 patient in two splits
    rows.append(_good_case(site, "split2", "p0", split="test"))
    # 12 bad label value
    rows.append(_good_case(site, "badlabel", "p20", grade="GBM"))
    # 13 dce that is 3D
    r = _good_case(site, "dce3d", "p21"); r["dce"] = str(write_nii(site / "dce3d" / "dce.nii.gz").relative_to(site))
    rows.append(r)
    # 14 .nii whose header is corrupt (sizeof_hdr overwritten; nibabel would silently "fix" it)
    r = _good_case(site, "badhdr", "p22")
    f = write_nii(site / "badhdr" / "t1.nii"); raw = bytearray(f.read_bytes()); raw[0:4] = b"\x00" * 4
    f.write_bytes(bytes(raw)); r["t1"] = "badhdr/t1.nii"; rows.append(r)
    # 15 a person's name alone in aux_file (warning); a vendor string in descrip is not flagged
    r = _good_case(site, "phiname", "p23")
    write_nii(site / r["t2"], aux_file="DOE^JANE", descrip="Philips Medical Systems"); rows.append(r)
    # 16 4D dce without its JSON sidecar; 17 with a sidecar whose FrameTimes miss a frame
    r = _good_case(site, "dcenojson", "p24")
    r["dce"] = str(write_nii(site / "dcenojson" / "dce.nii.gz", shape=(8, 8, 8, 4)).relative_to(site))
    rows.append(r)
    r = _good_case(site, "dceframes", "p25")
    r["dce"] = str(write_nii(site / "dceframes" / "dce.nii.gz", shape=(8, 8, 8, 4)).relative_to(site))
    (site / "dceframes" / "dce.json").write_text('{"FrameTimes": [0, 5, 10]}')
    rows.append(r)
    write_cohort(site, rows)
    # 18 duplicate case id (appended by hand: write_cohort is the contract writer, not a validator)
    with (site / "cohort.csv").open("a") as fh:
        fh.write("ok1,p99" + "," * 14 + "\n")
    return site


def test_every_problem_is_reported_with_file_and_reason(broken_site: Path) -> None:
    rep = check_site(broken_site, workers=1)
    lines = [str(p) for p in rep.problems]
    text = "\n".join(lines)
    s = broken_site.resolve()
    expect = [
        f"ERROR {s}/missing/nowhere.nii.gz: missing file (referenced by column t2)",
        f"ERROR {s}/trunc/flair.nii.gz: truncated or corrupt image data",
        f"ERROR {s}/garbage/t1.nii.gz: unreadable NIfTI (BadGzipFile: Not a gzipped file)",
        f"ERROR {s}/fourd/t1ce.nii.gz: expected a 3D image for t1ce, got shape (8, 8, 8, 3)",
        f"ERROR {s}/nan/t2.nii.gz: 2 NaN/Inf voxel(s)",
        f"ERROR {s}/const/flair.nii.gz: constant image (every voxel = 7)",
        (f"ERROR {s}/shape/t2.nii.gz: case shape (cohort.csv line 11): shape (8, 8, 9) differs from t1 "
         "(8, 8, 8)"),
        (f"ERROR {s}/affine/flair.nii.gz: case affine (cohort.csv line 12): affine differs from t1 "
         "(sequences are not co-registered)"),
        f"ERROR {s}/seglab/seg.nii.gz: segmentation values [3] outside the convention 0/1/2/4",
        (f"WARNING {s}/phi/t1.nii.gz: header field descrip looks like a personal name and a date "
         "('Doe^John 1970-01-31'): possible personal data"),
        f"ERROR {s}/badhdr/t1.nii: bad NIfTI header (sizeof_hdr should be 348)",
        f"WARNING {s}/phiname/t2.nii.gz: header field aux_file looks like a personal name ('DOE^JANE')",
        "patient p0 is in more than one split: test (line 15), train (line 2); patient excluded",
        "case badlabel: grade 'GBM' is not one of LGG|HGG; label ignored",
        f"ERROR {s}/dce3d/dce.nii.gz: expected a 4D image for dce, got shape (8, 8, 8)",
        "duplicate case_id ok1 (first on line 3); row skipped",
        f"ERROR {s}/dcenojson/dce.json: JSON sidecar for dce.nii.gz not found (frame timing is required)",
        f"ERROR {s}/dceframes/dce.json: FrameTimes has 3 entries but the image has 4 frames",
    ]
    for e in expect:
        assert e in text, f"missing: {e}\n--- got ---\n{text}"
    assert all("\n" not in line for line in lines)
    assert not any("phiname" in line and "descrip" in line for line in lines)
    assert sum("fourd/t1ce" in line for line in lines) == 1  # a broken file is reported once
    assert not rep.ok
    grading = next(t for t in rep.tasks if t.task == "grading")
    # ok1, ok2 (ok0 is excluded with its patient p0); badlabel lost its label; broken files excluded
    assert grading.total == 2 + 2  # + phi and phiname (warnings only)
    # missing, trunc, garbage, fourd, nan, const, shape, affine, seglab, dce3d, badhdr, dcenojson, dceframes
    assert grading.excluded == 13
    assert [t.task for t in rep.tasks] == ["grading", "typing", "rano", "recurrence", "qtm"]


def test_clean_site_passes_and_cli_exit_codes(tmp_path: Path, broken_site: Path) -> None:
    site = tmp_path / "clean"
    write_cohort(site, [_good_case(site, f"c{i}", f"p{i}") for i in range(4)])
    r = CliRunner().invoke(app, ["site", "check", str(site)])
    assert r.exit_code == 0, r.output
    assert "0 error(s)" in r.output and "grading" in r.output
    r = CliRunner().invoke(app, ["site", "check", str(broken_site), "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["tasks"]["grading"]["bad_files"] == 13
    assert sum(p["severity"] == "warning" for p in doc["problems"]) == 2
    r = CliRunner().invoke(app, ["site", "check", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "site folder does not exist" in r.output


def test_check_modifies_nothing(broken_site: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in broken_site.rglob("*")}
    check_site(broken_site, workers=2)
    after = {p: p.stat().st_mtime_ns for p in broken_site.rglob("*")}
    assert before == after


def test_parallel_and_serial_agree(broken_site: Path) -> None:
    a = sorted(map(str, check_site(broken_site, workers=1).problems))
    b = sorted(map(str, check_site(broken_site, workers=2).problems))
    assert a == b


def test_pool_spawns_when_threads_are_running(broken_site: Path) -> None:
    """A caller with live threads (the client daemon's gRPC) gets spawned workers, same findings."""
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        from client.site_check import _pool_context

        assert _pool_context().get_start_method() == "spawn"
        a = sorted(map(str, check_site(broken_site, workers=2).problems))
    finally:
        stop.set()
        t.join()
    assert a == sorted(map(str, check_site(broken_site, workers=1).problems))
