"""Quality control of prepared sessions: a PNG per session, ``qc.csv`` with outliers flagged, an HTML page.

The PNG shows every sequence (rows) in three planes through the brain's centre (columns) with the
template's brain outline (red) and the refined brain mask (cyan) drawn over it, so a failed registration
or skull strip is seen at a glance. ``qc.csv`` carries per session the registration similarity
(correlation with the template inside its brain mask), co-registration MI per sequence, brain volume
in native mm^3, intensity statistics, and the flags that make a session an outlier.
"""

from __future__ import annotations

import csv
import html
import os
from pathlib import Path

import numpy as np

# Absolute limits that flag a session even in a small site (robust z-scores need >= 5 sessions).
MIN_TEMPLATE_CORR = 0.5
BRAIN_ML_RANGE = (900.0, 2600.0)  # native ml of the MNI-mask brain (it keeps the sulcal CSF)
ROBUST_Z = 3.5


def _window(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    vals = x[mask] if mask.any() else x.ravel()
    lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
    return np.clip((x - lo) / (hi - lo + 1e-6), 0, 1)


def _edge(m: np.ndarray) -> np.ndarray:
    """The one-pixel outline of a 2D boolean mask."""
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _overlay(gray: np.ndarray, template_brain: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """RGB of a 2D slice with the template brain's outline in red and the brain mask's in cyan."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[_edge(brain)] = (0.0, 1.0, 1.0)
    rgb[_edge(template_brain)] = (1.0, 0.0, 0.0)
    return rgb


def session_png(path: Path, title: str, images: dict[str, np.ndarray], template_brain: np.ndarray,
                brain: np.ndarray) -> Path:
    """Three planes x every sequence with the template's brain outline and the refined mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.argwhere(brain if brain.any() else template_brain)
    c = idx.mean(0).round().astype(int) if idx.size else np.array(brain.shape) // 2
    planes = (("axial", lambda v: v[:, :, c[2]]), ("coronal", lambda v: v[:, c[1], :]),
              ("sagittal", lambda v: v[c[0], :, :]))
    tb = template_brain.astype(bool)
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for r, (name, img) in enumerate(images.items()):
        for k, (plane, cut) in enumerate(planes):
            ax = axes[r, k]
            sl = cut(img)
            rgb = _overlay(_window(sl, cut(brain)), cut(tb), cut(brain))
            ax.imshow(rgb.transpose(1, 0, 2), origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(plane, fontsize=9)
            if k == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"{title}  (red: template brain, cyan: brain mask)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def intensity_stats(name: str, img: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    v = img[brain] if brain.any() else img.ravel()
    p1, p50, p99 = np.percentile(v, [1, 50, 99]) if v.size else (0.0, 0.0, 0.0)
    return {f"{name}_mean": float(v.mean()) if v.size else 0.0, f"{name}_std": float(v.std()) if v.size
            else 0.0, f"{name}_p1": float(p1), f"{name}_median": float(p50), f"{name}_p99": float(p99)}


def template_corr(img: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation with the template inside its brain mask (1 = same contrast pattern)."""
    a, b = img[mask].astype(float), template[mask].astype(float)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def flag_outliers(rows: list[dict]) -> None:
    """Set ``outlier`` (reasons joined by ';') on every row, in place."""
    def robust_z(key: str) -> list[float]:
        vals = np.array([float(r.get(key, np.nan)) for r in rows])
        med = np.nanmedian(vals)
        mad = np.nanmedian(np.abs(vals - med)) * 1.4826
        return list((vals - med) / mad) if len(rows) >= 5 and mad > 0 else [0.0] * len(rows)

    zs = {k: robust_z(k) for k in ("template_corr", "brain_ml")}
    for i, r in enumerate(rows):
        why = []
        if float(r["template_corr"]) < MIN_TEMPLATE_CORR:
            why.append(f"template correlation {float(r['template_corr']):.2f} < {MIN_TEMPLATE_CORR}")
        if not BRAIN_ML_RANGE[0] <= float(r["brain_ml"]) <= BRAIN_ML_RANGE[1]:
            why.append(f"brain volume {float(r['brain_ml']):.0f} ml outside "
                       f"{BRAIN_ML_RANGE[0]:.0f}-{BRAIN_ML_RANGE[1]:.0f}")
        for k, z in zs.items():
            if abs(z[i]) > ROBUST_Z:
                why.append(f"{k} robust z {z[i]:+.1f}")
        r["outlier"] = "; ".join(why)


def write_qc(site: Path, rows: list[dict]) -> tuple[Path, Path]:
    """``qc.csv`` and ``qc.html`` (a table and every session's PNG) in SITE_DIR/qc/."""
    qc = site / "qc"
    qc.mkdir(parents=True, exist_ok=True)
    flag_outliers(rows)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys and k != "png")
    csv_path = qc / "qc.csv"
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(csv_path)
    shown = ["case_id", "template_corr", "brain_ml", "outlier"]
    out = ["<!doctype html><meta charset='utf-8'><title>gliofed site prepare QC</title>",
           ("<style>body{font-family:sans-serif}td,th{padding:2px 8px}.bad{background:#fdd}"
           "img{max-width:600px}</style>"),
           f"<h1>QC: {len(rows)} session(s)</h1>",
           (f"<p>{sum(1 for r in rows if r['outlier'])} flagged. Red: template brain outline; cyan: "
           "brain mask after refinement. Full numbers in <a href='qc.csv'>qc.csv</a>.</p><table>"),
           "<tr>" + "".join(f"<th>{k}</th>" for k in shown) + "</tr>"]
    for r in rows:
        cls = " class='bad'" if r["outlier"] else ""
        cells = "".join(f"<td>{html.escape(f'{r[k]:.3g}' if isinstance(r[k], float) else str(r[k]))}"
                        "</td>" for k in shown)
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    for r in rows:
        rel = os.path.relpath(site / r["png"], qc)
        out.append(f"<h3>{html.escape(r['case_id'])}</h3><img src='{html.escape(rel)}' "
                   f"alt='{html.escape(r['case_id'])}'>")
    html_path = qc / "qc.html"
    html_path.write_text("\n".join(out))
    return csv_path, html_path
