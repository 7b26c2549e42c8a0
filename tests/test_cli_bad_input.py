"""`gliofed train / predict / evaluate` skip a bad case with a reason instead of stopping on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fl_helpers import write_tiny_cohort
from typer.testing import CliRunner

from gliofed.cli import app
from tests.nifti_helpers import write_nii
from tests.test_image_safety import _bomb

BAD = {  # case -> (file to break, how, the reason printed)
    "A-case001": ("t1", "missing", "skipped A-case001: t1: missing file"),
    "A-case003": ("t2", "folder", ("skipped A-case003: t2: not a file (a folder or device where "
                                   "an image is expected)")),
    "A-case005": ("flair", "2d", "skipped A-case005: flair: not a 3D image (shape (16, 16))"),
    "A-case007": ("t1ce", "bomb", "skipped A-case007: t1ce: header claims 4096x4096x2048 voxels"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a small grading MODEL_DIR, a site with one unusable case per way of breaking one)."""
    root = tmp_path_factory.mktemp("cli")
    site = write_tiny_cohort(root / "site", n_cases=16)
    for cid, (col, how, _) in BAD.items():
        f = site / f"{cid}_{col}.nii.gz"
        f.unlink()
        if how == "folder":
            f.mkdir()
        elif how == "2d":
            write_nii(f, np.ones((16, 16), np.float32))
        elif how == "bomb":
            _bomb(f)
    model = root / "model"
    res = CliRunner().invoke(app, [
        "train", "--task", "grading", "--cohort", str(site), "--out", str(model), "--network",
        "small_cnn", "--epochs", "1", "--size", "16", "--batch-size", "4",
        "--cache-dir", str(root / "cache")])
    assert res.exit_code == 0, res.output
    for _, _, line in BAD.values():
        assert line in res.output
    return model, site


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIOFED_CACHE", str(tmp_path / "cache"))


def test_predict_and_evaluate_skip_bad_cases_with_a_reason(trained, tmp_path: Path) -> None:
    model, site = trained
    preds = tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["predict", "--model", str(model), "--cohort", str(site),
                                   "--out", str(preds)])
    assert res.exit_code == 0, res.output
    for _, _, line in BAD.values():
        assert line in res.output
    rows = preds.read_text().splitlines()[1:]
    assert len(rows) == 16 - len(BAD) and not any(r.split(",")[0] in BAD for r in rows)
    assert "12 predictions written" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--model", str(model), "--cohort", str(site),
                                   "--out", str(tmp_path / "ev"), "--split", "all"])
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("skipped ") for line in res.output.splitlines()) == len(BAD)


def test_nothing_left_is_an_error_not_a_traceback(trained, tmp_path: Path) -> None:
    model, site = trained
    empty = tmp_path / "gone"
    shutil.copytree(site, empty)
    for f in empty.glob("*_t1.nii.gz"):
        f.unlink()
    res = CliRunner().invoke(app, ["predict", "--model", str(model), "--cohort", str(empty),
                                   "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and "every one of the 16 cases was skipped" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_a_broken_model_dir_or_out_is_a_clear_error(trained, tmp_path: Path) -> None:
    model, site = trained
    r = CliRunner()
    trunc = tmp_path / "trunc"
    shutil.copytree(model, trunc)
    pt = trunc / "models" / "model.pt"
    pt.write_bytes(pt.read_bytes()[:200])
    res = r.invoke(app, ["predict", "--model", str(trunc), "--cohort", str(site), "--out",
                         str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and "model.pt: truncated or not a PyTorch state dict" in res.output
    other = tmp_path / "other"
    shutil.copytree(model, other)
    meta_path = other / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["task"] = "typing"  # grading weights under a typing label
    meta_path.write_text(json.dumps(meta))
    res = r.invoke(app, ["predict", "--model", str(other), "--cohort", str(site), "--out",
                         str(tmp_path / "p.csv")])
    assert res.exit_code == 2, res.output
    assert "these weights are not the typing small_cnn network" in res.output
    assert "as a grading or recurrence model" in res.output
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = r.invoke(app, ["predict", "--model", str(model), "--cohort", str(site), "--out",
                         str(blocker / "p.csv")])
    assert res.exit_code == 2 and f"cannot write --out {blocker / 'p.csv'}" in res.output
    res = r.invoke(app, ["evaluate", "--model", str(model), "--cohort", str(site), "--out",
                         str(blocker / "ev")])
    assert res.exit_code == 2 and "cannot write --out" in res.output


def test_duplicate_columns_stop_predict(trained, tmp_path: Path) -> None:
    model, site = trained
    dup = tmp_path / "dup"
    shutil.copytree(site, dup)
    lines = (dup / "cohort.csv").read_text().splitlines()
    lines = [lines[0] + ",grade"] + [ln + ",LGG" for ln in lines[1:]]
    (dup / "cohort.csv").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["predict", "--model", str(model), "--cohort", str(dup),
                                   "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and "duplicate column(s) grade" in res.output
