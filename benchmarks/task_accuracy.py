"""Mask-free accuracy of each task, with bootstrap 95% CIs, on test data built differently from training.

Per task: a training cohort (`generate_cohort`, `--cases` sessions of that task, seed `--seed`) is split
train/val/test; the model is trained centrally (`fit`) on the whole-brain inputs. It is then scored on
(a) the training cohort's own test split and (b) an independent cohort drawn with another seed (so other
scanner profiles, anatomy deformations and lesions) and lesion sizes scaled by `--test-lesion-scale`
(sizes the training cohort lacked). Every `seg` cell is dropped before scoring: prediction never sees a
mask. Reported per set: n, the headline metric with a percentile-bootstrap 95% CI, accuracy, and every
class's recall.

CPU (small):  python benchmarks/task_accuracy.py --tasks typing --cases 280 --test-cases 70 --shape 48 --size 32 --epochs 30
GPU:          python benchmarks/task_accuracy.py --cases 700 --test-cases 210 --shape 96 --size 96 --epochs 60 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from simulations.cohort_mix import RECURRENCE_RATIO

TARGETS = {"grading": ("auc", 0.95), "typing": ("accuracy", 0.90),
           "rano": ("balanced_accuracy", 0.60), "recurrence": ("auc", 0.85)}
MIN_RECALL = {"typing": 0.80}


def without_seg(samples):
    """The samples with their (and their baselines') seg cell removed: scoring never sees a mask."""
    def drop(case):
        if case is None:
            return None
        return replace(case, images={k: v for k, v in case.images.items() if k != "seg"})

    return [replace(s, case=drop(s.case), baseline=drop(s.baseline)) for s in samples]


def score(model, samples, spec, cfg, task: str, n_boot: int) -> dict:
    from shared.training import evaluate_model
    from shared.training.metrics import bootstrap_ci, per_class_recall

    ev = evaluate_model(model, without_seg(samples), spec, cfg)
    key, target = TARGETS[task]
    lo, hi = bootstrap_ci(ev.labels, ev.probs, spec.classes, key, n_boot=n_boot)
    recall = per_class_recall(ev.labels, ev.probs, spec.classes)
    ok = ev.metrics[key] >= target and all(
        r >= MIN_RECALL.get(task, 0.0) for r in recall.values() if not np.isnan(r))
    return {"n": len(samples), "metric": key, "value": round(ev.metrics[key], 3),
            "ci95": [round(lo, 3), round(hi, 3)], "target": target, "met": bool(ok),
            "accuracy": round(ev.metrics["accuracy"], 3),
            "balanced_accuracy": round(ev.metrics["balanced_accuracy"], 3),
            "auc": round(ev.metrics.get("auc", float("nan")), 3),
            "recall": {k: round(v, 3) for k, v in recall.items()},
            "confusion": ev.confusion.tolist()}


def _deadline(hhmm: str) -> float | None:
    """Today's (or, if past, tomorrow's) UTC ``HH:MM`` as a ``time.time()`` value."""
    if not hhmm:
        return None
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    h, m = (int(v) for v in hhmm.split(":"))
    t = now.replace(hour=h, minute=m, second=0, microsecond=0)
    return (t if t > now else t + timedelta(days=1)).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="grading,typing,rano,recurrence")
    ap.add_argument("--cases", type=int, default=200, help="sessions in each training cohort")
    ap.add_argument("--test-cases", type=int, default=70, help="sessions in each independent cohort")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--shape", type=int, default=48, help="synthetic volume size (N^3 grid)")
    ap.add_argument("--size", type=int, default=32, help="network input size (whole brain resized)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default="constant", help="constant | cosine")
    ap.add_argument("--ema-decay", type=float, default=0.0,
                    help="> 0: validate and keep an exponential moving average of the weights")
    ap.add_argument("--calibrate", action="store_true",
                    help="fold the validation split's class-balanced calibration into the model")
    ap.add_argument("--network", default="", help="override every task's network")
    ap.add_argument("--seg-weight", type=float, default=0.5, help="unet_encoder auxiliary seg loss")
    ap.add_argument("--balance", default="weighted_loss", help="weighted_loss | sampler | none | logit_adjust")
    ap.add_argument("--augment-level", default="basic", help="basic or mr (shared/mr_augment.py)")
    ap.add_argument("--flip-axes", default="0", help="augmentation flips, RAS axes: 0 (left-right) or 0,1,2")
    ap.add_argument("--subtraction", default=None, action=argparse.BooleanOptionalAction,
                    help="rano: follow-up minus baseline channels (default: the task's, on for rano)")
    ap.add_argument("--deadline", default="", help="UTC HH:MM: start no epoch that would end after it")
    ap.add_argument("--patience", type=int, default=0, help="early stopping (0: max(5, epochs // 3))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-seed", type=int, default=1000)
    ap.add_argument("--test-lesion-scale", type=float, default=1.25)
    ap.add_argument("--recurrence-ratio", type=float, default=RECURRENCE_RATIO,
                    help="recurrence share of the training cohort's recurrence sessions (the "
                         f"independent cohort keeps the clinical {RECURRENCE_RATIO})")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="reuse cohorts and cache here")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from shared.cohort import read_cohort
    from shared.tasks import get_task, select_samples
    from shared.training import TrainConfig, fit
    from simulations.synth import generate_cohort

    work = a.workdir or Path(tempfile.mkdtemp(prefix="gliofed-acc-"))
    t0 = time.perf_counter()
    rows = []
    for task in a.tasks.split(","):
        spec = get_task(task)

        def cohort(name, cases, seed, scale, ratio=RECURRENCE_RATIO, task=task):
            d = work / (f"{task}-{name}-{cases}-{a.shape}-s{seed}-x{scale}"
                        + (f"-r{ratio}" if ratio != RECURRENCE_RATIO else ""))
            if not (d / "cohort.csv").is_file():
                generate_cohort(d, cases=cases, sites=a.sites, shape=a.shape, seed=seed,
                                progress=False, tasks=(task,), lesion_scale=scale,
                                recurrence_ratio=ratio)
            return read_cohort(d)

        train_c = cohort("train", a.cases, a.seed, 1.0, a.recurrence_ratio)
        other = cohort("other", a.test_cases, a.test_seed, a.test_lesion_scale)
        tr, _ = select_samples(spec, train_c, "train")
        va, _ = select_samples(spec, train_c, "val")
        te, _ = select_samples(spec, train_c, "test")
        ind, _ = select_samples(spec, other)
        cfg = TrainConfig(task=task, network=a.network or None, input_size=(a.size,) * 3,
                          epochs=a.epochs, patience=a.patience or max(5, a.epochs // 3), batch_size=a.batch_size,
                          lr=a.lr, lr_schedule=a.lr_schedule, seed=a.seed, device=a.device, cache_dir=str(work / "cache"),
                          seg_weight=a.seg_weight, balance=a.balance, subtraction=a.subtraction,
                          flip_axes=tuple(int(v) for v in a.flip_axes.split(",")),
                          augment_level=a.augment_level, ema_decay=a.ema_decay, calibrate=a.calibrate).resolved()
        t = time.perf_counter()
        model, hist = fit(spec, cfg, tr, va, progress=False, log=lambda m: print(m, flush=True),
                          deadline=_deadline(a.deadline))
        row = {"task": task, "network": cfg.network, "input_size": a.size,
               "train/val": f"{len(tr)}/{len(va)}", "epochs_run": len(hist),
               "train_seconds": round(time.perf_counter() - t, 1),
               "same_cohort_test": score(model, te, spec, cfg, task, a.boot),
               "independent": score(model, ind, spec, cfg, task, a.boot)}
        from shared.training.bundle import export_bundle

        model_dir = export_bundle(model, spec, cfg, work / "models" / (a.json.stem if a.json else task),
                                  {"mode": "benchmarks/task_accuracy.py", "args": vars(a)},
                                  row["independent"])
        row["model_dir"] = str(model_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "results": rows,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
