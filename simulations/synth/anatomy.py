"""Normal anatomy for the synthetic cohorts: the MNI152 2009 template as tissue channels.

Owns loading the ICBM152 2009 template and its grey/white-matter and brain masks from nilearn (shipped
inside the package, no download), deriving CSF and the normally enhancing structures (dura, venous
sinuses, choroid plexus, pituitary gland), the candidate locations each tumour class is drawn from, and
the output grids a cohort is written on. Everything here is in template millimetres (MNI world space).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Channel order of :attr:`TemplateAnatomy.channels` (sampled per case with one trilinear pass).
CHANNELS: tuple[str, ...] = ("csf", "gm", "wm", "dura", "sinus", "choroid", "gland")
# The head (what a skull-stripped image keeps) is where csf + gm + wm + dura + gland > 0.5.

# Landmarks in MNI millimetres, checked by eye on the 2 mm template (see gallery.py).
SELLA_MM = np.array([0.0, -2.0, -31.0])  # pituitary gland centre
CPA_MM = np.array([26.0, -30.0, -35.0])  # right cerebellopontine angle (mirror x for the left)
IAC_FUNDUS_MM = np.array([40.0, -22.0, -38.0])  # right internal auditory canal, lateral end
BRAIN_CENTRE_MM = np.array([0.0, -17.0, 5.0])


@dataclass(frozen=True)
class TemplateAnatomy:
    """Tissue channels on the 2 mm MNI grid plus candidate tumour locations (all in mm)."""

    channels: np.ndarray  # (C, X, Y, Z) float32 in [0, 1], order CHANNELS
    edema_bed: np.ndarray  # (1, X, Y, Z) smoothed white matter: where vasogenic edema spreads
    affine: np.ndarray  # template voxel -> MNI mm
    brain_lo: np.ndarray  # brain-mask bounding box, mm
    brain_hi: np.ndarray
    wm_deep: np.ndarray  # (N, 3) mm: deep/lobar white matter (HGG centres)
    gw_junction: np.ndarray  # (N, 3) mm: grey-white junction (metastases, LGG)
    surface: np.ndarray  # (N, 3) mm: brain surface points (meningioma bases)
    surface_normal: np.ndarray  # (N, 3) outward unit normals at ``surface``

    def channel(self, name: str) -> np.ndarray:
        return self.channels[CHANNELS.index(name)]


def _mm_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape).astype(np.float32)


def _ellipsoid(mm: np.ndarray, centre: np.ndarray, radii: tuple[float, float, float]) -> np.ndarray:
    d = sum(((mm[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return np.clip(1.5 - d, 0.0, 1.0)  # soft-edged ellipsoid, 1 inside radius/sqrt(2)


@functools.lru_cache(maxsize=1)
def load_template() -> TemplateAnatomy:
    """Load and derive the template channels once per process (about 6 s, dominated by nilearn)."""
    from nilearn import datasets
    from scipy import ndimage as ndi

    t1 = datasets.load_mni152_template(resolution=2)
    affine = np.asarray(t1.affine, dtype=np.float64)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    gm = np.clip(np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata()), 0, 1)
    wm = np.clip(np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata()), 0, 1)
    gm, wm = gm * brain, wm * brain
    tot = gm + wm
    over = tot > 1.0
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    mm = _mm_grid(brain.shape, affine)

    shell = ndi.binary_dilation(brain, iterations=2) & ~brain  # 4 mm extra-axial rim
    falx = brain & (np.abs(mm[0]) < 2.5) & (csf > 0.4) & (mm[2] > 15)
    dura = (shell | falx).astype(np.float32)
    sinus = shell & (
        ((np.abs(mm[0]) < 6) & (mm[2] > 10) & (mm[1] < 40))  # superior sagittal sinus
        | ((mm[1] < -70) & (mm[2] > -28) & (mm[2] < 2))  # transverse sinuses
    )
    depth = ndi.distance_transform_edt(brain) * 2.0
    atrium = (np.abs(np.abs(mm[0]) - 25) < 10) & (mm[1] > -50) & (mm[1] < -20)
    choroid = (csf > 0.5) & (depth > 14) & atrium & (mm[2] > 0) & (mm[2] < 28)
    gland = _ellipsoid(mm, SELLA_MM, (7.0, 5.5, 4.5))
    stalk = (np.hypot(mm[0] - SELLA_MM[0], mm[1] - SELLA_MM[1] + 1.0) < 2.0) & (
        (mm[2] > SELLA_MM[2]) & (mm[2] < SELLA_MM[2] + 14)
    )
    gland = np.maximum(gland, stalk.astype(np.float32)) * ~brain
    sellar = _ellipsoid(mm, SELLA_MM + [0, 0, 3], (16.0, 13.0, 11.0)) > 0
    cistern = sellar & ~brain & (gland < 0.5)  # CSF around the gland
    csf = np.where(cistern, 1.0, csf)
    channels = np.stack([csf, gm, wm, dura, sinus, choroid, gland]).astype(np.float32)
    channels = np.stack([ndi.gaussian_filter(c, 0.5) for c in channels]).astype(np.float32)
    edema_bed = ndi.gaussian_filter(wm.astype(np.float32), 2.0)[None]  # vasogenic edema follows WM

    pts = np.argwhere(brain)
    lo = pts.min(0) * 2.0 + affine[:3, 3]
    hi = pts.max(0) * 2.0 + affine[:3, 3]
    vox = lambda m: (affine[:3, :3] @ np.argwhere(m).T + affine[:3, 3:4]).T.astype(np.float32)
    wm_deep = vox((wm > 0.85) & (depth > 22) & (mm[2] > -15) & (np.abs(mm[0]) > 12))
    gwj = vox((np.abs(gm - wm) < 0.25) & (gm + wm > 0.9) & (depth > 8))
    smooth = ndi.gaussian_filter(brain.astype(np.float32), 2.0)
    grad = np.stack(np.gradient(smooth))
    surf_mask = brain & ~ndi.binary_erosion(brain) & (mm[2] > -20)
    normals = -grad[:, surf_mask].T
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-6
    return TemplateAnatomy(
        channels=channels,
        edema_bed=edema_bed.astype(np.float32),
        affine=affine,
        brain_lo=lo,
        brain_hi=hi,
        wm_deep=wm_deep,
        gw_junction=gwj,
        surface=vox(surf_mask),
        surface_normal=normals.astype(np.float32),
    )


@dataclass(frozen=True)
class OutputGrid:
    """The voxel grid a cohort is written on (same for every case of a cohort)."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # output voxel -> mm

    @property
    def spacing(self) -> float:
        return float(abs(self.affine[0, 0]))


def make_grid(anat: TemplateAnatomy, shape: int | None = None, spacing: float | None = None) -> OutputGrid:
    """``spacing`` mm: the template's field of view at that spacing (2.0 gives the 99x117x95 MNI grid);
    ``shape`` N: an N^3 isotropic grid just covering the brain (plus 6 mm) at the spacing that fits."""
    if (shape is None) == (spacing is None):
        raise ValueError("give exactly one of shape or spacing")
    if spacing is not None:
        if not 0.5 <= spacing <= 16:
            raise ValueError(f"spacing {spacing} mm is outside 0.5-16 mm")
        tshape = np.array(anat.channels.shape[1:])
        extent = tshape * 2.0
        n = np.ceil(extent / spacing - 1e-6).astype(int)
        origin = anat.affine[:3, 3]
        aff = np.diag([spacing, spacing, spacing, 1.0])
        aff[:3, 3] = origin
        return OutputGrid(tuple(int(v) for v in n), aff)
    if not 8 <= int(shape) <= 512:
        raise ValueError(f"shape {shape} is outside 8-512 voxels")
    n = int(shape)
    lo, hi = anat.brain_lo - 6.0, anat.brain_hi + 6.0
    sp = float((hi - lo).max() / (n - 1))
    centre = (lo + hi) / 2
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = centre - sp * (n - 1) / 2
    return OutputGrid((n, n, n), aff)
