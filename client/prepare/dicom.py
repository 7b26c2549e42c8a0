"""DICOM to NIfTI: find series, stack slices (or frames) into 3D / 4D volumes with RAS affines.

Every image (or frame of a multi-frame file) becomes a :class:`SliceInfo` with its geometry read from
ImagePositionPatient / ImageOrientationPatient / PixelSpacing (or the enhanced functional groups).
:func:`stack` checks that the slices form one volume (one orientation and size, slices along the normal,
no gap, equal counts per position for a 4D series) and raises :class:`NotAVolume` with a one-line
reason when they do not. DICOM world coordinates are LPS; the affines returned here are RAS (NIfTI).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOL_MM = 0.01


class DicomError(Exception):
    """A file or series that cannot be converted; ``str()`` is ``file: reason`` (one line)."""

    def __init__(self, file: str | Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = str(file), reason


class NotAVolume(DicomError):
    """Readable DICOM that is not one stackable 3D/4D volume (one slice, mixed planes, projections)."""


@dataclass
class SliceInfo:
    """One 2D image: a single-frame file or one frame of a multi-frame file."""

    path: str
    frame: int | None  # frame index in a multi-frame file
    rows: int
    cols: int
    position: np.ndarray  # ImagePositionPatient (LPS mm) of the first voxel
    row_dir: np.ndarray  # direction of increasing column index (IOP[:3])
    col_dir: np.ndarray  # direction of increasing row index (IOP[3:])
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    thickness: float
    time_key: tuple[float, ...] = ()  # temporal order within a position
    time_s: float | None = None


@dataclass
class Volume:
    """A stacked series: voxel data (x, y, z[, t]) float32, RAS affine, per-frame times (s) if 4D."""

    data: np.ndarray
    affine: np.ndarray
    files: list[str]
    frame_times: list[float] | None = None
    meta: dict[str, float] = field(default_factory=dict)  # RepetitionTime (s), FlipAngle (deg), ...


def is_dicom(path: str | Path) -> bool:
    """True for a Part-10 file (``DICM`` at byte 128) or a bare dataset pydicom can parse."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return True
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return "SOPClassUID" in ds or "ImagePositionPatient" in ds
    except Exception:  # noqa: BLE001 - anything unparsable is "not DICOM"
        return False


def _floats(v, n: int, what: str, path: str) -> np.ndarray:
    try:
        arr = np.asarray([float(x) for x in v], dtype=float)
    except Exception:  # noqa: BLE001
        arr = np.zeros(0)
    if arr.size != n:
        raise NotAVolume(path, f"no usable {what} (not an image with patient geometry)")
    return arr


def _seconds(t) -> float | None:
    """DICOM TM (HHMMSS.frac) or DT (YYYYMMDDHHMMSS.frac) -> seconds since midnight."""
    if t is None or str(t).strip() == "":
        return None
    s = str(t).strip().split("+")[0].split("-")[0]
    if len(s) >= 14 and s[:8].isdigit():
        s = s[8:]
    try:
        return int(s[0:2]) * 3600 + int(s[2:4] or 0) * 60 + float(s[4:] or 0)
    except ValueError:
        return None


def _geometry(path: str, frame: int | None, rows: int, cols: int, pos, iop, ps, thick,
              tkey: tuple[float, ...], tsec: float | None) -> SliceInfo:
    iop_a = _floats(iop, 6, "ImageOrientationPatient", path)
    return SliceInfo(path=path, frame=frame, rows=rows, cols=cols,
                     position=_floats(pos, 3, "ImagePositionPatient", path),
                     row_dir=iop_a[:3], col_dir=iop_a[3:],
                     spacing=tuple(_floats(ps, 2, "PixelSpacing", path)),  # type: ignore[arg-type]
                     thickness=float(thick or 0.0), time_key=tkey, time_s=tsec)


def slices_of(ds, path: str) -> list[SliceInfo]:
    """The 2D images of one dataset (a frame each for enhanced multi-frame files)."""
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
        out = []
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def grab(seq: str, attr: str, fg=fg):
                for src in (fg, shared):
                    if src is not None and seq in src and attr in src[seq][0]:
                        return src[seq][0][attr].value
                return None
            tpi = grab("FrameContentSequence", "TemporalPositionIndex")
            tsec = _seconds(grab("FrameContentSequence", "FrameAcquisitionDateTime"))
            out.append(_geometry(path, i, rows, cols,
                                 grab("PlanePositionSequence", "ImagePositionPatient"),
                                 grab("PlaneOrientationSequence", "ImageOrientationPatient"),
                                 grab("PixelMeasuresSequence", "PixelSpacing"),
                                 grab("PixelMeasuresSequence", "SliceThickness"),
                                 (float(tpi or 0), tsec or 0.0, float(i)), tsec))
        return out
    if nframes > 1:
        raise NotAVolume(path, f"multi-frame image ({nframes} frames) without per-frame geometry")
    tpi = ds.get("TemporalPositionIdentifier")
    tsec = _seconds(ds.get("AcquisitionTime") or ds.get("ContentTime"))
    key = (float(tpi or 0), tsec or 0.0, float(ds.get("TriggerTime") or 0),
           float(ds.get("InstanceNumber") or 0))
    return [_geometry(path, None, rows, cols, ds.get("ImagePositionPatient"),
                      ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"),
                      ds.get("SliceThickness"), key, tsec)]


def _pixels(ds, path: str) -> np.ndarray:
    """Pixel data with the modality rescale applied, (frames, rows, cols) float32."""
    from pydicom.pixels import apply_rescale

    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, missing codec, ...
        raise DicomError(path, f"pixel data unreadable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    try:
        arr = apply_rescale(arr, ds)
    except Exception:  # noqa: BLE001, S110 - no usable rescale: stored values are the values
        pass
    arr = np.asarray(arr, dtype=np.float32)
    return arr[None] if arr.ndim == 2 else arr


def stack(slices: list[SliceInfo], allow_single: bool = False
          ) -> tuple[np.ndarray, list[list[SliceInfo]], np.ndarray]:
    """Check and order ``slices`` into positions x time; returns (LPS affine, grid, normal)."""
    first = slices[0]
    where = str(Path(first.path).parent) if len({s.path for s in slices}) > 1 else first.path
    if len({(s.rows, s.cols) for s in slices}) > 1:
        raise NotAVolume(where, "images of different sizes in one series")
    if len({s.spacing for s in slices}) > 1 and not all(
            np.allclose(s.spacing, first.spacing, atol=1e-3) for s in slices):
        raise NotAVolume(where, "different pixel spacings in one series")
    for s in slices:
        if not (np.allclose(s.row_dir, first.row_dir, atol=1e-3)
                and np.allclose(s.col_dir, first.col_dir, atol=1e-3)):
            raise NotAVolume(where, "mixed orientations (a multi-plane localizer or projections), "
                                    "not one 3D volume")
    normal = np.cross(first.row_dir, first.col_dir)
    d = np.array([s.position @ normal for s in slices])
    order = np.argsort(d, kind="stable")
    groups: list[list[SliceInfo]] = []
    last = None
    for i in order:
        if last is None or d[i] - last > _TOL_MM:
            groups.append([])
        groups[-1].append(slices[i])
        last = d[i]
    counts = {len(g) for g in groups}
    if len(counts) > 1:
        worst = min(groups, key=len)[0].path
        raise NotAVolume(where, f"positions hold different numbers of images ({min(counts)}-"
                                f"{max(counts)}): incomplete 4D series or duplicates (e.g. {worst})")
    if len(groups) == 1 and not allow_single:
        raise NotAVolume(where, f"one slice position ({len(slices)} image(s)): not a 3D volume")
    inplane = np.array([[g[0].position @ first.row_dir, g[0].position @ first.col_dir] for g in groups])
    if np.abs(inplane - inplane[0]).max() > 0.05 * min(first.spacing) + _TOL_MM:
        raise NotAVolume(where, "slice positions do not line up along the slice normal "
                                "(gantry tilt or sheared stack)")
    for g in groups:
        g.sort(key=lambda s: s.time_key)
    centres = np.array([g[0].position @ normal for g in groups])
    if len(groups) > 1:
        steps = np.diff(centres)
        step = float(np.median(steps))
        gap = int(np.argmax(steps))
        if steps[gap] > 1.5 * step:
            raise NotAVolume(where, f"missing slice(s): gap of {steps[gap]:.2f} mm (slices are "
                                    f"{step:.2f} mm apart) after {groups[gap][0].path}")
        if np.abs(steps - step).max() > 0.05 * step + _TOL_MM:
            raise NotAVolume(where, f"uneven slice spacing ({steps.min():.2f}-{steps.max():.2f} mm)")
    else:
        step = first.thickness or 1.0
    aff = np.eye(4)
    aff[:3, 0] = first.row_dir * first.spacing[1]
    aff[:3, 1] = first.col_dir * first.spacing[0]
    aff[:3, 2] = normal * step
    aff[:3, 3] = groups[0][0].position
    return aff, groups, normal


def read_series(files: list[str], allow_single: bool = False, read: dict | None = None) -> Volume:
    """Stack one series (all files share a SeriesInstanceUID) into a 3D or 4D volume (RAS affine).
    ``read``: datasets already read in full, by file (not read again)."""
    import pydicom

    slices: list[SliceInfo] = []
    datasets = {}
    for f in files:
        try:
            ds = read[f] if read and f in read else pydicom.dcmread(f)
        except Exception as exc:  # noqa: BLE001
            raise DicomError(f, f"not readable as DICOM ({type(exc).__name__})") from None
        if "PixelData" not in ds:
            raise NotAVolume(f, "no pixel data (not an image)")
        datasets[f] = ds
        slices.extend(slices_of(ds, f))
    aff_lps, groups, _ = stack(slices, allow_single=allow_single)
    nt = len(groups[0])
    vol = np.zeros((slices[0].cols, slices[0].rows, len(groups), nt), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for k, g in enumerate(groups):
        for t, s in enumerate(g):
            if s.path not in cache:
                cache[s.path] = _pixels(datasets[s.path], s.path)
            px = cache[s.path][s.frame or 0]
            if px.shape != (s.rows, s.cols):
                raise NotAVolume(s.path, f"pixel array {px.shape} does not match Rows x Columns")
            vol[:, :, k, t] = px.T
    times = None
    if nt > 1:
        tt = [min((s.time_s for s in (g[t] for g in groups) if s.time_s is not None), default=None)
              for t in range(nt)]
        if all(x is not None for x in tt) and np.all(np.diff(tt) > 0):
            times = [float(x - tt[0]) for x in tt]  # type: ignore[operator]
    ds0 = datasets[files[0]]
    meta = {}
    if ds0.get("RepetitionTime") not in (None, ""):
        meta["RepetitionTime"] = float(ds0.RepetitionTime) / 1000.0
    if ds0.get("FlipAngle") not in (None, ""):
        meta["FlipAngle"] = float(ds0.FlipAngle)
    data = vol[..., 0] if nt == 1 else vol
    return Volume(data=data, affine=LPS_TO_RAS @ aff_lps, files=list(files), frame_times=times,
                  meta=meta)


@dataclass
class SeriesHeader:
    """What the scan of RAW_DIR knows about one series (headers only, no pixels)."""

    uid: str
    study_uid: str
    files: list[str]
    description: str
    protocol: str
    n_positions: int
    n_temporal: int
    patient_id: str
    study_date: str
    series_number: int


def scan_tree(root: Path, progress: bool = False
              ) -> tuple[dict[str, SeriesHeader], list[str], dict[str, set[str]]]:
    """Headers of every DICOM file under ``root``: series by uid, non-DICOM files, PHI values seen."""
    import pydicom

    from client.prepare.deid import phi_values

    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_uid: dict[str, list] = defaultdict(list)
    skipped: list[str] = []
    phi: dict[str, set[str]] = defaultdict(set)
    for p in _progress(files, "reading DICOM headers", progress):
        if p.suffix in (".csv", ".toml", ".json") or p.name.endswith((".nii", ".nii.gz")):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=not p.suffix)
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - not DICOM (or no series): listed, never fatal
            skipped.append(str(p))
            continue
        if ds.get("Modality", "MR") not in ("MR", ""):
            continue
        by_uid[uid].append((str(p), ds))
        for k, v in phi_values(ds).items():
            phi[k].add(v)
    series = {}
    for uid, items in by_uid.items():
        ds0 = items[0][1]
        try:
            sl = [s for f, ds in items for s in slices_of(ds, f)]
            n_pos = len({round(float(s.position @ np.cross(s.row_dir, s.col_dir)), 2) for s in sl})
            n_t = max(1, len(sl) // max(n_pos, 1))
        except DicomError:
            n_pos, n_t = 0, 0
        series[uid] = SeriesHeader(
            uid=uid, study_uid=str(ds0.get("StudyInstanceUID", "")), files=[f for f, _ in items],
            description=str(ds0.get("SeriesDescription", "")), protocol=str(ds0.get("ProtocolName", "")),
            n_positions=n_pos, n_temporal=n_t, patient_id=str(ds0.get("PatientID", "")),
            study_date=str(ds0.get("StudyDate", "")), series_number=int(ds0.get("SeriesNumber") or 0))
    return series, skipped, phi


def _progress(items, label: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=label, console=Console(stderr=True), transient=True)


def load_dicom_dir(folder: Path, uid: str | None = None
                   ) -> tuple[Volume, list[str], dict[str, set[str]]]:
    """Convert the series in ``folder`` (or the one with SeriesInstanceUID ``uid``).

    Returns the volume, one-line warnings (non-DICOM files ignored) and the patient fields seen (for the
    de-identification check). A folder holding several series without ``uid`` is an error.
    """
    import pydicom

    from client.prepare.deid import phi_values

    if not folder.is_dir():
        raise DicomError(folder, "no such DICOM folder")
    by_uid: dict[str, list[str]] = defaultdict(list)
    warnings: list[str] = []
    phi: dict[str, set[str]] = defaultdict(set)
    read: dict[str, object] = {}
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        try:  # whole file once: the pixels are decoded later, only for the series converted
            ds = pydicom.dcmread(p, force=not p.suffix)
            this = str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001
            warnings.append(f"{p}: not a DICOM file, ignored")
            continue
        by_uid[this].append(str(p))
        if uid is None or this == uid:
            read[str(p)] = ds
        for k, v in phi_values(ds).items():
            phi[k].add(v)
    if uid is not None:
        if uid not in by_uid:
            raise DicomError(folder, f"no series with SeriesInstanceUID {uid}")
        files = by_uid[uid]
    elif not by_uid:
        raise DicomError(folder, "no DICOM files")
    elif len(by_uid) > 1:
        sizes = ", ".join(str(len(v)) for v in by_uid.values())
        raise DicomError(folder, f"mixed series in one folder ({len(by_uid)} SeriesInstanceUIDs, "
                                 f"{sizes} files): name one as FOLDER#SeriesInstanceUID")
    else:
        files = next(iter(by_uid.values()))
    return read_series(files, read=read), warnings, phi
