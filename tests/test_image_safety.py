"""Hostile site folders: decompression bombs, paths that leave the site, header tricks, empty sites."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from client.site_check import check_image, check_site
from gliofed.cli import app
from shared import imageio
from shared.cohort import CohortError, read_cohort, write_cohort
from tests.nifti_helpers import write_nii

SEQS = ("t1", "t1ce", "t2", "flair")


def _bomb(path: Path, shape=(4096, 4096, 2048)) -> Path:
    """A tiny .nii.gz whose header promises ``shape`` float32 voxels (128 GiB here)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)
    return path


def _case(site: Path, cid: str, **over) -> dict:
    row = {"case_id": cid, "patient_id": f"p-{cid}", "grade": "HGG"}
    for s in ("t1", "t1ce", "t2", "flair"):
        row[s] = str(write_nii(site / cid / f"{s}.nii.gz").relative_to(site))
    row.update(over)
    return row


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 10_000
    tracemalloc.start()
    info = check_image(str(bomb), "t1")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [p.message for p in info.problems] == [(
        "header claims 4096x4096x2048 voxels of float32: 128.00 GiB to read, over the 1024 MiB "
        "per-image limit (node config max-image-mb, --max-image-mb)")]
    assert peak < 20 << 20  # nothing near the promised size was allocated
    tracemalloc.start()
    with pytest.raises(imageio.ImageTooLarge):
        imageio.open_image(bomb)  # train / predict / evaluate open every input with it (screen.py)
    assert tracemalloc.get_traced_memory()[1] < 20 << 20  # refused from the header alone
    tracemalloc.stop()


def test_zeros_that_compress_tiny_hit_a_lower_limit_and_checks_stream(tmp_path: Path) -> None:
    img = write_nii(tmp_path / "zeros.nii.gz", np.zeros((128, 128, 128), np.float32))  # 8 MiB
    assert img.stat().st_size < 100_000
    rep = check_image(str(img), "t1", limit_mb=4)
    assert "8 MiB" not in rep.problems[0].message and "over the 4 MiB per-image limit" in \
        rep.problems[0].message
    data = np.random.default_rng(0).random((128, 128, 128)).astype(np.float32)
    data[5, 6, 100] = np.nan
    noisy = write_nii(tmp_path / "noisy.nii.gz", data)
    old = imageio.SLAB_BYTES
    try:
        imageio.SLAB_BYTES = 1 << 20
        slabs = list(imageio.iter_slabs(nib.load(str(noisy), keep_file_open=True), 1 << 20))
        assert len(slabs) == 16 and sum(s.size for s in slabs) == data.size
        tracemalloc.start()
        info = check_image(str(noisy), "t1")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        imageio.SLAB_BYTES = old
    assert [p.message for p in info.problems] == ["1 NaN/Inf voxel(s)"]
    assert peak < data.nbytes  # streamed: never the whole 8 MiB volume (64 MiB slabs by default)


def test_paths_that_leave_the_site_are_errors_naming_row_and_column(tmp_path: Path) -> None:
    site, outside = tmp_path / "site", tmp_path / "elsewhere"
    secret = outside / "shadow"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"root:$6$SECRETHASH:19000:0:99999:7:::\n" * 20)
    public = write_nii(outside / "public" / "t1.nii.gz")
    rows = [_case(site, "ok"), _case(site, "dotdot", t2="../../../../etc/passwd"),
            _case(site, "link"), _case(site, "pub")]
    (site / "link" / "t1ce.nii.gz").unlink()
    os.symlink(secret, site / "link" / "t1ce.nii.gz")
    (site / "pub" / "flair.nii.gz").unlink()
    os.symlink(public, site / "pub" / "flair.nii.gz")
    write_cohort(site, rows)
    rep = check_site(site, workers=1)
    text = "\n".join(map(str, rep.problems))
    assert "SECRET" not in text and "root:" not in text  # no byte of the target is echoed
    for line, cid, col, rel in ((3, "dotdot", "t2", "../../../../etc/passwd"),
                                (4, "link", "t1ce", "link/t1ce.nii.gz"),
                                (5, "pub", "flair", "pub/flair.nii.gz")):
        assert (f"cohort.csv:{line}: case {cid}: column {col} ({rel}) leads outside the site "
                "folder") in text, text
    grading = next(t for t in rep.tasks if t.task == "grading")
    assert grading.total == 1 and not rep.ok
    # an explicitly allowed outside folder (CLI, node config or importers' allowed-roots.txt)
    cohort = read_cohort(site, allow_outside=[outside / "public"])
    assert [c.case_id for c in cohort.cases if c.has_images(SEQS)] == ["ok", "pub"]
    r = CliRunner().invoke(app, ["site", "check", str(site), "--allow-outside", str(outside)])
    assert "leads outside" in r.output and "pub/flair" not in r.output  # link -> shadow: not NIfTI
    assert "SECRET" not in r.output and "root:" not in r.output
    write_cohort(site, rows, outside_roots=[outside / "public"])
    assert (site / "allowed-roots.txt").read_text().endswith(f"{(outside / 'public').resolve()}\n")
    assert [c.case_id for c in read_cohort(site).cases if c.has_images(SEQS)] == ["ok", "pub"]


def test_header_bytes_are_never_echoed(tmp_path: Path) -> None:
    raw = bytearray(b"Q" * 352)
    raw[0:4] = (348).to_bytes(4, "little")
    raw[344:348] = b"SHDW"
    f = tmp_path / "t1.nii"
    f.write_bytes(bytes(raw))
    msgs = [p.message for p in check_image(str(f), "t1").problems]
    assert msgs and msgs[0].startswith("bad NIfTI header (")
    assert "magic string is not a NIfTI one" in msgs[0]
    assert not any("SHDW" in m or "QQ" in m or "20817" in m for m in msgs), msgs


def test_duplicate_columns_and_an_empty_site_are_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup"
    write_cohort(dup, [_case(dup, "a")])
    text = (dup / "cohort.csv").read_text().splitlines()
    (dup / "cohort.csv").write_text("\n".join([text[0] + ",grade", text[1] + ",LGG"]) + "\n")
    with pytest.raises(CohortError, match=r"cohort.csv:1: duplicate column\(s\) grade"):
        read_cohort(dup)
    r = CliRunner().invoke(app, ["site", "check", str(dup)])
    assert r.exit_code == 1 and "duplicate column(s) grade" in r.output
    empty = tmp_path / "empty"
    write_cohort(empty, [])
    r = CliRunner().invoke(app, ["site", "check", str(empty)])
    assert r.exit_code == 1 and "no usable rows: an empty site cannot take part" in r.output


def test_qform_and_sform_that_disagree_draw_a_warning(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((20, 20, 20)).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    q = np.diag([-1.0, 1, 1, 1])
    q[0, 3] = 40.0  # x flipped and 40 mm apart
    img.set_qform(q, code=1)
    img.set_sform(np.eye(4), code=1)
    nib.save(img, str(tmp_path / "t1.nii.gz"))
    warn = [p for p in check_image(str(tmp_path / "t1.nii.gz"), "t1").problems]
    assert [p.severity for p in warn] == ["warning"]
    assert warn[0].message.startswith("qform and sform disagree (they place the volume up to 40.0 mm")
    img.set_qform(np.eye(4), code=1)
    nib.save(img, str(tmp_path / "same.nii.gz"))
    assert check_image(str(tmp_path / "same.nii.gz"), "t1").problems == ()
