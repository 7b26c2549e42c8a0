"""Bootstrap 95% confidence intervals for federated evaluation metrics, from counts only.

The sites send confusion matrices and per-class score histograms (never per-case scores); the status
writer keeps them per round in ``RUN_DIR/eval_counts.jsonl``. Resampling the test cases is then a
multinomial draw over the confusion cells (accuracy, balanced accuracy) and, for AUC, a stratified draw
over each class's positive and negative score histograms (the usual stratified AUC bootstrap; for more
than two classes each class's one-vs-rest AUC is resampled on its own, then macro-averaged). Pooled
intervals use the summed counts of all sites, which is exactly the pooled test set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

N_BOOT = 1000


def _auc_batch(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of binned scores for each row of ``pos``/``neg`` (B x BINS counts); ties count half."""
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)


def bootstrap_cis(confusion: np.ndarray, hist: np.ndarray | None, n_boot: int = N_BOOT,
                  seed: int = 0) -> dict[str, list[float]]:
    """{metric: [low, high]} 95% percentile intervals for accuracy, balanced accuracy and AUC."""
    rng = np.random.default_rng(seed)
    k = confusion.shape[0]
    n = int(confusion.sum())
    out: dict[str, list[float]] = {}
    if n == 0:
        return out
    draws = rng.multinomial(n, confusion.reshape(-1) / n, size=n_boot).reshape(n_boot, k, k)
    diag = np.einsum("bii->bi", draws)
    rows = draws.sum(2)
    out["accuracy"] = _interval(diag.sum(1) / n)
    present = confusion.sum(1) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(rows[:, present] > 0, diag[:, present] / rows[:, present], np.nan)
    out["balanced_accuracy"] = _interval(np.nanmean(recall, axis=1))
    if hist is not None and hist.size:
        aucs = []
        for c in range(k):
            pos, neg = hist[c, 0], hist[c, 1]
            if pos.sum() == 0 or neg.sum() == 0:
                continue
            p = rng.multinomial(int(pos.sum()), pos / pos.sum(), size=n_boot)
            q = rng.multinomial(int(neg.sum()), neg / neg.sum(), size=n_boot)
            aucs.append((c, _auc_batch(p, q)))
        if k == 2:
            aucs = [a for a in aucs if a[0] == 1]
        if aucs:
            out["auc"] = _interval(np.nanmean(np.stack([a for _, a in aucs]), axis=0))
    return {m: v for m, v in out.items() if all(np.isfinite(v))}


def _interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _arrays(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    k = int(entry["num_classes"])
    conf = np.asarray(entry["confusion"], dtype=np.int64).reshape(k, k)
    h = entry.get("score_hist") or []
    hist = np.asarray(h, dtype=np.int64).reshape(k, 2, -1) if h else None
    return conf, hist


def round_cis(run_dir: str | Path, rounds: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """{round: {"pooled": {metric: [lo, hi]}, "sites": {site: {metric: [lo, hi]}}}} from the counts."""
    path = Path(run_dir) / "eval_counts.jsonl"
    if not path.is_file():
        return {}
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rnd = int(row["round"])
        if rounds is not None and rnd not in rounds:
            continue
        sites, total_c, total_h = {}, None, None
        for name, entry in sorted(row["sites"].items()):
            conf, hist = _arrays(entry)
            sites[name] = bootstrap_cis(conf, hist, seed=rnd)
            total_c = conf if total_c is None else total_c + conf
            if hist is not None:
                total_h = hist if total_h is None else total_h + hist
        pooled = bootstrap_cis(total_c, total_h, seed=rnd) if total_c is not None else {}
        out[rnd] = {"pooled": pooled, "sites": sites}
    return out
