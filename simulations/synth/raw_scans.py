"""Synthetic *raw* scanner output: a synth case moved rigidly, with a bias field and a bright skull,
written as one DICOM series per sequence (what `gliofed site prepare` receives from a hospital).

The truth travels with it (:class:`RawCase`): the case's map to the template (``out_to_tpl``) and the
head's rigid motion (``motion``, RAS mm), so the registration of a preparation can be scored: a template
point ``p`` truly lies at ``motion @ inv(out_to_tpl) @ p`` in scanner coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class RawCase:
    images: dict[str, np.ndarray]  # sequence -> (x, y, z) float32 as rendered (no skull, no bias)
    seg: np.ndarray
    affine: np.ndarray  # RAS voxel -> case mm (before motion)
    out_to_tpl: np.ndarray  # case mm -> template mm
    motion: dict[str, np.ndarray] = field(default_factory=dict)  # sequence -> 4x4 RAS rigid motion
    kind: str = "hgg"


def rigid_matrix(angles_deg, shift_mm, centre) -> np.ndarray:
    """4x4 rotation (x, y, z Euler angles) about ``centre`` followed by a shift (RAS mm)."""
    a = np.deg2rad(np.asarray(angles_deg, float))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
           @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    m = np.eye(4)
    m[:3, :3] = rot
    c = np.asarray(centre, float)
    m[:3, 3] = c - rot @ c + np.asarray(shift_mm, float)
    return m


def synth_case(seed: int, spacing: float, kind: str = "hgg") -> RawCase:
    """One rendered session (noise-free tissue signal) on the head's crop of the template grid."""
    from simulations.synth.anatomy import load_template, make_grid
    from simulations.synth.lesions import build_class
    from simulations.synth.render import (
        SEQUENCES,
        case_tissue_looks,
        random_deformation,
        render_session,
    )

    anat = load_template()
    grid = make_grid(anat, spacing=spacing)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 77]))
    looks = case_tissue_looks(rng)
    deform = random_deformation(rng, np.zeros(3))
    lesions = build_class(kind, rng, anat, min_radius=spacing)
    sess = render_session(anat, grid, deform, lesions, looks)
    aff = grid.affine.copy()
    aff[:3, 3] += aff[:3, :3] @ np.array([s.start for s in sess.crop], float)
    return RawCase(images={s: sess.images[i] for i, s in enumerate(SEQUENCES)}, seg=sess.seg,
                   affine=aff, out_to_tpl=deform, kind=kind)


def add_skull_and_bias(case: RawCase, seed: int) -> dict[str, np.ndarray]:
    """Each sequence with a smooth multiplicative bias (+-25 %), a dark 1-voxel gap and a bright
    2-voxel skull/scalp shell outside the head, and a little noise."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    head = next(iter(case.images.values())) > 0
    gap = ndi.binary_dilation(head, iterations=1)
    shell = ndi.binary_dilation(gap, iterations=2) & ~gap
    shape = head.shape
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    out = {}
    for name, img in case.images.items():
        c = rng.uniform(-1, 1, 3)
        bias = np.exp(0.25 * (c[0] * grids[0] + c[1] * grids[1] + c[2] * grids[2] * grids[0]))
        peak = float(np.percentile(img[head], 99))
        x = img.astype(np.float32).copy()
        x[shell] = peak * (1.6 if name in ("t1", "t1ce") else 0.9)
        x = x * bias.astype(np.float32)
        x += np.abs(rng.normal(0, 0.01 * peak, shape)).astype(np.float32)
        out[name] = x
    return out


def write_dicom_series(folder: Path, data: np.ndarray, affine_ras: np.ndarray, description: str,
                       study_uid: str, patient: dict[str, str] | None = None, shuffle: int | None = 0,
                       series_number: int = 1, frame_times: list[float] | None = None) -> list[Path]:
    """One file per slice (and per time frame for 4D data) with the geometry of ``affine_ras``
    (any orthogonal orientation: oblique is fine). Intensities stored as uint16 with a rescale slope.
    ``shuffle``: seed to shuffle file names vs slice order (None keeps order)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    vol = data if data.ndim == 4 else data[..., None]
    lps = LPS @ affine_ras
    cols_sp, rows_sp, step = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / cols_sp, lps[:3, 1] / rows_sp
    hi = float(max(vol.max(), 1e-6))
    slope = hi / 60000.0
    series_uid = generate_uid()
    nz, nt = vol.shape[2], vol.shape[3]
    order = np.arange(nz * nt)
    if shuffle is not None:
        np.random.default_rng(shuffle).shuffle(order)
    patient = patient or {"PatientName": "Anon^Synthetic", "PatientID": "PID-RAW-0001"}
    paths = []
    for n, idx in enumerate(order):
        k, t = int(idx % nz), int(idx // nz)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        for key, v in patient.items():
            setattr(ds, key, v)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.SeriesNumber = "20240131", series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = int(idx) + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{rows_sp:.6f}", f"{cols_sp:.6f}"]
        ds.SliceThickness = f"{step:.6f}"
        ds.RepetitionTime, ds.FlipAngle = "5.0", "15"
        if nt > 1:
            ds.TemporalPositionIdentifier = t + 1
            tsec = (frame_times[t] if frame_times else 5.0 * t) + 36000.0
            hh, rem = divmod(tsec, 3600)
            mm, ss = divmod(rem, 60)
            ds.AcquisitionTime = f"{int(hh):02d}{int(mm):02d}{ss:09.6f}"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        px = np.clip(np.rint(vol[:, :, k, t].T / slope), 0, 65535).astype(np.uint16)
        ds.PixelData = px.tobytes()
        p = folder / f"IM{n:05d}"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_raw_case(root: Path, case: RawCase, study: str, seed: int, max_deg: float = 15.0,
                   max_mm: float = 20.0, patient: dict[str, str] | None = None) -> RawCase:
    """The case as a hospital's DICOM: head moved by a random rigid motion (up to ``max_deg`` per
    axis and ``max_mm``), each sequence with its own small extra motion (up to 3 deg, 3 mm)."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    centre = case.affine[:3, :3] @ (np.array(case.seg.shape) / 2) + case.affine[:3, 3]
    head = rigid_matrix(rng.uniform(-max_deg, max_deg, 3), rng.uniform(-1, 1, 3) * max_mm
                        / np.sqrt(3), centre)
    scans = add_skull_and_bias(case, seed)
    study_uid = generate_uid()
    for i, (name, img) in enumerate(scans.items()):
        extra = rigid_matrix(rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3), centre) if i else np.eye(4)
        case.motion[name] = extra @ head
        write_dicom_series(root / study / name, img, case.motion[name] @ case.affine, f"{name} axial",
                           study_uid, patient, shuffle=seed + i, series_number=i + 1)
    return case


def landmarks_mm() -> np.ndarray:
    """Template (MNI) points spread over the brain: anatomical landmarks and a 3x3x3 lattice."""
    from simulations.synth.anatomy import BRAIN_CENTRE_MM, CPA_MM, SELLA_MM

    lattice = [BRAIN_CENTRE_MM + np.array([x, y, z]) for x in (-45, 0, 45) for y in (-55, 0, 50)
               for z in (-25, 0, 35)]
    return np.array([SELLA_MM, CPA_MM, CPA_MM * [-1, 1, 1], *lattice], float)


def score_preparation(case: RawCase, case_dir: Path, reference: str = "t1ce") -> dict[str, float]:
    """Registration error and brain-mask overlap of a prepared session against the truth.

    ``landmark_mm``: mean distance between where the preparation puts each template landmark in the
    scanner and where it truly is; ``dice``: the written brain mask against the template's brain
    carried through the true mapping (template -> case -> scanner) and back through the estimate.
    """
    import nibabel as nib
    import SimpleITK as sitk
    from nilearn import datasets
    from scipy import ndimage as ndi

    cid = case_dir.name
    est = sitk.ReadTransform(str(case_dir / f"{cid}_template_to_native.tfm"))
    true = case.motion[reference] @ np.linalg.inv(case.out_to_tpl)  # template mm -> scanner mm

    def est_ras(p: np.ndarray) -> np.ndarray:
        q = np.array(est.TransformPoint(tuple(float(v) for v in LPS[:3, :3] @ p)))
        return LPS[:3, :3] @ q

    pts = landmarks_mm()
    err = [np.linalg.norm(est_ras(p) - (true[:3, :3] @ p + true[:3, 3])) for p in pts]
    mask_img = nib.load(str(case_dir / f"{cid}_brain_mask.nii.gz"))
    mask = np.asarray(mask_img.dataobj) > 0
    idx = np.argwhere(mask | ndi.binary_dilation(mask, iterations=3))
    scanner = _est_many(est, mask_img.affine, mask.shape, idx)
    tpl_pts = (scanner - true[:3, 3]) @ np.linalg.inv(true[:3, :3]).T
    brain = datasets.load_mni152_brain_mask(resolution=1)
    bidx = np.rint((tpl_pts - brain.affine[:3, 3]) @ np.linalg.inv(brain.affine[:3, :3]).T).astype(int)
    bdata = np.asarray(brain.get_fdata()) > 0.5
    ok = np.all((bidx >= 0) & (bidx < bdata.shape), axis=1)
    truth = np.zeros(len(idx), bool)
    truth[ok] = bdata[tuple(bidx[ok].T)]
    got = mask[tuple(idx.T)]
    dice = 2.0 * float((truth & got).sum()) / float(truth.sum() + got.sum())
    return {"landmark_mm": float(np.mean(err)), "landmark_max_mm": float(np.max(err)), "dice": dice}


def _est_many(est, affine: np.ndarray, shape: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """RAS scanner points of the voxels ``idx`` of a grid (``affine``, ``shape``) through ``est``
    (any SimpleITK transform, B-spline included), via its displacement field on that grid."""
    import SimpleITK as sitk

    lin = LPS[:3, :3] @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    disp = sitk.TransformToDisplacementField(
        est, sitk.sitkVectorFloat64, [int(n) for n in shape[:3]],
        (LPS[:3, :3] @ affine[:3, 3]).tolist(), spacing.tolist(), (lin / spacing).ravel().tolist())
    d = sitk.GetArrayViewFromImage(disp)[idx[:, 2], idx[:, 1], idx[:, 0]]  # (z, y, x, 3) LPS mm
    lps = (idx @ affine[:3, :3].T + affine[:3, 3]) @ LPS[:3, :3].T
    return (lps + d) @ LPS[:3, :3].T
