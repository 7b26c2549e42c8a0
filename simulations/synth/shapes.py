"""Lesion geometry: irregular ellipsoids ("blobs") in template millimetres, and how to draw them.

Owns the :class:`Blob` primitive (centre, radii, rotation, lobulation waves), its normalised radius field
``f`` (1 on the lesion surface), the bounding box of a blob on an output grid, and the volume-conserving
radial push that gives space-occupying lesions their mass effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclass(frozen=True)
class Blob:
    """An irregular ellipsoid: ``f(p) = |R^T (p - c) / radii| * (1 + amp * waves(direction))``."""

    centre: np.ndarray  # (3,) mm
    radii: np.ndarray  # (3,) mm
    rot: np.ndarray  # (3, 3)
    k: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (n, 3) wave vectors, rad/mm
    phase: np.ndarray = field(default_factory=lambda: np.zeros(0))
    amp: float = 0.0  # lobulation amplitude (0 = smooth)

    @property
    def mean_radius(self) -> float:
        return float(np.cbrt(np.prod(self.radii)))

    @property
    def max_radius(self) -> float:
        low = 1.0 - abs(self.amp) * np.sqrt(len(self.k))  # smallest factor the waves can reach
        return float(self.radii.max() / max(low, 0.25))

    def scaled(self, s: float) -> Blob:
        return replace(self, radii=self.radii * s, k=self.k / max(s, 1e-3))

    def field(self, p: np.ndarray) -> np.ndarray:
        """Normalised radius at mm coordinates ``p`` (3, ...): < 1 inside, 1 on the surface."""
        d = [p[i] - np.float32(self.centre[i]) for i in range(3)]
        r2 = 0.0
        for j in range(3):
            u = d[0] * np.float32(self.rot[0, j]) + d[1] * np.float32(self.rot[1, j])
            u = u + d[2] * np.float32(self.rot[2, j])
            r2 = r2 + (u / np.float32(self.radii[j])) ** 2
        f = np.sqrt(r2)
        if self.amp and len(self.k):
            # star-shaped lobulation: the surface radius depends on direction only, so a lesion is
            # always one connected piece (waves are read on the sphere of the mean radius)
            norm = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) + np.float32(1e-3)
            on_sphere = np.float32(self.mean_radius) / norm
            wave = 0.0
            for kk, ph in zip(self.k, self.phase, strict=True):
                arg = (d[0] * np.float32(kk[0]) + d[1] * np.float32(kk[1]) + d[2] * np.float32(kk[2]))
                wave = wave + np.sin(arg * on_sphere + np.float32(ph))
            f = f * (1.0 + np.float32(self.amp / np.sqrt(len(self.k))) * wave)
        return f.astype(np.float32)


def make_blob(
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: float,
    elong: float = 0.2,
    amp: float = 0.0,
    wavelength: float | None = None,
    waves: int = 4,
) -> Blob:
    """A blob of mean radius ``radius`` mm, axes varied by +-``elong``, lobulated by ``amp``."""
    radii = radius * np.exp(rng.uniform(-elong, elong, 3))
    radii *= radius / np.cbrt(np.prod(radii))
    wl = wavelength if wavelength is not None else radius * rng.uniform(0.9, 1.8)
    dirs = rng.standard_normal((waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2 * np.pi / max(wl, 1.0)) * rng.uniform(0.7, 1.3, (waves, 1))
    return Blob(
        centre=np.asarray(centre, dtype=np.float64),
        radii=radii,
        rot=random_rotation(rng),
        k=k,
        phase=rng.uniform(0, 2 * np.pi, waves),
        amp=float(amp),
    )


def smooth_noise(rng: np.random.Generator, wavelength: float, waves: int = 5):
    """A band-limited noise function of mm coordinates, values roughly in [-1, 1]."""
    dirs = rng.standard_normal((waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    # wavelengths spread over 0.6-1.7x so the sum never looks like a regular lattice
    k = (dirs * 2 * np.pi / (wavelength * rng.uniform(0.6, 1.7, (waves, 1)))).astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, waves).astype(np.float32)

    def noise(p: np.ndarray) -> np.ndarray:
        out = 0.0
        for kk, pp in zip(k, ph, strict=True):
            out = out + np.sin(p[0] * kk[0] + p[1] * kk[1] + p[2] * kk[2] + pp)
        return (out / np.float32(np.sqrt(waves / 2.0))).astype(np.float32)

    return noise


def box_slices(
    mm_to_idx: np.ndarray, centre: np.ndarray, half: float, shape: tuple[int, ...]
) -> tuple[slice, slice, slice] | None:
    """Index slices of ``shape`` covering the mm cube ``centre +- half`` (None when it misses)."""
    corners = np.array(
        [[centre[0] + sx * half, centre[1] + sy * half, centre[2] + sz * half, 1.0]
         for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    )
    idx = (mm_to_idx @ corners.T)[:3]
    lo = np.maximum(np.floor(idx.min(1)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(1)).astype(int) + 2, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def push(p: np.ndarray, centre: np.ndarray, volume: float) -> np.ndarray:
    """Mass effect: where to sample anatomy so tissue looks pushed out by a ball of ``volume``.

    A point at distance r from ``centre`` shows the tissue that was at r' = cbrt(r^3 - volume), the
    radial, volume-conserving displacement of an expanding sphere (decays as 1/r^2 far away).
    """
    if volume <= 0:
        return p
    d = p - centre.reshape(3, *([1] * (p.ndim - 1))).astype(np.float32)
    r = np.sqrt((d * d).sum(0)) + np.float32(1e-3)
    r_new = np.cbrt(np.maximum(r**3 - np.float32(volume), 0.0))
    return (p - d * (1.0 - r_new / r)).astype(np.float32)
