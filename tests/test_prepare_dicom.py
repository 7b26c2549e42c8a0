"""`site prepare` step 1: DICOM to NIfTI geometry on pydicom's real files and on written series."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.prepare.dicom import LPS_TO_RAS, DicomError, NotAVolume, load_dicom_dir, read_series
from simulations.synth.raw_scans import rigid_matrix, write_dicom_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MR_SMALL = sorted(TEST_FILES.glob("MR_small*.dcm"))


@pytest.mark.parametrize("path", MR_SMALL, ids=[p.name for p in MR_SMALL])
def test_single_slice_affine_matches_dicom_geometry(path: Path) -> None:
    ds = pydicom.dcmread(path)
    vol = read_series([str(path)], allow_single=True)
    assert vol.data.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(vol.data[:, :, 0], ds.pixel_array.T.astype(np.float32))
    iop = np.array(ds.ImageOrientationPatient, float)
    ps = np.array(ds.PixelSpacing, float)
    for i, j in ((0, 0), (63, 0), (0, 63), (17, 42)):
        lps = np.array(ds.ImagePositionPatient, float) + iop[:3] * ps[1] * i + iop[3:] * ps[0] * j
        ras = (vol.affine @ [i, j, 0, 1])[:3]
        assert np.abs(ras - LPS_TO_RAS[:3, :3] @ lps).max() < 0.01


def test_one_slice_is_reported_not_stacked() -> None:
    with pytest.raises(NotAVolume, match="one slice position") as err:
        read_series([str(MR_SMALL[0])])
    assert "\n" not in str(err.value) and str(MR_SMALL[0]) in str(err.value)


def test_pydicom_series_that_are_no_volume_are_reported_in_one_line() -> None:
    by_series: dict[str, list[str]] = defaultdict(list)
    files = [p for p in (TEST_FILES / "dicomdirtests" / "98892003").rglob("*") if p.is_file()]
    for p in files:
        by_series[str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)].append(str(p))
    reasons = []
    for members in by_series.values():
        with pytest.raises(NotAVolume) as err:
            read_series(members)
        assert "\n" not in str(err.value)
        reasons.append(err.value.reason)
    assert len(files) == 17 and len(by_series) >= 4
    assert any("mixed orientations" in r for r in reasons)  # three-plane pilot, angiography
    assert any("one slice position" in r for r in reasons)  # localizers


def test_truncated_file_is_one_line_error() -> None:
    with pytest.raises(DicomError) as err:
        read_series([str(TEST_FILES / "MR_truncated.dcm")], allow_single=True)
    assert "MR_truncated.dcm" in str(err.value) and "\n" not in str(err.value)


def _oblique(shape=(20, 24, 12), spacing=(0.9, 1.1, 2.5)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 1000, shape).astype(np.float32)
    aff = rigid_matrix([20, -12, 33], [5, -7, 11], [0, 0, 0]) @ np.diag([*spacing, 1.0])
    aff[:3, 3] += [-30, 40, -12]
    return data, aff


def test_oblique_shuffled_series_converts_to_the_source_voxels_and_world(tmp_path) -> None:
    import nibabel as nib

    data, aff = _oblique()
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "source.nii.gz"))
    write_dicom_series(tmp_path / "dcm", data, aff, "t1 oblique", "1.2.3", shuffle=7)
    src = nib.load(str(tmp_path / "source.nii.gz"))
    vol, warnings, phi = load_dicom_dir(tmp_path / "dcm")
    assert warnings == [] and "Synthetic" in "".join(phi["PatientName"])
    np.testing.assert_allclose(vol.affine, src.affine, atol=1e-4)
    # same voxel -> same world point and the same value (uint16 storage: 1/60000 of full scale)
    np.testing.assert_allclose(vol.data, src.get_fdata(), atol=1000 / 60000 + 1e-3)


def test_4d_series_stacks_frames_in_time_order(tmp_path) -> None:
    data, aff = _oblique(shape=(8, 9, 6, 5))
    times = [0.0, 3.5, 7.0, 10.5, 14.0]
    write_dicom_series(tmp_path / "dce", data, aff, "dce twist", "1.2.3", shuffle=1,
                       frame_times=times)
    vol, _, _ = load_dicom_dir(tmp_path / "dce")
    assert vol.data.shape == (8, 9, 6, 5)
    np.testing.assert_allclose(vol.frame_times, times, atol=1e-3)
    np.testing.assert_allclose(vol.data, data, atol=1000 / 60000 + 1e-3)
    assert vol.meta == {"RepetitionTime": 0.005, "FlipAngle": 15.0}


def test_enhanced_multiframe_file_uses_per_frame_geometry(tmp_path) -> None:
    from pydicom.dataset import Dataset

    data, aff = _oblique(shape=(10, 12, 7))
    write_dicom_series(tmp_path / "single", data, aff, "t2", "1.2.3", shuffle=None)
    frames = [pydicom.dcmread(p) for p in sorted((tmp_path / "single").iterdir())]
    import copy

    mf = copy.deepcopy(frames[0])
    mf.NumberOfFrames = len(frames)
    mf.PixelData = b"".join(f.PixelData for f in frames[::-1])  # stored in reverse slice order
    for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del mf[k]
    shared, measures, orient = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = frames[0].PixelSpacing, frames[0].SliceThickness
    orient.ImageOrientationPatient = frames[0].ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    mf.SharedFunctionalGroupsSequence = [shared]
    per = []
    for f in frames[::-1]:
        fg, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = f.ImagePositionPatient
        fg.PlanePositionSequence = [pos]
        per.append(fg)
    mf.PerFrameFunctionalGroupsSequence = per
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "enhanced.dcm", enforce_file_format=True)
    vol, _, _ = load_dicom_dir(tmp_path / "mf")
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    np.testing.assert_allclose(vol.data, data, atol=1000 / 60000 + 1e-3)


def test_missing_slice_and_mixed_series_are_named(tmp_path) -> None:
    data, aff = _oblique()
    files = write_dicom_series(tmp_path / "gap", data, aff, "t1", "1.2.3", shuffle=None)
    files[5].unlink()
    with pytest.raises(NotAVolume, match="missing slice") as err:
        load_dicom_dir(tmp_path / "gap")
    assert str(files[4]) in str(err.value)
    write_dicom_series(tmp_path / "mixed", data, aff, "t1", "1.2.3", shuffle=None)
    write_dicom_series(tmp_path / "mixed" / "more", data, aff, "t2", "1.2.3", shuffle=None)
    with pytest.raises(DicomError, match="mixed series in one folder"):
        load_dicom_dir(tmp_path / "mixed")
