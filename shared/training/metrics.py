"""Classification metrics, exact pooled metrics from summed confusions/histograms, and their plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

BINS = 300
TAIL = 3.0  # log-odds are divided by this before the sigmoid: the bins stretch into the tails


def score_bins(probs: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Bin index of each probability: uniform in ``sigmoid(logit(p) / TAIL)``, a monotone map.

    AUC needs only the order of the scores, and a confident model puts most of them within 1e-3 of 0
    or 1, where bins uniform in p merge them all (measured: exact AUC 0.72, binned 0.50 when every
    probability was above 0.99). Here p = 0.999 and 0.99999 fall 7 bins apart, and near p = 0.5 a bin
    is 0.01 wide, as with 100 bins uniform in p.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    u = 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / TAIL))
    return np.clip((u * bins).astype(np.int64), 0, bins - 1)


def score_histograms(probs: np.ndarray, labels: np.ndarray, k: int, bins: int = BINS) -> np.ndarray:
    """Per class c: histogram of p_c's bin (:func:`score_bins`) for positives ([c, 0]) and negatives
    ([c, 1])."""
    out = np.zeros((k, 2, bins), dtype=np.int64)
    idx = score_bins(probs, bins)
    for c in range(k):
        pos = labels == c
        out[c, 0] = np.bincount(idx[pos, c], minlength=bins)
        out[c, 1] = np.bincount(idx[~pos, c], minlength=bins)
    return out


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of binned scores (ties count 1/2): exact for the binned values, NaN if a class is empty."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def metrics_from_confusion(conf: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy and (binary: positive = classes[1]; else macro) sens/spec/PPV/NPV."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    out: dict[str, float] = {"accuracy": float(np.trace(conf) / total) if total else float("nan")}
    k = len(classes)
    sens, spec, ppv, npv = [], [], [], []
    for c in range(k):
        tp = conf[c, c]
        fn = conf[c].sum() - tp
        fp = conf[:, c].sum() - tp
        tn = total - tp - fn - fp
        sens.append(tp / (tp + fn) if tp + fn else np.nan)
        spec.append(tn / (tn + fp) if tn + fp else np.nan)
        ppv.append(tp / (tp + fp) if tp + fp else np.nan)
        npv.append(tn / (tn + fn) if tn + fn else np.nan)
    out["balanced_accuracy"] = float(np.nanmean(sens)) if not np.all(np.isnan(sens)) else float("nan")
    if k == 2:
        out.update(sensitivity=float(sens[1]), specificity=float(spec[1]),
                   ppv=float(ppv[1]), npv=float(npv[1]))
    else:
        for name, vals in (("sensitivity", sens), ("specificity", spec), ("ppv", ppv), ("npv", npv)):
            out[name] = float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else float("nan")
    return out


def confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def metrics_from_pooled(conf: np.ndarray, hist: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Metrics from (summed) confusion matrix and score histograms; AUC per class and macro."""
    out = metrics_from_confusion(conf, classes)
    aucs = [auc_from_histograms(hist[c, 0], hist[c, 1]) for c in range(len(classes))]
    if len(classes) == 2:
        out["auc"] = aucs[1]
    else:
        for c, a in zip(classes, aucs, strict=True):
            out[f"auc_{c}"] = a
        out["auc"] = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
    return out


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """All metrics for predictions ``probs`` (N x K) against integer ``labels``; exact AUCs (sklearn)."""
    from sklearn.metrics import roc_auc_score

    k = len(classes)
    conf = confusion(labels, probs.argmax(1), k)
    out: dict = metrics_from_confusion(conf, classes)
    aucs = []
    for c in range(k):
        y = labels == c
        aucs.append(float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else float("nan"))
    if k == 2:
        out["auc"] = aucs[1]
    else:
        for c, a in zip(classes, aucs, strict=True):
            out[f"auc_{c}"] = a
        valid = [a for a in aucs if not np.isnan(a)]
        out["auc"] = float(np.mean(valid)) if valid else float("nan")
    out["confusion"] = conf.tolist()
    return out


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], metric: str,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric`` (a key of :func:`classification_metrics`), resampling
    cases with replacement; resamples where the metric is undefined (a class absent) are skipped."""
    rng = np.random.default_rng(seed)
    n, k = len(labels), len(classes)
    preds = probs.argmax(1)
    needs_scores = metric.startswith("auc")  # the others follow from the confusion matrix alone
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            m = (classification_metrics(labels[idx], probs[idx], classes) if needs_scores
                 else metrics_from_confusion(confusion(labels[idx], preds[idx], k), classes))
            v = m.get(metric, np.nan)
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def per_class_recall(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Recall (sensitivity) of each class; NaN for a class with no cases."""
    conf = confusion(labels, probs.argmax(1), len(classes))
    rows = conf.sum(1)
    return {c: float(conf[i, i] / rows[i]) if rows[i] else float("nan") for i, c in enumerate(classes)}


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path,
             title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    targets = [1] if len(classes) == 2 else range(len(classes))
    for c in targets:
        y = labels == c
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, c])
            ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {roc_auc_score(y, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title or "ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(conf: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(conf)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(classes), 1.0 + 0.8 * len(classes)))
    ax.imshow(conf, cmap="Blues")
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(j, i, int(conf[i, j]), ha="center", va="center",
                    color="white" if conf[i, j] > conf.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
