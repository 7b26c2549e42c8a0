"""Site scanner profiles: what makes each hospital's images look different.

Owns :class:`SiteProfile` (per-sequence intensity scale and gamma, bias-field strength, noise level,
slice thickness, field-of-view offset, output range) drawn deterministically per (seed, site), and
:func:`acquire`, which turns a noise-free session into the integer volumes a scanner would store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SiteProfile:
    """One site's scanner; every field is drawn in :func:`site_profile`."""

    name: str
    scale: np.ndarray  # (4,) per-sequence gain
    gamma: np.ndarray  # (4,) per-sequence contrast curve exponent
    bias: float  # bias-field log-amplitude
    noise: float  # noise s.d. relative to white-matter T1 signal
    slice_mm: float  # slice thickness along the axial (last) axis
    fov_offset: np.ndarray  # (3,) mm shift of the field of view
    full_scale: float  # stored value of signal 1.0


def site_profile(seed: int, index: int) -> SiteProfile:
    """The scanner of site ``index`` (0-based) of a cohort drawn with ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, index]))
    return SiteProfile(
        name=f"site-{index + 1}",
        scale=np.exp(rng.uniform(-0.3, 0.3, 4)),
        gamma=np.exp(rng.uniform(-0.2, 0.2, 4)),
        bias=float(rng.uniform(0.05, 0.3)),
        noise=float(rng.uniform(0.01, 0.045)),
        slice_mm=float(rng.choice([1.0, 2.0, 3.0, 4.0, 5.0])),
        fov_offset=rng.normal(0.0, 4.0, 3),
        full_scale=float(rng.choice([1000.0, 2000.0, 3000.0])),
    )


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], amp: float) -> np.ndarray:
    """exp(quadratic polynomial) over the crop, log-amplitude about ``amp``."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    c = rng.normal(0, 1, (3, 2)).astype(np.float32)
    field = np.zeros(shape, dtype=np.float32)
    for i, a in enumerate(axes):
        term = c[i, 0] * a + c[i, 1] * (a * a - np.float32(1 / 3))
        field += term.reshape([-1 if j == i else 1 for j in range(3)])
    return np.exp(np.float32(amp / 2.0) * field)


def acquire(rng: np.random.Generator, site: SiteProfile, images: np.ndarray, support: np.ndarray,
            voxel_mm: float) -> np.ndarray:
    """Bias field, slice-thickness blur, Rician-like noise and the site's intensity curve -> int16."""
    from scipy import ndimage as ndi

    bias = _bias_field(rng, images.shape[1:], site.bias)
    sigma = np.sqrt(max(site.slice_mm**2 - voxel_mm**2, 0.0)) / 2.355 / voxel_mm
    out = np.empty(images.shape, dtype=np.int16)
    for s in range(images.shape[0]):
        x = images[s] * bias
        if sigma > 0.2:
            x = ndi.gaussian_filter1d(x, sigma, axis=2, mode="nearest", truncate=2.5)
        x = np.abs(x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(site.noise * 0.8))
        x = np.power(x, np.float32(site.gamma[s])) * np.float32(site.scale[s] * site.full_scale)
        out[s] = np.clip(np.rint(x * support), 0, 32767).astype(np.int16)
    return out
