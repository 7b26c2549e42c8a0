"""`gliofed qtm fit` end to end on a tiny synthetic 4D DCE volume, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from gliofed.cli import app
from shared.dce import conc_to_signal, parker_aif, twocxm
from shared.dce.io import read_dce, write_dce

ARRIVAL_S = 12.0


def _phantom(tmp_path: Path, quantity: str = "concentration") -> tuple[Path, dict[str, np.ndarray]]:
    """16x16x2 volume, 60 frames at 5 s: background without contrast, two tissue blocks."""
    t = np.arange(60) * 5.0
    ca = parker_aif(t, ARRIVAL_S)
    truth = {k: np.zeros((16, 16, 2)) for k in ("fp", "ps", "ve", "vp")}
    blocks = [
        ((slice(2, 8), slice(2, 14)), (20.0, 0.02, 0.15, 0.03)),  # LGG-like
        ((slice(9, 15), slice(2, 14)), (80.0, 0.2, 0.35, 0.08)),
    ]  # HGG-like
    for (sx, sy), (fp, ps, ve, vp) in blocks:
        for name, value in zip(("fp", "ps", "ve", "vp"), (fp, ps, ve, vp)):
            truth[name][sx, sy, :] = value
    tissue = truth["fp"] > 0
    conc = np.zeros((16, 16, 2, 60))
    conc[tissue] = twocxm(
        t,
        ca,
        truth["fp"][tissue],
        truth["ps"][tissue],
        truth["ve"][tissue],
        truth["vp"][tissue],
        0.0,
    )
    conc += np.random.default_rng(0).normal(0, 0.001, conc.shape) * tissue[..., None]
    path = tmp_path / "case_dce.nii.gz"
    if quantity == "signal":
        data = conc_to_signal(conc, 1000.0, 1.2, 4.5, 0.005, 15.0)
        write_dce(
            path,
            data,
            t,
            Quantity="signal",
            RepetitionTime=0.005,
            FlipAngle=15.0,
            T10=1.2,
            Relaxivity=4.5,
            NumBaselineFrames=2,
            BolusArrivalTime=ARRIVAL_S,
        )
    else:
        write_dce(path, conc, t, BolusArrivalTime=ARRIVAL_S)
    return path, truth


@pytest.mark.parametrize("quantity", ["concentration", "signal"])
def test_qtm_fit_writes_maps_close_to_truth(tmp_path, quantity):
    path, truth = _phantom(tmp_path, quantity)
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        app, ["qtm", "fit", str(path), "--out", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "voxels converged" in result.output
    summary = json.loads((out / "case_dce_2cxm_fit.json").read_text())
    assert summary["voxels_fitted"] == 2 * 6 * 12 * 2  # exactly the two tissue blocks
    assert summary["bolus_arrival_s"] == ARRIVAL_S
    assert (out / "case_dce_2cxm_maps.png").stat().st_size > 0
    tissue = truth["fp"] > 0
    for name in ("fp", "ps", "ve", "vp"):
        fitted = np.asarray(nib.load(str(out / f"case_dce_{name}.nii.gz")).dataobj)
        assert fitted.shape == (16, 16, 2)
        rel = np.abs(fitted[tissue] - truth[name][tissue]) / truth[name][tissue]
        assert np.median(rel) < 0.1, name
        assert np.all(fitted[~tissue] == 0)
    ktrans = np.asarray(nib.load(str(out / "case_dce_ktrans.nii.gz")).dataobj)
    hgg, lgg = ktrans[10, 5, 0], ktrans[4, 5, 0]
    assert hgg > 3 * lgg  # the HGG-like block is visibly more permeable


def test_qtm_fit_extended_tofts_with_mask(tmp_path):
    path, _ = _phantom(tmp_path)
    mask = np.zeros((16, 16, 2), dtype=np.uint8)
    mask[10:12, 4:6, 0] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "et"
    result = CliRunner().invoke(
        app,
        [
            "qtm",
            "fit",
            str(path),
            "-o",
            str(out),
            "--model",
            "etofts",
            "--mask",
            str(tmp_path / "mask.nii.gz"),
            "--no-plot",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "case_dce_etofts_fit.json").read_text())["voxels_fitted"] == 4
    assert not (out / "case_dce_fp.nii.gz").exists()
    assert (out / "case_dce_ktrans.nii.gz").exists()


def test_qtm_fit_errors_name_the_file(tmp_path):
    path, _ = _phantom(tmp_path)
    sidecar = tmp_path / "case_dce.json"
    sidecar.unlink()
    result = CliRunner().invoke(app, ["qtm", "fit", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "case_dce.json: JSON sidecar for case_dce.nii.gz not found" in " ".join(
        result.output.split()
    )
    sidecar.write_text(json.dumps({"TemporalResolution": 5.0, "Quantity": "signal"}))
    with pytest.raises(ValueError, match="signal data need RepetitionTime"):
        read_dce(path)
    sidecar.write_text(json.dumps({"FrameTimes": [0, 1, 2]}))
    with pytest.raises(ValueError, match="FrameTimes has 3 entries but the image has 60 frames"):
        read_dce(path)


def test_bolus_arrival_is_estimated_when_the_sidecar_lacks_it(tmp_path):
    from shared.dce.maps import fit_series

    path, truth = _phantom(tmp_path)
    sidecar = tmp_path / "case_dce.json"
    meta = json.loads(sidecar.read_text())
    del meta["BolusArrivalTime"]
    sidecar.write_text(json.dumps(meta))
    maps, summary = fit_series(read_dce(path), device="cpu")
    assert abs(summary["bolus_arrival_s"] - ARRIVAL_S) <= 5.0  # within one frame
    tissue = truth["fp"] > 0
    # the per-voxel delay absorbs the offset between the estimate and the true arrival
    expected_delay = ARRIVAL_S - summary["bolus_arrival_s"]
    assert np.median(np.abs(maps["delay"][tissue] - expected_delay)) < 0.5
    rel = np.abs(
        maps["ktrans"][tissue]
        - (truth["ps"] * truth["fp"] / 100 / (truth["ps"] + truth["fp"] / 100))[tissue]
    )
    assert np.median(rel / maps["ktrans"][tissue].clip(1e-6)) < 0.1
