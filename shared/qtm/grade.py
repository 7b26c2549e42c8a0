"""The grading experiment: tumour-ROI features from QTMnet maps vs 2CXM maps, LGG vs HGG.

For every case: QTMnet maps (no AIF) and a 2CXM fit with the Parker population AIF (bolus arrival
estimated from the data, per-voxel delay fitted: usual clinical practice) inside the tumour ROI;
features are the ROI mean and 90th percentile of each map; a standardised logistic regression is
scored under repeated stratified patient-level cross-validation (out-of-fold probabilities averaged
over repeats); AUCs come with percentile-bootstrap 95% confidence intervals, and the difference of the
two AUCs with a paired bootstrap interval. Parameter errors against ground truth are reported for
both methods on the same ROI voxels when the cases carry ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

QTM_FEATURE_MAPS = ("fp", "vp", "ve", "ps", "ktrans", "umag")
CXM_FEATURE_MAPS = ("fp", "vp", "ve", "ps", "ktrans")


@dataclass
class CaseMaps:
    case_id: str
    patient_id: str
    grade: str
    roi: np.ndarray
    qtm: dict[str, np.ndarray]
    cxm: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] = field(default_factory=dict)


def fit_2cxm_roi(conc: np.ndarray, times_s: np.ndarray, roi: np.ndarray, device: str = "auto",
                 hct: float = 0.42) -> dict[str, np.ndarray]:
    """2CXM maps inside ``roi`` with the Parker population AIF (arrival estimated, delay fitted)."""
    from shared.dce.io import DceSeries
    from shared.dce.maps import fit_series

    series = DceSeries(data=conc, affine=np.eye(4), times_s=times_s, hct=hct)
    maps, _ = fit_series(series, model="2cxm", mask=roi, device=device)
    return maps


def case_maps(case, model, device: str = "cpu") -> CaseMaps:
    """QTMnet maps and the 2CXM fit in the tumour ROI for one cohort row (``dce``, ``seg``, ``grade``).

    Ground truth comes from the DCE sidecar when it names maps (simulated cases), else it is empty.
    """
    import nibabel as nib

    from shared.dce.io import read_dce
    from shared.qtm.net import predict_volume, resample_curves
    from shared.qtm.train import read_ground_truth

    series = read_dce(case.images["dce"])
    roi = np.asarray(nib.load(str(case.images["seg"])).dataobj) > 0
    conc = series.concentration()
    try:
        truth = read_ground_truth(case.images["dce"])
    except ValueError:
        truth = {}
    qtm = predict_volume(model, resample_curves(conc, series.times_s), device)
    cxm = fit_2cxm_roi(conc, series.times_s, roi, device=device, hct=series.hct)
    return CaseMaps(case.case_id, case.patient_id, case.labels["grade"], roi, qtm, cxm, truth)


def roi_features(maps: dict[str, np.ndarray], roi: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    feats = {}
    for n in names:
        v = maps[n][roi].astype(np.float64)
        v = v[np.isfinite(v)]
        feats[f"{n}_mean"] = float(v.mean()) if v.size else 0.0
        feats[f"{n}_p90"] = float(np.percentile(v, 90)) if v.size else 0.0
    return feats


def feature_matrix(cases: Sequence[CaseMaps], method: str) -> tuple[np.ndarray, list[str]]:
    names = QTM_FEATURE_MAPS if method == "qtm" else CXM_FEATURE_MAPS
    rows = [roi_features(c.qtm if method == "qtm" else c.cxm, c.roi, names) for c in cases]
    keys = list(rows[0])
    x = np.array([[r[k] for k in keys] for r in rows])
    # log of the positive, skewed quantities keeps the logistic model well conditioned
    return np.log10(np.maximum(x, 1e-6)), keys


def cv_probabilities(x: np.ndarray, y: np.ndarray, groups: Sequence[str], folds: int = 5,
                     repeats: int = 20, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(HGG), averaged over repeats of stratified group (patient-level) k-fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        raise ValueError("grading needs at least 2 cases of each grade")
    total = np.zeros(len(y))
    for r in range(repeats):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for train, test in cv.split(x, y, groups):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            clf.fit(x[train], y[train])
            total[test] += clf.predict_proba(x[test])[:, 1]
    return total / repeats


def bootstrap_auc(y: np.ndarray, scores: Sequence[np.ndarray], n_boot: int = 2000,
                  seed: int = 0) -> np.ndarray:
    """[n_boot, len(scores)] AUCs on case resamples (resamples with one class only are redrawn)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_boot:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        out.append([roc_auc_score(y[idx], s[idx]) for s in scores])
    return np.array(out)


@dataclass
class GradingResult:
    n_lgg: int
    n_hgg: int
    auc: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    diff: float  # AUC(qtm) - AUC(2cxm)
    diff_ci95: tuple[float, float]
    probs: dict[str, np.ndarray]
    labels: np.ndarray
    errors: dict[str, dict[str, float]]  # method -> map -> median relative error (%) in the ROI

    def table(self) -> str:
        rows = ["| method | AUC | 95% CI (bootstrap) | published (Romano 2026) |", "|---|---|---|---|"]
        pub = {"qtm": "0.973", "2cxm": "0.911"}
        for m, label in (("qtm", "QTMnet (no AIF)"), ("2cxm", "2CXM (population AIF)")):
            lo, hi = self.ci95[m]
            rows.append(f"| {label} | {self.auc[m]:.3f} | {lo:.3f}-{hi:.3f} | {pub[m]} |")
        lo, hi = self.diff_ci95
        rows.append(f"| difference QTMnet - 2CXM | {self.diff:+.3f} | {lo:+.3f} to {hi:+.3f} | - |")
        if self.errors:
            names = sorted({k for e in self.errors.values() for k in e})
            rows += ["", "| median relative error in tumour ROI (%) | " + " | ".join(names) + " |",
                     "|---|" + "---|" * len(names)]
            for m in ("qtm", "2cxm"):
                e = self.errors.get(m, {})
                rows.append(f"| {m} | " + " | ".join(f"{e[n]:.1f}" if n in e else "-" for n in names) + " |")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"n_lgg": self.n_lgg, "n_hgg": self.n_hgg, "auc": self.auc,
                "ci95": {k: list(v) for k, v in self.ci95.items()}, "auc_difference": self.diff,
                "auc_difference_ci95": list(self.diff_ci95), "roi_median_relative_error_pct": self.errors}


def run_grading(cases: Sequence[CaseMaps], repeats: int = 20, n_boot: int = 2000,
                seed: int = 0) -> GradingResult:
    from sklearn.metrics import roc_auc_score

    from shared.qtm.train import map_errors

    y = np.array([1 if c.grade == "HGG" else 0 for c in cases])
    groups = [c.patient_id for c in cases]
    probs = {}
    for method in ("qtm", "2cxm"):
        x, _ = feature_matrix(cases, method)
        probs[method] = cv_probabilities(x, y, groups, repeats=repeats, seed=seed)
    auc = {m: float(roc_auc_score(y, p)) for m, p in probs.items()}
    boots = bootstrap_auc(y, [probs["qtm"], probs["2cxm"]], n_boot, seed)
    ci = {m: (float(np.percentile(boots[:, i], 2.5)), float(np.percentile(boots[:, i], 97.5)))
          for i, m in enumerate(("qtm", "2cxm"))}
    d = boots[:, 0] - boots[:, 1]
    errors: dict[str, dict[str, float]] = {}
    with_truth = [c for c in cases if c.truth]
    for method in ("qtm", "2cxm"):
        per_case = [map_errors(c.qtm if method == "qtm" else c.cxm, c.truth, c.roi) for c in with_truth]
        names = {k for e in per_case for k in e}
        errors[method] = {n: float(np.median([e[n] for e in per_case if n in e])) for n in sorted(names)}
    return GradingResult(int((y == 0).sum()), int((y == 1).sum()), auc, ci,
                         auc["qtm"] - auc["2cxm"],
                         (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))),
                         probs, y, errors if with_truth else {})


def plot_grading_roc(result: GradingResult, path, title: str = "LGG vs HGG"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for m, label, colour in (("qtm", "QTMnet (no AIF)", "tab:red"), ("2cxm", "2CXM, population AIF", "tab:blue")):
        fpr, tpr, _ = roc_curve(result.labels, result.probs[m])
        lo, hi = result.ci95[m]
        ax.plot(fpr, tpr, color=colour, lw=2, label=f"{label}: AUC {result.auc[m]:.3f} [{lo:.2f}-{hi:.2f}]")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{title} ({result.n_lgg} LGG, {result.n_hgg} HGG)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
