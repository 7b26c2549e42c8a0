"""Does class-balanced logit calibration on the validation split fix a trained model's per-class recalls?

Takes a trained MODEL_DIR and the cohort it was trained on: the temperature and per-class offsets
(`shared/training/calibrate.py`) are fitted on that cohort's *validation* split only, then the model is
scored before and after on the cohort's own test split and on every independent cohort given (other
seeds, lesion sizes; never used for fitting). Accuracy with a bootstrap 95% CI, balanced accuracy and
every class's recall; seg cells are dropped before scoring.

python benchmarks/calibration.py --model runs/bench_typing64/models/typing_r10ema2240_64 \
    --cohort runs/bench_typing64/typing-train-2240-64-s0-x1.0 --other runs/bench_typing64/typing-other-140-64-s1000-x1.25
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_accuracy import TARGETS, without_seg


def summary(labels, probs, classes, key: str, n_boot: int) -> dict:
    from shared.training.metrics import bootstrap_ci, classification_metrics, per_class_recall

    m = classification_metrics(labels, probs, classes)
    lo, hi = bootstrap_ci(labels, probs, classes, key, n_boot=n_boot)
    return {"n": len(labels), key: round(m[key], 3), "ci95": [round(lo, 3), round(hi, 3)],
            "balanced_accuracy": round(m["balanced_accuracy"], 3),
            "recall": {c: round(v, 3) for c, v in per_class_recall(labels, probs, classes).items()},
            "confusion": np.asarray(m["confusion"]).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cohort", type=Path, required=True, help="the cohort the model was trained on")
    ap.add_argument("--other", type=Path, nargs="*", default=[], help="independent cohorts")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from shared.cohort import read_cohort
    from shared.tasks import get_task, select_samples
    from shared.training import evaluate_model
    from shared.training.bundle import load_bundle, train_config_from_meta
    from shared.training.calibrate import apply_logit_calibration, fit_logit_calibration

    model, meta = load_bundle(a.model)
    spec = get_task(meta["task"])
    cfg = train_config_from_meta(meta, device="cpu").resolved()
    key = TARGETS.get(spec.name, ("accuracy", 0))[0]
    train_c = read_cohort(a.cohort)
    sets = {"validation (fitted on)": select_samples(spec, train_c, "val")[0],
            "own test split": select_samples(spec, train_c, "test")[0]}
    for d in a.other:
        sets[f"independent {d.name}"] = select_samples(spec, read_cohort(d))[0]
    evals = {name: evaluate_model(model, without_seg(s), spec, cfg) for name, s in sets.items()}
    val = evals["validation (fitted on)"]
    t, b = fit_logit_calibration(val.probs, val.labels)
    out = {"model": str(a.model), "temperature": round(t, 4),
           "bias": {c: round(float(v), 4) for c, v in zip(spec.classes, b, strict=True)}, "sets": {}}
    print(f"fitted on {len(val.labels)} validation cases: T = {t:.3f}, b = {out['bias']}")
    for name, ev in evals.items():
        row = {"before": summary(ev.labels, ev.probs, spec.classes, key, a.boot),
               "after": summary(ev.labels, apply_logit_calibration(ev.probs, t, b), spec.classes, key,
                                a.boot)}
        out["sets"][name] = row
        for when in ("before", "after"):
            r = row[when]
            rec = ", ".join(f"{c} {v:.2f}" for c, v in r["recall"].items())
            print(f"{name:40s} {when:6s} n={r['n']} {key} {r[key]:.3f} [{r['ci95'][0]:.3f}-"
                  f"{r['ci95'][1]:.3f}] balanced {r['balanced_accuracy']:.3f} | {rec}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
