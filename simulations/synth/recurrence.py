"""Post-treatment plans: resection cavity, glioma recurrence and radiation necrosis.

Owns the recurrence-vs-necrosis task's lesions (Ying 2025 style: a resection region with an enhancing
lesion at its wall) and the post-operative glioblastoma used as the RANO baseline. Recurrence is nodular,
mass-like, with higher relative T1ce/T2 signal; radiation necrosis is a "soap-bubble"/feathery cluster of
thin rings with lower signal. Looks are jittered so the two overlap, as they do in the clinic.
"""

from __future__ import annotations

import numpy as np

from simulations.synth.anatomy import TemplateAnatomy
from simulations.synth.lesions import Lesion, _look, _pick, _seed
from simulations.synth.shapes import make_blob

RECURRENCE_LABELS: tuple[str, str] = ("recurrence", "necrosis")


def build_cavity(rng: np.random.Generator, anat: TemplateAnatomy) -> tuple[Lesion, np.ndarray]:
    """A resection cavity in lobar white matter; returns it and a unit direction to its wall."""
    c = _pick(rng, anat.wm_deep)
    radius = rng.uniform(8.0, 18.0)
    cav = Lesion(
        blob=make_blob(rng, c, radius, elong=0.25, amp=rng.uniform(0.05, 0.15)),
        pattern="cavity",
        looks={"cavity": _look(rng, "cavity", sd=0.03), "gliosis": _look(rng, "gliosis")},
        rim_mm=rng.uniform(2.0, 5.0),
        seed=_seed(rng),
        measurable=False,
    )
    d = rng.standard_normal(3)
    return cav, d / np.linalg.norm(d)


def build_recurrence(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    cav, d = build_cavity(rng, anat)
    radius = rng.uniform(6.0, 17.0)
    c = cav.blob.centre + d * cav.blob.mean_radius * rng.uniform(0.9, 1.3)
    up = rng.uniform(0.85, 1.2)
    solid = rng.random() < 0.5
    return [
        cav,
        Lesion(
            blob=make_blob(rng, c, radius, elong=0.25, amp=rng.uniform(0.1, 0.28)),
            pattern="solid" if solid else "ring",
            looks={"enh": _look(rng, "rec_enh", up, sd=0.07), "nec": _look(rng, "rec_nec"),
                   "edema": _look(rng, "edema")},
            rim_mm=min(rng.uniform(4.0, 8.0), 0.6 * radius),
            edema_mm=rng.uniform(6.0, 20.0),
            mass=rng.uniform(0.3, 0.7),
            seed=_seed(rng),
            hetero=rng.uniform(0.04, 0.1),
        ),
    ]


def build_radiation_necrosis(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    cav, d = build_cavity(rng, anat)
    spread = rng.uniform(7.0, 15.0)
    c = cav.blob.centre + d * cav.blob.mean_radius * rng.uniform(0.9, 1.2)
    bubbles = []
    for _ in range(int(rng.integers(3, 9))):
        off = rng.standard_normal(3)
        off *= spread * rng.uniform(0.2, 0.8) / np.linalg.norm(off)
        bubbles.append(make_blob(rng, c + off, rng.uniform(3.0, 7.0), elong=0.2, amp=0.05))
    return [
        cav,
        Lesion(
            blob=make_blob(rng, c, spread, elong=0.2, amp=0.1),
            pattern="bubbles",
            looks={"enh": _look(rng, "rn_enh", rng.uniform(0.8, 1.15), sd=0.07),
                   "nec": _look(rng, "rn_nec"), "edema": _look(rng, "edema")},
            rim_mm=rng.uniform(1.2, 2.5),
            edema_mm=rng.uniform(5.0, 18.0),
            mass=rng.uniform(0.0, 0.2),
            seed=_seed(rng),
            hetero=rng.uniform(0.04, 0.1),
            extra={"bubbles": bubbles, "feathery": float(rng.uniform(0.2, 0.5))},
        ),
    ]


def build_postop_gbm(rng: np.random.Generator, anat: TemplateAnatomy) -> list[Lesion]:
    """RANO baseline: resection cavity plus one or two measurable residual enhancing lesions."""
    cav, d = build_cavity(rng, anat)
    up = rng.uniform(0.85, 1.2)
    looks = {"enh": _look(rng, "hgg_enh", up), "nec": _look(rng, "hgg_nec"), "edema": _look(rng, "edema")}
    out = [cav]
    for i in range(1 if rng.random() < 0.7 else 2):
        dd = d if i == 0 else -d
        radius = rng.uniform(8.0, 16.0)
        c = cav.blob.centre + dd * cav.blob.mean_radius * rng.uniform(1.0, 1.3)
        out.append(
            Lesion(
                blob=make_blob(rng, c, radius, elong=0.2, amp=rng.uniform(0.05, 0.18)),
                pattern="ring" if radius > 10 and rng.random() < 0.6 else "solid",
                looks=looks,
                rim_mm=min(rng.uniform(3.0, 6.0), 0.5 * radius),
                edema_mm=rng.uniform(8.0, 20.0),
                mass=rng.uniform(0.2, 0.5),
                seed=_seed(rng),
            )
        )
    return out
