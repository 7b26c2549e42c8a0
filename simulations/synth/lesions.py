"""Tumour classes as lesion plans, following the radiology rules of science.md section 4.1.

Owns one builder per class (HGG, LGG, metastasis, meningioma, pituitary adenoma, acoustic neuroma,
healthy) and the post-treatment plans (resection cavity, recurrence, radiation necrosis). A builder draws
a :class:`Lesion` list from the case's random generator; :mod:`.render` turns it into image layers and the
1/2/4 mask. Looks are (T1, T1ce, T2, FLAIR) signal levels on the scale of :data:`TISSUE_LOOKS`
(white matter T1 = 0.80), jittered per case so classes overlap in every single intensity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from shared.cohort import LABEL_VALUES
from simulations.synth.anatomy import CPA_MM, IAC_FUNDUS_MM, SELLA_MM, TemplateAnatomy
from simulations.synth.shapes import Blob, make_blob

CLASSES: tuple[str, ...] = LABEL_VALUES["tumor_type"]  # the cohort contract's tumour classes

# (T1, T1ce, T2, FLAIR) of normal tissue and normally enhancing structures.
TISSUE_LOOKS: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.22, 0.24, 1.00, 0.08),
    "gm": (0.55, 0.56, 0.64, 0.60),
    "wm": (0.80, 0.80, 0.44, 0.47),
    "dura": (0.30, 0.80, 0.32, 0.35),
    "sinus": (0.35, 1.30, 0.12, 0.20),
    "choroid": (0.45, 1.10, 0.70, 0.40),
    "gland": (0.56, 1.15, 0.56, 0.52),
}

# Base looks of lesion compartments; per-case jitter is added in :func:`_look`.
BASE_LOOKS: dict[str, tuple[float, float, float, float]] = {
    "hgg_enh": (0.50, 1.12, 0.74, 0.78),
    "hgg_nec": (0.30, 0.32, 0.92, 0.55),
    "edema": (0.52, 0.53, 0.84, 0.88),
    "lgg_body": (0.42, 0.45, 0.90, 0.82),
    "lgg_enh": (0.45, 0.72, 0.86, 0.80),
    "met_enh": (0.54, 1.08, 0.70, 0.72),
    "met_nec": (0.33, 0.35, 0.88, 0.58),
    "men_enh": (0.56, 1.14, 0.64, 0.62),
    "csf_cleft": TISSUE_LOOKS["csf"],
    "tail": (0.40, 1.25, 0.40, 0.40),
    "pit_enh": (0.53, 0.86, 0.60, 0.56),
    "pit_cyst": (0.36, 0.40, 0.95, 0.45),
    "schw_enh": (0.48, 1.10, 0.86, 0.70),
    "schw_cyst": (0.32, 0.36, 1.00, 0.42),
    "cavity": (0.24, 0.26, 0.98, 0.14),
    "gliosis": (0.55, 0.56, 0.78, 0.82),
    "rec_enh": (0.52, 1.16, 0.80, 0.78),
    "rec_nec": (0.34, 0.38, 0.90, 0.60),
    "rn_enh": (0.50, 0.94, 0.66, 0.70),
    "rn_nec": (0.38, 0.42, 0.80, 0.62),
}


@dataclass(frozen=True)
class Lesion:
    """One lesion: its blob, enhancement pattern, compartment looks and pattern-specific extras.

    ``pattern``: ring (enhancing rim, necrotic core) | solid | infiltrative (LGG) | extra_axial
    (meningioma: CSF cleft, dural tail) | cystic (solid with cysts) | bubbles (radiation necrosis) |
    cavity (resection cavity with gliotic rim).
    """

    blob: Blob
    pattern: str
    looks: dict[str, np.ndarray]
    rim_mm: float = 0.0
    edema_mm: float = 0.0
    mass: float = 0.0  # mass-effect ball volume as a fraction of radius^3
    seed: int = 0  # seeds this lesion's texture noise
    extra: dict[str, object] = field(default_factory=dict)
    measurable: bool = True  # counts in RANO (cavities do not)
    hetero: float = 0.0  # relative signal heterogeneity inside the lesion

    def scaled(self, s: float) -> Lesion:
        sub = self.extra.get("bubbles")
        extra = dict(self.extra)
        if sub is not None:
            c = self.blob.centre
            extra["bubbles"] = [
                replace(b.scaled(s), centre=c + (b.centre - c) * s) for b in sub  # type: ignore[union-attr]
            ]
        return replace(
            self,
            blob=self.blob.scaled(s),
            rim_mm=self.rim_mm * min(1.0, max(s, 0.4)),
            edema_mm=self.edema_mm * s,
            extra=extra,
        )

    @property
    def reach_mm(self) -> float:
        """Half-width of the box that holds the lesion, its edema and any dural tail."""
        tail = float(self.extra.get("tail_mm", 0.0))  # type: ignore[arg-type]
        sub = self.extra.get("bubbles") or []
        spread = max([np.linalg.norm(b.centre - self.blob.centre) + b.max_radius for b in sub], default=0)  # type: ignore[union-attr]
        return max(self.blob.max_radius, spread) + 1.6 * self.edema_mm + tail + 6.0


def _look(rng: np.random.Generator, name: str, enhance: float = 1.0, sd: float = 0.05) -> np.ndarray:
    base = np.array(BASE_LOOKS[name], dtype=np.float64)
    out = base * np.exp(rng.normal(0.0, sd, 4))
    out[1] = out[0] + (out[1] - out[0]) * enhance  # contrast uptake scales the T1ce excess only
    return out


def _pick(rng: np.random.Generator, pts: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    cand = pts if where is None or not where.any() else pts[where]
    return cand[rng.integers(len(cand))].astype(np.float64)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def build_hgg(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    up = rng.uniform(0.8, 1.2)
    radius = rng.uniform(13.0, 33.0)
    c = _pick(rng, anat.wm_deep)
    looks = {k: _look(rng, n, up) for k, n in (("enh", "hgg_enh"), ("nec", "hgg_nec"), ("edema", "edema"))}
    out = [
        Lesion(
            blob=make_blob(rng, c, radius, elong=0.25, amp=rng.uniform(0.10, 0.28)),
            pattern="ring",
            looks=looks,
            rim_mm=min(rng.uniform(3.0, 10.0), 0.55 * radius),
            edema_mm=rng.uniform(10.0, 28.0),
            mass=rng.uniform(0.4, 0.9),
            seed=_seed(rng),
            hetero=rng.uniform(0.05, 0.12),
        )
    ]
    if rng.random() < 0.15:  # multifocal
        d = rng.standard_normal(3)
        c2 = c + d / np.linalg.norm(d) * (radius + rng.uniform(12, 25))
        r2 = rng.uniform(6.0, 12.0)
        out.append(
            Lesion(make_blob(rng, c2, r2, amp=rng.uniform(0.1, 0.2)), "ring", looks,
                   rim_mm=min(rng.uniform(3, 5), 0.5 * r2), edema_mm=rng.uniform(6, 14),
                   mass=0.3, seed=_seed(rng))
        )
    return out


def build_lgg(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    pts = anat.gw_junction
    lobar = (pts[:, 1] > -5) | ((pts[:, 2] < 5) & (np.abs(pts[:, 0]) > 30))
    c = _pick(rng, pts, lobar)
    radius = rng.uniform(10.0, 30.0)
    looks = {
        "body": _look(rng, "lgg_body"),
        "enh": _look(rng, "lgg_enh", rng.uniform(0.6, 1.2)),
        "edema": _look(rng, "edema"),
    }
    return [
        Lesion(
            blob=make_blob(rng, c, radius, elong=0.3, amp=rng.uniform(0.12, 0.3)),
            pattern="infiltrative",
            looks=looks,
            edema_mm=rng.uniform(0.0, 3.0),
            mass=rng.uniform(0.05, 0.3),
            seed=_seed(rng),
            hetero=rng.uniform(0.03, 0.08),
            extra={
                "enh_fraction": float(rng.choice([0.0, rng.uniform(0.02, 0.25)], p=[0.45, 0.55])),
                "mismatch": bool(rng.random() < 0.3),
            },
        )
    ]


def build_metastasis(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    n = 1 if rng.random() < 0.45 else int(rng.integers(2, 6))
    pts = anat.gw_junction
    supra = pts[:, 2] > -10
    cereb = (pts[:, 1] < -50) & (pts[:, 2] < -15)
    up = rng.uniform(0.8, 1.2)
    enh, nec, ed = _look(rng, "met_enh", up), _look(rng, "met_nec"), _look(rng, "edema")
    out: list[Lesion] = []
    centres: list[np.ndarray] = []
    for i in range(n):
        for _ in range(30):
            c = _pick(rng, pts, cereb if rng.random() < 0.15 else supra)
            if all(np.linalg.norm(c - o) > 30 for o in centres):
                break
        centres.append(c)
        radius = rng.uniform(4.0, 15.0) if i == 0 else rng.uniform(2.5, 9.0)
        ring = radius >= 8.0 and rng.random() < 0.8
        out.append(
            Lesion(
                blob=make_blob(rng, c, radius, elong=0.1, amp=rng.uniform(0.0, 0.06)),
                pattern="ring" if ring else "solid",
                looks={"enh": enh, "nec": nec, "edema": ed},
                rim_mm=min(rng.uniform(2.0, 4.0), 0.45 * radius),
                edema_mm=radius * rng.uniform(1.0, 2.5) + rng.uniform(3.0, 8.0),
                mass=rng.uniform(0.2, 0.6),
                seed=_seed(rng),
                hetero=rng.uniform(0.0, 0.05),
            )
        )
    return out


def build_meningioma(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    s, nrm = anat.surface, anat.surface_normal
    u = rng.random()
    if u < 0.5:
        where = s[:, 2] > 5  # convexity
    elif u < 0.75:
        where = (np.abs(s[:, 0]) < 14) & (s[:, 2] > 25)  # parasagittal / falx
    else:
        where = (np.abs(np.abs(s[:, 0]) - 35) < 10) & (np.abs(s[:, 1] - 8) < 12) & (s[:, 2] < 0)  # sphenoid
    cand = np.flatnonzero(where) if where.any() else np.arange(len(s))
    i = cand[rng.integers(len(cand))]
    base, normal = s[i].astype(np.float64), nrm[i].astype(np.float64)
    radius = rng.uniform(7.0, 28.0)
    c = base - normal * radius * rng.uniform(0.15, 0.6)  # grows inward from a broad dural base
    blob = make_blob(rng, c, radius, elong=0.15, amp=rng.uniform(0.0, 0.07))
    return [
        Lesion(
            blob=blob,
            pattern="extra_axial",
            looks={
                "enh": _look(rng, "men_enh", rng.uniform(0.85, 1.15)),
                "csf": _look(rng, "csf_cleft", sd=0.02),
                "tail": _look(rng, "tail"),
                "edema": _look(rng, "edema"),
            },
            edema_mm=float(rng.choice([0.0, rng.uniform(2.0, 14.0)], p=[0.5, 0.5])),
            mass=rng.uniform(0.5, 1.0),
            seed=_seed(rng),
            extra={"tail_mm": float(rng.uniform(5.0, 15.0)) if rng.random() < 0.65 else 0.0,
                   "cleft_mm": float(rng.uniform(1.5, 3.0)), "base": base, "normal": normal},
        )
    ]


def build_pituitary(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    radius = rng.uniform(5.0, 17.0)
    low = SELLA_MM + rng.normal(0, 1.0, 3) * [1, 1, 0.5]
    looks = {"enh": _look(rng, "pit_enh", rng.uniform(0.8, 1.15)), "cyst": _look(rng, "pit_cyst")}
    cyst = float(rng.uniform(0.1, 0.35)) if radius > 11 and rng.random() < 0.6 else 0.0
    lower_r = min(radius, 8.0)
    out = [Lesion(make_blob(rng, low, lower_r, elong=0.15, amp=0.03), "cystic", looks,
                  mass=0.2, seed=_seed(rng), extra={"cyst": cyst})]
    if radius > 8.0:  # suprasellar extension through the diaphragma: the "snowman"
        top = low + [0.0, rng.normal(0, 1.5), lower_r * 0.9 + (radius - 8.0) * 0.9]
        out.append(Lesion(make_blob(rng, top, radius * 0.85, elong=0.15, amp=0.04), "cystic",
                          looks, mass=0.5, seed=_seed(rng), extra={"cyst": cyst}))
    return out


def build_schwannoma(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    side = 1.0 if rng.random() < 0.5 else -1.0
    flip = np.array([side, 1.0, 1.0])
    radius = rng.uniform(3.0, 17.0)
    # the CPA ball grows medially/posteriorly from the porus; the stalk fills the canal
    ball = CPA_MM * flip + np.array([-0.25 * side * radius, -0.2 * radius, 0.0])
    looks = {"enh": _look(rng, "schw_enh", rng.uniform(0.85, 1.15)), "cyst": _look(rng, "schw_cyst")}
    cyst = float(rng.uniform(0.15, 0.4)) if radius > 11 and rng.random() < 0.6 else 0.0
    out = [Lesion(make_blob(rng, ball, radius, elong=0.15, amp=0.05), "cystic", looks,
                  mass=0.7, seed=_seed(rng), extra={"cyst": cyst}, hetero=0.01 * radius)]
    fundus, porus = IAC_FUNDUS_MM * flip, CPA_MM * flip
    axis = fundus - porus
    length = np.linalg.norm(axis)
    r_stalk = rng.uniform(1.8, 3.0)
    rot = np.column_stack(_frame(axis / length))
    stalk = Blob(centre=(fundus + porus) / 2, radii=np.array([length / 2 + 1.0, r_stalk, r_stalk]), rot=rot)
    out.append(Lesion(stalk, "cystic", looks, seed=_seed(rng), extra={"cyst": 0.0}))
    return out


def _frame(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.cross(a, [0.0, 0.0, 1.0] if abs(a[2]) < 0.9 else [1.0, 0.0, 0.0])
    b /= np.linalg.norm(b)
    return a, b, np.cross(a, b)


def build_healthy(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    return []


BUILDERS = {
    "hgg": build_hgg,
    "lgg": build_lgg,
    "metastasis": build_metastasis,
    "meningioma": build_meningioma,
    "pituitary_adenoma": build_pituitary,
    "acoustic_neuroma": build_schwannoma,
    "healthy": build_healthy,
}


def build_class(kind: str, rng: np.random.Generator, anat: TemplateAnatomy,
                min_radius: float = 0.0) -> list[Lesion]:
    """Lesion plan of one of :data:`CLASSES`; metastases smaller than ``min_radius`` mm (about a
    voxel) are enlarged to it so every drawn lesion shows up in the mask on coarse grids."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tumour class {kind!r}; choose one of {', '.join(CLASSES)}")
    out = BUILDERS[kind](rng, anat)
    if kind == "metastasis" and min_radius > 0:
        out = [l.scaled(min_radius / l.blob.mean_radius) if l.blob.mean_radius < min_radius else l
               for l in out]
    return out
