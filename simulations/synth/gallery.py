"""The synthetic-cohort gallery: one labelled axial slice per class and sequence, to judge realism.

Owns :func:`write_gallery`, which reads a generated cohort folder (through ``shared.cohort``), picks the
first case of each class (seven tumour types, recurrence, radiation necrosis, a RANO follow-up) and
draws T1, T1ce, T2, FLAIR and the mask through the slice where the mask is largest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROW_ORDER: tuple[str, ...] = (
    "hgg", "lgg", "metastasis", "meningioma", "pituitary_adenoma", "acoustic_neuroma", "healthy",
    "recurrence", "necrosis",
)
SEG_COLOURS = {1: (0.2, 0.4, 1.0), 2: (0.2, 0.9, 0.2), 4: (1.0, 0.85, 0.1)}


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def _window(x: np.ndarray) -> np.ndarray:
    fg = x[x > 0]
    hi = np.percentile(fg, 99.5) if fg.size else 1.0
    return np.clip(x / max(hi, 1e-6), 0, 1)


def write_gallery(cohort_dir: str | Path, out_png: str | Path) -> Path:
    """Write the gallery PNG for the cohort in ``cohort_dir``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.cohort import read_cohort

    cohort = read_cohort(cohort_dir)
    picks: list[tuple[str, object]] = []
    for cls in ROW_ORDER:
        case = next((c for c in cohort.cases if c.extra.get("synth_class") == cls
                     and c.extra.get("synth_pool") != "rano"), None)
        if case is not None:
            picks.append((cls, case))
    for lab in ("PD", "PR"):
        fu = next((c for c in cohort.cases if c.labels.get("rano") == lab), None)
        if fu is not None:
            base = cohort.by_id()[fu.baseline_case_id]
            picks += [(f"RANO baseline ({lab} pair)", base), (f"RANO follow-up: {lab}", fu)]
            break
    if not picks:
        raise ValueError(f"{cohort_dir}: no synthetic cases to draw (is it a gliofed synth folder?)")
    cols = ("t1", "t1ce", "t2", "flair", "seg")
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.3 * len(cols), 2.4 * len(picks)),
                             squeeze=False, facecolor="black")
    for r, (title, case) in enumerate(picks):
        seg = _load(case.images["seg"])  # type: ignore[attr-defined]
        area = ((seg == 1) | (seg == 4)).sum(axis=(0, 1)) * 10 + (seg > 0).sum(axis=(0, 1))
        z = int(np.argmax(area)) if area.max() > 0 else seg.shape[2] // 2 + 4
        if title.startswith("RANO baseline") and r + 1 < len(picks):
            nxt = _load(picks[r + 1][1].images["seg"])  # type: ignore[attr-defined]
            z = int(np.argmax(((nxt > 0) | (seg > 0)).sum(axis=(0, 1))))
        if title.startswith("RANO follow-up"):
            prev = _load(picks[r - 1][1].images["seg"])  # type: ignore[attr-defined]
            z = int(np.argmax(((prev > 0) | (seg > 0)).sum(axis=(0, 1))))
        flair = None
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_facecolor("black")
            if col == "seg":
                base = _window(flair[:, :, z]) if flair is not None else np.zeros(seg.shape[:2])
                rgb = np.repeat(base.T[::-1, :, None], 3, axis=2) * 0.8
                for lab, colr in SEG_COLOURS.items():
                    m = (seg[:, :, z] == lab).T[::-1]
                    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(colr)
                ax.imshow(rgb, interpolation="nearest")
            else:
                vol = _load(case.images[col]).astype(np.float32)  # type: ignore[attr-defined]
                if col == "flair":
                    flair = vol
                ax.imshow(_window(vol[:, :, z]).T[::-1], cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col.upper() if col != "seg" else "mask (1 nec / 2 edema / 4 enh)",
                             color="white", fontsize=9)
            if c == 0:
                site = getattr(case, "site", "")
                ax.set_ylabel(f"{title}\n{case.case_id} {site}", color="white", fontsize=8)  # type: ignore[attr-defined]
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)
    return out
