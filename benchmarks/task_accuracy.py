"""Centralised accuracy of each task on a held-out test split of a synthetic cohort (one cohort of
`--cases` sessions per task), against targets,
plus the peak host RAM of the run (ru_maxrss).

CPU:  python benchmarks/task_accuracy.py --cases 200 --shape 48 --size 32 --epochs 30
GPU:  python benchmarks/task_accuracy.py --cases 400 --shape 96 --size 64 --epochs 60 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

TARGETS = {"grading": ("auc", 0.95), "typing": ("accuracy", 0.90),
           "rano": ("balanced_accuracy", 0.60), "recurrence": ("auc", 0.85)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--shape", type=int, default=48, help="synthetic volume size")
    ap.add_argument("--size", type=int, default=32, help="network input size")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--network", default="", help="override every task's network")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tasks", default="grading,typing,rano,recurrence")
    ap.add_argument("--cohort", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from shared.cohort import read_cohort
    from shared.tasks import get_task, select_samples
    from shared.training import TrainConfig, evaluate_model, fit
    from simulations.synth import generate_cohort

    tmp = Path(tempfile.mkdtemp(prefix="gliofed-acc-"))
    t0 = time.perf_counter()
    rows = []
    for task in a.tasks.split(","):
        spec = get_task(task)
        # One cohort per task (`--cases` sessions of that task) unless a cohort is given.
        site = a.cohort or generate_cohort(tmp / task, cases=a.cases, sites=a.sites, shape=a.shape,
                                           seed=a.seed, progress=False, tasks=(task,))
        cohort = read_cohort(site)
        tr, _ = select_samples(spec, cohort, "train")
        va, _ = select_samples(spec, cohort, "val")
        te, _ = select_samples(spec, cohort, "test")
        cfg = TrainConfig(task=task, network=a.network or None, input_size=(a.size,) * 3,
                          epochs=a.epochs, patience=max(5, a.epochs // 3), batch_size=8,
                          seed=a.seed, device=a.device, cache_dir=str(tmp / "cache"))
        t = time.perf_counter()
        model, hist = fit(spec, cfg, tr, va, progress=False, log=lambda m: None)
        ev = evaluate_model(model, te, spec, cfg)
        key, target = TARGETS[task]
        rows.append({"task": task, "network": cfg.resolved().network, "train/val/test":
                     f"{len(tr)}/{len(va)}/{len(te)}", "epochs_run": len(hist), "metric": key,
                     "value": round(ev.metrics[key], 3), "target": target,
                     "met": bool(ev.metrics[key] >= target),
                     "all": {k: round(v, 3) for k, v in ev.metrics.items()},
                     "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"cohort": {"cases": a.cases, "sites": a.sites, "shape": a.shape, "seed": a.seed},
           "input_size": a.size, "epochs": a.epochs, "results": rows,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
