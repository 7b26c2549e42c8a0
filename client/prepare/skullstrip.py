"""Skull stripping: the template's brain mask carried through the registration, refined from the images.

After registration every sequence lies on the template grid, so the MNI152 brain mask is the prior.
Registration is affine (a patient's brain differs from the template locally), so voxels in a band
around the mask's edge are decided from the images themselves: bright fat/skull marrow on T1 and dark
bone/air on every sequence leave the mask; the result is the largest connected component with its holes
filled (tumour and ventricles stay in).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def refine_brain_mask(prior: np.ndarray, images: dict[str, np.ndarray], spacing: float,
                      band_mm: float = 4.0) -> np.ndarray:
    """Brain mask (bool) from the template ``prior`` (bool) and the co-registered ``images``.

    Inside the prior eroded by ``band_mm`` is brain; outside the prior dilated by ``band_mm`` is not;
    in the band a voxel is kept when it looks like brain: not brighter than the brain's 99.5th
    percentile on T1/T1ce (fat, contrast-filled skull marrow) and not darker than 10 % of the brain's
    median on every sequence (bone, air).
    """
    it = max(1, round(band_mm / spacing))
    idx = np.argwhere(prior)
    if idx.size == 0:
        return prior.copy()
    lo = np.maximum(idx.min(0) - it - 2, 0)
    hi = np.minimum(idx.max(0) + it + 3, prior.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    full = np.zeros(prior.shape, dtype=bool)  # everything outside the prior's box (+ band) is not brain
    full[box] = _refine(prior[box], {k: v[box] for k, v in images.items()}, it)
    return full


def _refine(prior: np.ndarray, images: dict[str, np.ndarray], it: int) -> np.ndarray:
    core = ndi.binary_erosion(prior, iterations=it)
    outer = ndi.binary_dilation(prior, iterations=it)
    band = outer & ~core
    if not core.any():
        return prior.copy()
    keep = np.ones(prior.shape, dtype=bool)
    dark = np.ones(prior.shape, dtype=bool)
    for name, img in images.items():
        ref = img[core]
        med = float(np.median(ref))
        if med <= 0:
            continue
        dark &= img < 0.1 * med
        if name in ("t1", "t1ce"):
            keep &= img <= float(np.percentile(ref, 99.5)) * 1.05
    keep &= ~dark
    mask = core | (band & keep)
    mask = ndi.binary_opening(mask, iterations=1) | core
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (int(np.argmax(sizes)) + 1)
    return ndi.binary_fill_holes(mask)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 for two empty masks)."""
    a, b = a.astype(bool), b.astype(bool)
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
