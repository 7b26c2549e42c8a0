"""Heatmaps for the run report: the cross-site matrix (every model on every site's test split) and
leave-one-site-out (each site scored by a federation that never saw it, next to the full federation).

Both read the plain dicts a simulation keeps in summary.json (``cross_site``, ``loso``); each cell shows
the headline metric, its bootstrap 95% CI and n (grey "n/a" where the metric is undefined, e.g. a test
split with one class for AUC).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any


def _v(cell: dict[str, Any], key: str) -> float:
    v = cell.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def _label(cell: dict[str, Any], key: str) -> str:
    v = _v(cell, key)
    n = int(cell.get("n", 0) or 0)
    if not math.isfinite(v):
        return f"n/a\nn={n}"
    ci = (cell.get("ci") or {}).get(key)
    band = f"\n[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{v:.3f}{band}\nn={n}"


def _heatmap(path: Path, rows: list[str], cols: list[str], cells: list[list[dict[str, Any]]],
             key: str, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[_v(c, key) for c in row] for row in cells], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.35 * len(cols), 0.9 + 0.62 * len(rows)))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.5 if key == "auc" else 0.0, vmax=1.0,
              aspect="auto")
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            v = data[i, j]
            dark = math.isfinite(v) and v < 0.8
            ax.text(j, i, _label(cell, key), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matrix_figures(run_dir: Path, summary: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """Write cross_site.png / loso.png when the summary holds them; (file, caption) pairs."""
    figs: list[tuple[str, str]] = []
    cross = summary.get("cross_site")
    if cross and cross.get("cells"):
        models, sites = cross["models"], cross["sites"]
        cells = [[cross["cells"][m].get(s, {}) for s in sites] for m in models]
        _heatmap(run_dir / "cross_site.png", models, sites, cells, key,
                 f"Cross-site {key}: model (row)\non each site's test split (column)",
                 "test split")
        figs.append(("cross_site.png", ("Cross-site evaluation: every model on every site's test split "
                                       "(bootstrap 95% CI, n)")))
    loso = summary.get("loso")
    if loso:
        sites = sorted(loso)
        cells = [[loso[s]["loso"], loso[s]["global"]] for s in sites]
        _heatmap(run_dir / "loso.png", sites, ["federation without it", "full federation"], cells, key,
                 f"Leave-one-site-out {key}\non the held-out site's test split", "model")
        figs.append(("loso.png", ("Leave-one-site-out: each site scored by a federation of the others, "
                                 "next to the full federation's model")))
    return figs


def matrix_tables(summary: dict[str, Any], key: str, cell: Any) -> str:
    """HTML tables of the same numbers (``cell(value, ci)`` renders value [CI])."""
    parts = []
    cross = summary.get("cross_site")
    if cross and cross.get("cells"):
        head = "".join(f"<th>{html.escape(s)}</th>" for s in cross["sites"])
        body = "".join(
            f"<tr><th>{html.escape(m)}</th>" + "".join(
                f"<td>{cell(c.get(key), (c.get('ci') or {}).get(key))} (n={c.get('n', 0)})</td>"
                for c in (cross["cells"][m].get(s, {}) for s in cross["sites"])) + "</tr>"
            for m in cross["models"])
        parts.append(f"<h3>Cross-site {html.escape(key)} [95% CI] (n)</h3>"
                     f"<table><tr><th>model \\ test split</th>{head}</tr>{body}</table>")
    loso = summary.get("loso")
    if loso:
        body = "".join(
            f"<tr><th>{html.escape(s)}</th>"
            + "".join(f"<td>{cell(r[a].get(key), (r[a].get('ci') or {}).get(key))} "
                      f"(n={r[a].get('n', 0)})</td>" for a in ("loso", "global"))
            + f"<td>{html.escape(', '.join(r.get('trained_on', [])))}</td></tr>"
            for s, r in sorted(loso.items()))
        parts.append(f"<h3>Leave-one-site-out {html.escape(key)} [95% CI] (n)</h3><table><tr>"
                     "<th>held-out site</th><th>federation without it</th><th>full federation</th>"
                     f"<th>trained on</th></tr>{body}</table>")
    return "".join(parts)
