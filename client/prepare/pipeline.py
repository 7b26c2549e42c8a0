"""One session from raw scans to the site folder, and the whole site in parallel, resumably.

Per session (:func:`prepare_session`): convert each source (DICOM folder or NIfTI), a 2 mm copy
for the registrations, N4 estimated on it (the field is applied to that copy and, once, on the
output grid: no full-resolution intermediate image), rigid co-registration to T1ce (T1 when absent),
affine registration of that reference to the MNI152 template (a second pass restricted to the
brain), one resampling per image onto the template grid, skull stripping, QC PNG. Everything is written into ``images/.tmp-<case>-<pid>/`` and renamed to
``images/<case>/`` at the end, with ``session.json`` as the last file: a folder without it was never
finished; a finished one is skipped on the next run. RAW_DIR is only read.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.prepare.sessions import Session

MANIFEST = "session.json"
SEQ3D = ("t1", "t1ce", "t2", "flair")


class SessionError(Exception):
    """A session that cannot be prepared; ``str()`` is one line naming the file and the reason."""


@dataclass(frozen=True)
class Options:
    spacing: float = 1.0
    deformable: bool = False
    threads: int = 1  # SimpleITK threads per worker process


@dataclass
class Loaded:
    data: np.ndarray
    affine: np.ndarray
    frame_times: list[float] | None = None
    meta: dict = field(default_factory=dict)


def load_source(raw: Path, cell: str, column: str, phi: dict, warnings: list[str]) -> Loaded:
    """A sessions.csv cell -> voxels + RAS affine (DICOM folder, FOLDER#UID, or NIfTI file)."""
    from client.prepare.dicom import DicomError, is_dicom, load_dicom_dir, read_series

    rel, _, uid = cell.partition("#")
    path = (raw / rel).resolve()
    if path.is_dir():
        try:
            vol, warns, seen = load_dicom_dir(path, uid or None)
        except DicomError as exc:
            raise SessionError(f"{exc} ({column})") from None
        warnings.extend(warns)
        for k, v in seen.items():
            phi.setdefault(k, set()).update(v)
        return Loaded(vol.data, vol.affine, vol.frame_times, vol.meta)
    if not path.exists():
        raise SessionError(f"{path}: no such file or folder ({column})")
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any reader failure is this file's problem
            msg = str(exc).splitlines()[0][:100] if str(exc) else ""
            raise SessionError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {msg}) "
                               f"({column})") from None
        meta, times = {}, None
        side = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
        if column == "dce" and side.exists():
            meta = json.loads(side.read_text())
            times = meta.pop("FrameTimes", None)
        return Loaded(data, np.asarray(img.affine, float), times, meta)
    if is_dicom(path):
        try:
            vol = read_series([str(path)])
        except DicomError as exc:
            raise SessionError(f"{exc} ({column})") from None
        return Loaded(vol.data, vol.affine, vol.frame_times, vol.meta)
    raise SessionError(f"{path}: neither a DICOM folder, a DICOM file nor a NIfTI file ({column})")


def _check_ids(sess: Session, phi: dict) -> None:
    from client.prepare.deid import phi_in

    for col, value in (("case_id", sess.case_id), ("patient_id", sess.patient_id), *sess.fields.items()):
        hit = phi_in(value, phi)
        if hit:
            raise SessionError(f"sessions.csv:{sess.line}: {col} of case {sess.case_id!r} contains "
                               f"the DICOM {hit}: use a pseudonym (personal data never reaches the "
                               "site folder)")


def prepare_session(sess: Session, raw: Path, images_dir: Path, opts: Options) -> dict:
    """Prepare one session into ``images_dir/<case_id>/``; returns its manifest (files, QC, notes)."""
    import SimpleITK as sitk

    from client.prepare import qc, register
    from client.prepare.deid import save_nifti
    from client.prepare.skullstrip import refine_brain_mask

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, opts.threads))
    warnings: list[str] = []
    phi: dict[str, set[str]] = {}
    loaded = {col: load_source(raw, cell, col, phi, warnings) for col, cell in sess.sources.items()}
    _check_ids(sess, phi)
    for col, lv in loaded.items():
        want = 4 if col == "dce" else 3
        if lv.data.ndim != want:
            raise SessionError(f"{raw / sess.sources[col].partition('#')[0]}: expected a {want}D "
                               f"image for {col}, got shape {lv.data.shape}")
    ref_col = "t1ce" if "t1ce" in loaded else "t1" if "t1" in loaded else None
    if ref_col is None:
        raise SessionError(f"sessions.csv:{sess.line}: case {sess.case_id} has neither t1ce nor t1 "
                           "to register to")
    if ref_col == "t1":
        warnings.append(f"sessions.csv:{sess.line}: case {sess.case_id} has no t1ce: sequences "
                        "co-registered to t1")
    native = {c: register.to_sitk(lv.data, lv.affine) for c, lv in loaded.items() if c in SEQ3D}
    small = {c: register.coarse(img, 2.0) for c, img in native.items()}
    bias = {c: register.bias_field(img) for c, img in small.items()}
    small = {c: bias[c].correct(img) for c, img in small.items()}
    ref = small[ref_col]
    tpl = register.register_to_template(ref, deformable=opts.deformable)
    coreg = {c: register.rigid(ref, img) for c, img in small.items() if c != ref_col}
    tpl_img, tpl_brain = register.template(opts.spacing)
    out: dict[str, np.ndarray] = {}
    for c, img in native.items():
        t = tpl.transform if c == ref_col else register.chain(coreg[c].transform, tpl.transform)
        out[c] = register.from_sitk(bias[c].correct(register.resample(img, tpl_img, t), t))[0]
    prior = register.from_sitk(tpl_brain)[0] > 0
    brain = refine_brain_mask(prior, out, opts.spacing)
    grid_affine = register.from_sitk(tpl_img)[1]
    case_dir = images_dir / f".tmp-{sess.case_id}-{os.getpid()}"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    files: dict[str, str] = {}

    def put(col: str, data: np.ndarray, affine: np.ndarray = grid_affine) -> Path:
        name = f"{sess.case_id}_{col}.nii.gz"
        save_nifti(case_dir / name, data, affine)
        files[col] = name
        return case_dir / name

    for c in SEQ3D:
        if c in out:
            put(c, (out[c] * brain).astype(np.float32))
    put("brain_mask", brain.astype(np.uint8))
    if "seg" in loaded:
        seg_img = register.to_sitk(np.rint(loaded["seg"].data), loaded["seg"].affine)
        seg = register.from_sitk(register.resample(seg_img, tpl_img, tpl.transform, label=True))[0]
        put("seg", seg.astype(np.uint8))
    if "dce" in loaded:
        _write_dce(loaded["dce"], ref, tpl.transform, opts, put, warnings, sess)
    sitk.WriteTransform(tpl.transform, str(case_dir / f"{sess.case_id}_template_to_native.tfm"))
    lin = register.linear_part(tpl.transform)
    row: dict = {"case_id": sess.case_id, "reference": ref_col,
                 "template_corr": qc.template_corr(out["t1" if "t1" in out else ref_col],
                                                   register.from_sitk(tpl_img)[0], prior),
                 "template_mi": tpl.metric,
                 "brain_ml": float(brain.sum()) * opts.spacing ** 3 * abs(np.linalg.det(lin)) / 1000}
    for c, r in coreg.items():
        row[f"coreg_mi_{c}"] = r.metric
    for c in SEQ3D:
        if c in out:
            row.update(qc.intensity_stats(c, out[c], brain))
    png = qc.session_png(case_dir / f"{sess.case_id}_qc.png", sess.case_id,
                         {c: out[c] * brain for c in SEQ3D if c in out}, prior, brain)
    row["png"] = f"images/{sess.case_id}/{png.name}"
    manifest = {"case_id": sess.case_id, "files": files, "qc": row, "warnings": warnings,
                "spacing": opts.spacing, "deformable": opts.deformable}
    (case_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = images_dir / sess.case_id
    shutil.rmtree(final, ignore_errors=True)  # only an unfinished folder can be there (no manifest)
    os.replace(case_dir, final)
    return manifest


def _write_dce(lv: Loaded, ref, tpl_transform, opts: Options, put, warnings: list[str],
               sess: Session) -> None:
    """4D DCE: rigid to the reference by its temporal mean, every frame resampled (linear) onto the
    template field of view at max(spacing, the series' mean voxel size); sidecar with FrameTimes."""
    from client.prepare import register

    mean = register.coarse(register.to_sitk(lv.data.mean(axis=3), lv.affine), 2.0)
    to_ref = register.rigid(ref, mean).transform
    native_sp = float(np.mean(np.linalg.norm(lv.affine[:3, :3], axis=0)))
    sp = max(opts.spacing, round(native_sp, 1))
    grid, _ = register.template(sp)
    t = register.chain(to_ref, tpl_transform)
    frames = [register.from_sitk(register.resample(register.to_sitk(lv.data[..., k], lv.affine),
                                                   grid, t))[0] for k in range(lv.data.shape[3])]
    path = put("dce", np.stack(frames, axis=3).astype(np.float32), register.from_sitk(grid)[1])
    meta = {k: v for k, v in lv.meta.items() if k in ("RepetitionTime", "FlipAngle", "T10",
                                                        "Relaxivity", "TemporalResolution")}
    if lv.frame_times is not None:
        meta["FrameTimes"] = [float(x) for x in lv.frame_times]
    else:
        warnings.append(f"case {sess.case_id}: dce has no frame times in its headers: add "
                        "FrameTimes or TemporalResolution to the sidecar")
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta, indent=1))
