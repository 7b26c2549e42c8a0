"""Federated metrics after a round: per site, example-weighted, and pooled exactly.

Sites send their confusion matrix and per-class score histograms; summing them gives the confusion and
histograms of the pooled test set, so pooled accuracy, balanced accuracy and AUC equal what one would
compute with all test cases in one place (up to the histogram's bin width for AUC).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.contract import CONFUSION, NUM_CLASSES, NUM_EXAMPLES, SCORE_HIST, SKIPPED

SUMMED = (CONFUSION, SCORE_HIST, NUM_CLASSES)


def metrics_from_sums(confusion: np.ndarray | None, hist: np.ndarray | None) -> dict[str, float]:
    """Pooled metrics (accuracy, balanced accuracy, sens/spec, AUC) from summed counts."""
    from shared.training.metrics import metrics_from_confusion, metrics_from_pooled

    if confusion is None:
        return {}
    classes = [str(i) for i in range(confusion.shape[0])]
    if hist is None:
        out = metrics_from_confusion(confusion, classes)
    else:
        out = metrics_from_pooled(confusion, hist, classes)
    out["num_examples"] = float(confusion.sum())
    return {k: float(v) for k, v in out.items()}


def round_metrics(site_metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"sites": per-site scalars, "weighted": example-weighted means, "pooled": exact pooled,
    "withheld": sites that sent no metrics (fewer test cases than their min-report-cases),
    "ci": bootstrap 95% intervals {"pooled": {metric: [lo, hi]}, "sites": {site: {...}}} from the same
    counts (``server/evalci.py``)}.

    Pooled AUC comes from summed score histograms only when every site that sent a confusion matrix
    also sent its histogram (a site withholds one whose bins would single out too few cases).
    """
    from server.evalci import bootstrap_cis

    sites: dict[str, dict[str, float]] = {}
    site_ci: dict[str, dict[str, list[float]]] = {}
    confusion = hist = None
    withheld = sorted(s for s, m in site_metrics.items() if NUM_EXAMPLES not in m)
    site_metrics = {s: m for s, m in site_metrics.items() if NUM_EXAMPLES in m}
    hist_complete = all(SCORE_HIST in m for m in site_metrics.values() if CONFUSION in m)
    for site, m in site_metrics.items():
        sites[site] = {k: float(v) for k, v in m.items() if k not in SUMMED}
        k = int(m.get(NUM_CLASSES, 0))
        if CONFUSION in m and k:
            c = np.asarray(m[CONFUSION], dtype=np.int64).reshape(k, k)
            confusion = c if confusion is None else confusion + c
            own = (np.asarray(m[SCORE_HIST], dtype=np.int64).reshape(k, 2, -1)
                   if SCORE_HIST in m else None)
            site_ci[site] = bootstrap_cis(c, own)
        if SCORE_HIST in m and k and hist_complete:
            h = np.asarray(m[SCORE_HIST], dtype=np.int64).reshape(k, 2, -1)
            hist = h if hist is None else hist + h
    weights = {s: m.get(NUM_EXAMPLES, 0.0) for s, m in sites.items()}
    total = sum(weights.values())
    weighted: dict[str, float] = {}
    if total > 0:
        keys = set.intersection(*(set(m) for m in sites.values())) - {NUM_EXAMPLES, SKIPPED}
        for key in sorted(keys):
            weighted[key] = float(sum(sites[s][key] * weights[s] for s in sites) / total)
    pooled = metrics_from_sums(confusion, hist)
    if pooled and "cross_entropy" in weighted:  # a per-case mean: its example-weighted mean is exact
        pooled["cross_entropy"] = weighted["cross_entropy"]
    if confusion is None and weighted:  # regression (qtm): per-case means pool exactly by weighting
        pooled = {**weighted, "num_examples": float(total)}
    ci = {"pooled": bootstrap_cis(confusion, hist) if confusion is not None else {},
          "sites": site_ci}
    return {"sites": sites, "weighted": weighted, "pooled": pooled, "withheld": withheld, "ci": ci}
