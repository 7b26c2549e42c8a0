"""RANO 2010 response for baseline/follow-up pairs, measured on the enhancing masks.

Owns the bidimensional measurement (longest axial diameter x longest perpendicular diameter per
measurable enhancing lesion, summed over up to five lesions: the SPD), the response rule (CR: no
enhancement left; PD: SPD >= 1.25 x nadir or a new measurable lesion; PR: SPD <= 0.5 x baseline; else
SD; science.md section 4.2) and how follow-ups are drawn so labels sit a chosen margin from the cut-offs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RANO_LABELS: tuple[str, ...] = ("CR", "PR", "SD", "PD")
RANO_MIX: dict[str, float] = {"CR": 0.08, "PR": 0.17, "SD": 0.30, "PD": 0.45}  # LUMIERE-like
PR_CUT, PD_CUT = 0.5, 1.25
MIN_DIAMETER_MM = 10.0
MAX_TARGETS = 5


@dataclass(frozen=True)
class LesionMeasure:
    longest_mm: float
    perpendicular_mm: float
    slices: int  # axial slices the lesion spans
    measurable: bool

    @property
    def product(self) -> float:
        return self.longest_mm * self.perpendicular_mm


def _components(seg: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage as ndi

    core = (seg == 1) | (seg == 4)
    lab, n = ndi.label(core, structure=np.ones((3, 3, 3), dtype=bool))
    return lab, n


def measure_lesions(seg: np.ndarray, spacing: tuple[float, float, float]) -> list[LesionMeasure]:
    """Bidimensional measures of every enhancing lesion (tumour-core component holding label 4)."""
    from scipy.spatial import ConvexHull, QhullError

    lab, n = _components(seg)
    out: list[LesionMeasure] = []
    for k in range(1, n + 1):
        comp = lab == k
        if not (seg[comp] == 4).any():
            continue
        area = comp.sum(axis=(0, 1))
        z = int(np.argmax(area))
        pts = np.argwhere(comp[:, :, z]).astype(np.float64) * np.array(spacing[:2])
        if len(pts) >= 3:
            try:
                pts = pts[ConvexHull(pts).vertices]
            except QhullError:
                pass
        diff = pts[:, None, :] - pts[None, :, :]
        d2 = (diff**2).sum(-1)
        i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
        longest = float(np.sqrt(d2[i, j]))
        if longest > 0:
            u = (pts[j] - pts[i]) / longest
            v = np.array([-u[1], u[0]])
            proj = pts @ v
            perp = float(proj.max() - proj.min())
        else:
            perp = 0.0
        pix = float(np.mean(spacing[:2]))  # voxel extent: centre-to-centre distance + one voxel
        longest, perp = longest + pix, perp + pix
        nsl = int((area > 0).sum())
        ok = longest >= MIN_DIAMETER_MM and perp >= MIN_DIAMETER_MM and nsl >= 2
        out.append(LesionMeasure(longest, perp, nsl, ok))
    return out


def spd(measures: list[LesionMeasure]) -> float:
    """Sum of products of diameters over the (up to five largest) measurable lesions, mm^2."""
    prods = sorted((m.product for m in measures if m.measurable), reverse=True)
    return float(sum(prods[:MAX_TARGETS]))


def new_lesions(seg0: np.ndarray, seg1: np.ndarray, spacing: tuple[float, float, float]) -> int:
    """Measurable enhancing lesions at follow-up that touch no baseline tumour (2 voxel tolerance)."""
    from scipy import ndimage as ndi

    old = ndi.binary_dilation(seg0 > 0, iterations=2)
    lab, n = _components(seg1)
    count = 0
    for k in range(1, n + 1):
        comp = lab == k
        if (seg1[comp] == 4).any() and not (comp & old).any():
            m = measure_lesions(np.where(comp, seg1, 0).astype(np.uint8), spacing)
            count += int(any(x.measurable for x in m))
    return count


@dataclass(frozen=True)
class RanoCall:
    label: str
    spd0: float
    spd1: float
    ratio: float
    new: int

    @property
    def margin(self) -> float:
        """Distance of the SPD ratio to the nearest cut-off (inf when the call does not use it)."""
        if self.label == "CR" or self.new:
            return float("inf")
        return float(min(abs(self.ratio - PR_CUT), abs(self.ratio - PD_CUT)))


def call_rano(seg0: np.ndarray, seg1: np.ndarray, spacing: tuple[float, float, float]) -> RanoCall:
    """RANO 2010 imaging response of follow-up ``seg1`` against baseline (= nadir) ``seg0``."""
    s0 = spd(measure_lesions(seg0, spacing))
    if not (seg1 == 4).any():
        return RanoCall("CR", s0, 0.0, 0.0, 0)
    s1 = spd(measure_lesions(seg1, spacing))
    ratio = s1 / s0 if s0 > 0 else float("inf")
    new = new_lesions(seg0, seg1, spacing)
    if new or ratio >= PD_CUT:
        label = "PD"
    elif ratio <= PR_CUT:
        label = "PR"
    else:
        label = "SD"
    return RanoCall(label, s0, s1, ratio, new)


def target_ratio(rng: np.random.Generator, label: str, margin: float) -> float:
    """An SPD ratio inside ``label``'s band, at least ``margin`` from the cut-offs."""
    if label == "PR":
        return float(rng.uniform(0.12, PR_CUT - margin))
    if label == "SD":
        return float(rng.uniform(PR_CUT + margin, PD_CUT - margin))
    if label == "PD":
        return float(rng.uniform(PD_CUT + margin, 2.4))
    return 0.0
