"""Reading and writing 4D DCE-MRI NIfTI series with their JSON sidecar (timing and sequence).

The sidecar sits next to the image with the same stem (``case_dce.nii.gz`` -> ``case_dce.json``).
Keys (BIDS names where BIDS has one; times in seconds, angles in degrees):

- ``FrameTimes``: list of frame times (s), one per volume; or ``TemporalResolution`` (s) with
  optional ``StartTime`` (s, default 0) giving a uniform axis. One of the two is required.
- ``Quantity``: ``"concentration"`` (mM, the default) or ``"signal"`` (SPGR signal).
- For signal data: ``RepetitionTime`` (s), ``FlipAngle`` (deg), ``T10`` (s, default 1.4),
  ``Relaxivity`` (1/(mM s), default 4.5), ``NumBaselineFrames`` (default 1).
- Optional: ``Hematocrit`` (default 0.42), ``BolusArrivalTime`` (s, start of the AIF).
Anything else is kept in ``DceSeries.meta``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class DceSeries:
    """One 4D DCE series: data [X, Y, Z, T] as stored, its frame times and sequence parameters."""

    data: np.ndarray
    affine: np.ndarray
    times_s: np.ndarray
    quantity: str = "concentration"
    tr_s: float | None = None
    flip_deg: float | None = None
    t10_s: float = 1.4
    r1: float = 4.5
    n_baseline: int = 1
    hct: float = 0.42
    bolus_arrival_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def concentration(self) -> np.ndarray:
        """Concentration (mM) [X, Y, Z, T]: as stored, or converted from SPGR signal."""
        if self.quantity == "concentration":
            return self.data.astype(np.float64)
        from shared.dce.signal import signal_to_conc

        conc = signal_to_conc(
            self.data.astype(np.float64),
            self.t10_s,
            self.r1,
            float(self.tr_s),
            float(self.flip_deg),
            n_baseline=self.n_baseline,
        )
        return np.nan_to_num(conc, nan=0.0, posinf=0.0, neginf=0.0)


def sidecar_path(image_path: str | Path) -> Path:
    """``x.nii.gz`` / ``x.nii`` -> ``x.json``."""
    path = Path(image_path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def _frame_times(meta: dict[str, Any], n_frames: int, where: Path) -> np.ndarray:
    if "FrameTimes" in meta:
        times = np.asarray(meta["FrameTimes"], dtype=float)
        if times.shape != (n_frames,):
            raise ValueError(
                f"{where}: FrameTimes has {times.size} entries but the image has {n_frames} frames"
            )
    elif "TemporalResolution" in meta:
        step = float(meta["TemporalResolution"])
        if step <= 0:
            raise ValueError(f"{where}: TemporalResolution must be > 0 s, got {step}")
        times = float(meta.get("StartTime", 0.0)) + step * np.arange(n_frames)
    else:
        raise ValueError(f"{where}: needs FrameTimes or TemporalResolution (seconds)")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"{where}: frame times must increase strictly")
    return times


def read_dce(image_path: str | Path) -> DceSeries:
    """Read a 4D DCE NIfTI and its JSON sidecar; one-line errors name the file and the reason."""
    import nibabel as nib

    path = Path(image_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DCE image not found")
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"{side}: JSON sidecar for {path.name} not found (frame timing is required)"
        )
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{side}: not valid JSON ({err.msg} at line {err.lineno})") from None
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim != 4 or data.shape[3] < 3:
        raise ValueError(f"{path}: expected a 4D series with >= 3 frames, got shape {data.shape}")
    quantity = str(meta.get("Quantity", "concentration")).lower()
    if quantity not in ("concentration", "signal"):
        raise ValueError(f"{side}: Quantity must be 'concentration' or 'signal', got {quantity!r}")
    if quantity == "signal" and ("RepetitionTime" not in meta or "FlipAngle" not in meta):
        raise ValueError(f"{side}: signal data need RepetitionTime (s) and FlipAngle (deg)")
    known = {
        "FrameTimes",
        "TemporalResolution",
        "StartTime",
        "Quantity",
        "RepetitionTime",
        "FlipAngle",
        "T10",
        "Relaxivity",
        "NumBaselineFrames",
        "Hematocrit",
        "BolusArrivalTime",
    }
    return DceSeries(
        data=data,
        affine=image.affine,
        times_s=_frame_times(meta, data.shape[3], side),
        quantity=quantity,
        tr_s=float(meta["RepetitionTime"]) if "RepetitionTime" in meta else None,
        flip_deg=float(meta["FlipAngle"]) if "FlipAngle" in meta else None,
        t10_s=float(meta.get("T10", 1.4)),
        r1=float(meta.get("Relaxivity", 4.5)),
        n_baseline=int(meta.get("NumBaselineFrames", 1)),
        hct=float(meta.get("Hematocrit", 0.42)),
        bolus_arrival_s=float(meta["BolusArrivalTime"]) if "BolusArrivalTime" in meta else None,
        meta={k: v for k, v in meta.items() if k not in known},
    )


def write_dce(
    image_path: str | Path,
    data: np.ndarray,
    times_s: np.ndarray,
    affine: np.ndarray | None = None,
    **sidecar: Any,
) -> Path:
    """Write a 4D float32 NIfTI plus its sidecar (``FrameTimes`` from ``times_s`` and ``sidecar``)."""
    import nibabel as nib

    path = Path(image_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data.ndim != 4 or data.shape[3] != len(times_s):
        raise ValueError(f"{path}: data {data.shape} do not match {len(times_s)} frame times")
    nib.save(
        nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path)
    )
    meta = {"FrameTimes": [float(x) for x in times_s], **sidecar}
    sidecar_path(path).write_text(json.dumps(meta, indent=2))
    return path
