"""Drawing one session: sample the deformed anatomy, compose the four sequences, paint the lesions.

Owns the per-case geometry (random affine deformation of the template, mass effect), the trilinear
sampling of the template channels (one torch ``grid_sample`` pass for all channels), the normal-tissue
contrasts with the normally enhancing structures on T1ce, and painting each lesion pattern into the
images and the 1/2/4 mask. Output is noise-free "tissue signal"; :mod:`.scanner` adds the site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulations.synth.anatomy import BRAIN_CENTRE_MM, CHANNELS, OutputGrid, TemplateAnatomy
from simulations.synth.lesions import TISSUE_LOOKS, Lesion
from simulations.synth.shapes import box_slices, push, smooth_noise

SEQUENCES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class Session:
    """A rendered session on a crop of the output grid (``crop`` = index slices into the grid)."""

    images: np.ndarray  # (4, *crop) float32 tissue signal, order SEQUENCES
    seg: np.ndarray  # crop-shaped uint8, 0/1/2/4
    support: np.ndarray  # crop-shaped bool, inside the head
    crop: tuple[slice, slice, slice]
    mm: np.ndarray  # (3, *crop) template mm of each voxel (before mass effect)


def random_deformation(rng: np.random.Generator, fov_offset: np.ndarray) -> np.ndarray:
    """4x4 output-mm -> template-mm map: rotation (+-8/5/5 deg), scaling (+-8%), shift (+-4 mm)."""
    ang = np.deg2rad(rng.uniform(-1, 1, 3) * np.array([5.0, 5.0, 8.0]))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    lin = rz @ ry @ rx @ np.diag(np.exp(rng.uniform(-0.08, 0.08, 3)))
    m = np.eye(4)
    m[:3, :3] = lin
    c = BRAIN_CENTRE_MM
    m[:3, 3] = c - lin @ c + rng.uniform(-4, 4, 3) + fov_offset
    return m


def _crop(grid: OutputGrid, out_to_tpl: np.ndarray, anat: TemplateAnatomy) -> tuple[slice, slice, slice]:
    lo, hi = anat.brain_lo - 6.0, anat.brain_hi + 6.0
    mm_to_idx = np.linalg.inv(out_to_tpl @ grid.affine)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    idx = (mm_to_idx @ corners.T)[:3]
    a = np.maximum(np.floor(idx.min(1)).astype(int), 0)
    b = np.minimum(np.ceil(idx.max(1)).astype(int) + 1, grid.shape)
    return tuple(slice(int(i), int(j)) for i, j in zip(a, b, strict=True))  # type: ignore[return-value]


def sample_channels(anat: TemplateAnatomy, mm: np.ndarray, volume: np.ndarray | None = None) -> np.ndarray:
    """Trilinear sample of template channels (default: all of them) at mm coordinates (3, *shape)."""
    import torch

    vol = anat.channels if volume is None else volume
    inv = np.linalg.inv(anat.affine)
    shape = mm.shape[1:]
    v = [inv[i, 0] * mm[0] + inv[i, 1] * mm[1] + inv[i, 2] * mm[2] + inv[i, 3] for i in range(3)]
    dims = vol.shape[1:]
    g = np.stack([2.0 * v[2] / (dims[2] - 1) - 1, 2.0 * v[1] / (dims[1] - 1) - 1,
                  2.0 * v[0] / (dims[0] - 1) - 1], axis=-1).astype(np.float32)
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(
            torch.from_numpy(vol)[None], torch.from_numpy(g)[None],
            mode="bilinear", padding_mode="zeros", align_corners=True,
        )
    return out[0].numpy().reshape(len(vol), *shape)


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """0..1 ramp of a signed distance-like ``x`` (positive inside), ``width`` wide."""
    return np.clip(x / np.float32(width) + np.float32(0.5), 0.0, 1.0)


def _mix(img: np.ndarray, w: np.ndarray, look: np.ndarray, mod: np.ndarray | None = None) -> None:
    for s in range(4):
        target = np.float32(look[s]) if mod is None else np.float32(look[s]) * mod
        img[s] += w * (target - img[s])


def paint_lesion(les: Lesion, img: np.ndarray, seg: np.ndarray, tissue: np.ndarray, p: np.ndarray,
                 voxel_mm: float, edema_bed: np.ndarray | None = None) -> None:
    """Paint one lesion into ``img`` (4, ...) and ``seg`` in place (all arrays are the lesion's box)."""
    rng = np.random.default_rng(les.seed)
    R = les.blob.mean_radius
    f = les.blob.field(p)
    dist = (1.0 - f) * np.float32(R)  # ~ mm inside the surface
    pv = max(voxel_mm, 1.5)
    brainish = np.clip(tissue[1] + tissue[2], 0.0, 1.0)
    if les.pattern not in ("extra_axial", "cystic"):  # intra-axial: stays inside the brain
        inbrain = (tissue[0] + tissue[1] + tissue[2]) > 0.5
        p = np.where(inbrain[None], p, np.float32(1e4))  # outside the brain the field is huge
    if "base" in les.extra:  # extra-axial: flat on the dura, nothing beyond the inner table
        base, nrm = les.extra["base"], les.extra["normal"]
        out = sum((p[i] - np.float32(base[i])) * np.float32(nrm[i]) for i in range(3)) > 2.0  # type: ignore[index]
        p = np.where(out[None], np.float32(1e4), p)
    if les.edema_mm > 0:
        n = smooth_noise(rng, wavelength=max(2.0 * R, 25.0))(p)
        bed = tissue[CHANNELS.index("wm")] if edema_bed is None else edema_bed
        wm = np.clip(bed * 1.4, 0, 1)
        reach = np.float32(les.edema_mm) * (0.15 + 0.85 * wm) * (1 + 0.3 * n)
        w = _soft(dist + reach, pv) * brainish * (seg != 4) * (seg != 1)
        _mix(img, w * np.float32(0.85), les.looks["edema"])
        seg[(w > 0.5) & (seg == 0) & (f >= 1.0)] = 2
    pat = les.pattern
    inside = f < 1.0
    mod = None
    if les.hetero > 0:  # heterogeneous signal inside the lesion
        mod = 1.0 + np.float32(les.hetero) * smooth_noise(rng, wavelength=max(R * 0.5, 5.0), waves=7)(p)
    if pat == "cavity":
        glio = _soft(dist + np.float32(les.rim_mm), pv) * brainish
        _mix(img, glio * np.float32(0.7), les.looks["gliosis"])
        seg[(glio > 0.5) & (seg == 0) & ~inside] = 2
        _mix(img, _soft(dist, pv), les.looks["cavity"])
        seg[inside] = 0
        return
    if pat == "bubbles":
        feather = smooth_noise(rng, wavelength=4.0)(p)
        for b in les.extra["bubbles"]:  # type: ignore[union-attr]
            fb = b.field(p)
            db = (1.0 - fb) * np.float32(b.mean_radius)
            w_out = _soft(db, pv) * np.clip(0.75 + les.extra["feathery"] * feather, 0.3, 1.0)  # type: ignore[operator]
            _mix(img, w_out, les.looks["enh"], mod)
            w_in = _soft(db - np.float32(les.rim_mm), pv)
            _mix(img, w_in, les.looks["nec"])
            seg[fb < 1.0] = 4
            seg[db > les.rim_mm] = 1
        return
    body = _soft(dist, pv * (2.0 if pat == "infiltrative" else 1.0))
    if pat == "infiltrative":
        _mix(img, body, les.looks["body"], mod)
        seg[inside] = 1
        frac = float(les.extra.get("enh_fraction", 0.0))  # type: ignore[arg-type]
        if frac > 0:
            patch = smooth_noise(rng, wavelength=max(R * 0.5, 6.0))(p)
            thr = np.quantile(patch[inside], 1.0 - frac) if inside.any() else 9.0
            w = _soft((patch - thr) * np.float32(4.0), 1.0) * body
            _mix(img, w, les.looks["enh"])
            seg[inside & (patch > thr)] = 4
        if les.extra.get("mismatch"):  # T2-FLAIR mismatch: FLAIR-dark core, bright rim
            core = _soft(dist - np.float32(0.3 * R), pv * 2)
            img[3] -= core * np.float32(0.35) * img[3]
        return
    if pat == "extra_axial":
        cleft = np.float32(les.extra.get("cleft_mm", 2.0))
        w_cleft = _soft(dist + cleft, pv) * (1 - body) * brainish
        _mix(img, w_cleft * np.float32(0.7), les.looks["csf"])
        tail = float(les.extra.get("tail_mm", 0.0))  # type: ignore[arg-type]
        if tail > 0:
            r = np.sqrt(sum((p[i] - np.float32(les.blob.centre[i])) ** 2 for i in range(3)))
            w_tail = tissue[3] * _soft(np.float32(les.blob.radii.max() + tail) - r, 4.0) * (1 - body)
            _mix(img, np.clip(w_tail * 2.5, 0, 1), les.looks["tail"])
        _mix(img, body, les.looks["enh"])
        seg[inside] = 4
        return
    _mix(img, body, les.looks["enh"], mod)
    seg[inside] = 4
    if pat == "ring":
        rim = np.float32(les.rim_mm) * (1 + 0.45 * smooth_noise(rng, wavelength=max(R * 0.7, 5.0))(p))
        core = _soft(dist - rim, pv)
        _mix(img, core, les.looks["nec"], None if mod is None else 1 + (mod - 1) * np.float32(0.5))
        seg[dist > rim] = 1
    elif pat == "cystic" and float(les.extra.get("cyst", 0.0)) > 0:  # type: ignore[arg-type]
        blobs = smooth_noise(rng, wavelength=max(R * 0.6, 5.0))(p)
        thr = np.float32(1.0 - 2.0 * float(les.extra["cyst"]))  # type: ignore[arg-type]
        cyst = _soft((blobs - thr) * np.float32(R * 0.3), pv) * _soft(dist - np.float32(2.0), pv)
        _mix(img, cyst, les.looks["cyst"])
        seg[(cyst > 0.5)] = 1


def render_session(anat: TemplateAnatomy, grid: OutputGrid, out_to_tpl: np.ndarray,
                   lesions: list[Lesion], looks: dict[str, np.ndarray]) -> Session:
    """Render one session's noise-free sequences and mask on the head's crop of ``grid``."""
    crop = _crop(grid, out_to_tpl, anat)
    m = out_to_tpl @ grid.affine
    idx = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in crop], indexing="ij")
    mm = np.stack([m[i, 0] * idx[0] + m[i, 1] * idx[1] + m[i, 2] * idx[2] + np.float32(m[i, 3])
                   for i in range(3)]).astype(np.float32)
    p_anat = mm
    for les in lesions:
        if les.mass > 0:
            p_anat = push(p_anat, les.blob.centre, les.mass * les.blob.mean_radius**3)
    tissue = sample_channels(anat, p_anat)
    img = np.zeros((4, *mm.shape[1:]), dtype=np.float32)
    for name in ("csf", "gm", "wm"):
        w = tissue[CHANNELS.index(name)]
        for s in range(4):
            img[s] += w * np.float32(looks[name][s])
    for name in ("dura", "choroid", "gland", "sinus"):
        w = np.clip(tissue[CHANNELS.index(name)], 0.0, 1.0)
        _mix(img, w, looks[name])
    seg = np.zeros(mm.shape[1:], dtype=np.uint8)
    local_to_idx = np.linalg.inv(m)
    local_to_idx[:3, 3] -= [s.start for s in crop]
    for les in lesions:
        box = box_slices(local_to_idx, les.blob.centre, les.reach_mm, seg.shape)
        if box is None:
            continue
        sub = (slice(None), *box)
        bed = sample_channels(anat, p_anat[sub], anat.edema_bed)[0] if les.edema_mm > 0 else None
        paint_lesion(les, img[sub], seg[box], tissue[sub], mm[sub], grid.spacing, bed)
    head = tissue[0] + tissue[1] + tissue[2] + tissue[CHANNELS.index("dura")] + tissue[CHANNELS.index("gland")]
    support = (head > 0.5) | (seg > 0)
    img *= support
    return Session(images=img, seg=seg * support.astype(np.uint8), support=support, crop=crop, mm=mm)


def case_tissue_looks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Normal-tissue looks for one case: the table with a few per cent of biological variation."""
    return {k: np.array(v) * np.exp(rng.normal(0, 0.03, 4)) for k, v in TISSUE_LOOKS.items()}
