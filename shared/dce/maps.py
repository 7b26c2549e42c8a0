"""Whole-volume parameter mapping: 4D DCE series + population AIF -> 2CXM / extended Tofts maps.

This is what ``gliofed qtm fit`` runs. Voxels to fit are the mask's, or (without a mask) the
voxels that enhance at all; the Parker population AIF starts at the bolus arrival time (sidecar
``BolusArrivalTime``, a user value, or an estimate from the data), and the per-voxel delay fit
absorbs the rest within +-10 s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.dce.io import DceSeries

MAP_UNITS = {
    "fp": "ml/100ml/min",
    "ps": "1/min",
    "ktrans": "1/min",
    "ve": "fraction",
    "vp": "fraction",
    "delay": "s",
    "umag": "mm/s",
    "rss": "mM^2",
    "success": "0/1",
}


def estimate_bolus_arrival(conc: np.ndarray, times_s: np.ndarray, mask: np.ndarray) -> float:
    """Bolus arrival (s): last frame before the mean curve of the top-5% enhancing voxels
    first exceeds 10% of its peak."""
    curves = conc[mask]
    if curves.shape[0] == 0:
        return float(times_s[0])
    peak = curves.max(axis=1)
    top = curves[peak >= np.quantile(peak, 0.95)].mean(axis=0)
    above = np.nonzero(top >= 0.1 * top.max())[0]
    first = int(above[0]) if above.size else 0
    return float(times_s[max(first - 1, 0)])


def enhancing_mask(conc: np.ndarray, min_peak_mM: float) -> np.ndarray:
    """Voxels whose peak concentration reaches ``min_peak_mM`` (and are finite throughout)."""
    return np.isfinite(conc).all(axis=-1) & (np.nan_to_num(conc).max(axis=-1) >= min_peak_mM)


def fit_series(
    series: DceSeries,
    model: str = "2cxm",
    mask: np.ndarray | None = None,
    bolus_arrival_s: float | None = None,
    fit_delay: bool = True,
    min_peak_mM: float = 0.02,
    device: str = "auto",
    chunk_size: int = 20000,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float | int | str]]:
    """Fit every selected voxel; returns (3D maps by name, summary of what was done)."""
    from shared.dce.aif import parker_aif
    from shared.dce.fit import fit_2cxm, fit_extended_tofts

    if model not in ("2cxm", "etofts"):
        raise ValueError(f"unknown model {model!r}: use 2cxm or etofts")
    conc = series.concentration()
    spatial = conc.shape[:3]
    if mask is None:
        mask = enhancing_mask(conc, min_peak_mM)
    elif mask.shape != spatial:
        raise ValueError(f"mask shape {mask.shape} does not match the DCE volume {spatial}")
    mask = mask.astype(bool) & np.isfinite(conc).all(axis=-1)
    if not mask.any():
        raise ValueError(
            f"no voxels to fit: none in the mask enhance to a finite curve (min peak {min_peak_mM} mM)"
        )
    arrival = bolus_arrival_s
    if arrival is None:
        arrival = series.bolus_arrival_s
    if arrival is None:
        arrival = estimate_bolus_arrival(conc, series.times_s, mask)
    ca = parker_aif(series.times_s, arrival, hct=series.hct)
    curves = conc[mask]
    fit = fit_2cxm if model == "2cxm" else fit_extended_tofts
    result = fit(
        curves,
        series.times_s,
        ca,
        fit_delay=fit_delay,
        device=device,
        chunk_size=chunk_size,
        progress=progress,
    )
    maps: dict[str, np.ndarray] = {}
    for name, values in result.items():
        volume = np.zeros(spatial, dtype=np.float32)
        volume[mask] = values.numpy().astype(np.float32)
        maps[name] = volume
    summary: dict[str, float | int | str] = {
        "model": model,
        "voxels_fitted": int(mask.sum()),
        "voxels_converged": int(result["success"].sum()) if mask.any() else 0,
        "bolus_arrival_s": float(arrival),
        "hematocrit": series.hct,
        "frames": len(series.times_s),
    }
    return maps, summary


def write_maps(
    maps: dict[str, np.ndarray], affine: np.ndarray, out_dir: Path, prefix: str
) -> list[Path]:
    """One NIfTI per map: ``<prefix>_<name>.nii.gz``."""
    import nibabel as nib

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, volume in maps.items():
        path = out_dir / f"{prefix}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), str(path))
        written.append(path)
    return written


def plot_maps(maps: dict[str, np.ndarray], mask: np.ndarray, path: Path, title: str,
              z: int | None = None) -> Path:
    """Quick-look PNG: the maps on axial slice ``z`` (default: the one with the most masked voxels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("fp", "ps", "ktrans", "ve", "vp", "umag", "delay") if n in maps]
    if z is None:
        z = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else mask.shape[2] // 2
    fig, axes = plt.subplots(1, len(names), figsize=(3.1 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        sl = np.where(mask[:, :, z], maps[name][:, :, z], np.nan).T
        finite = sl[np.isfinite(sl)]
        vmax = float(np.quantile(finite, 0.99)) if finite.size else 1.0
        vmin = float(np.quantile(finite, 0.01)) if name == "delay" and finite.size else 0.0
        im = ax.imshow(sl, origin="lower", cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-9))
        ax.set_title(f"{name} ({MAP_UNITS[name]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{title} - slice z={z}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
