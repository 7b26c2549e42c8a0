"""Site-heterogeneity options against plain FedAvg on one small non-IID federation.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/heterogeneity.py --seeds 0 \
        --out runs/bench_heterogeneity

Each option (SCAFFOLD, FedBN, the server optimisers at their swept defaults, local fine-tuning, Ditto)
trains the same 5-site dirichlet-0.5 grading federation as plain FedAvg (same synthetic cohort,
partition, seed and initial weights; in process, ``benchmarks/fl_inprocess.py``). Reported per option:
the final global model's pooled test AUC and accuracy with bootstrap 95% CIs (``server/evalci.py``,
from the summed confusion matrices and score histograms the sites sent) and n; for the personalised
options, the pooled score of the sites' personalised models on the same test cases. One JSON line per
run goes to ``OUT/results.jsonl`` (a rerun skips the runs already there); a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

OPTIONS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "scaffold": {"strategy": "scaffold"},
    "fedbn": {"strategy": "fedavg", "fedbn": True},
    "fedavgm": {"strategy": "fedavgm"},
    "fedadam": {"strategy": "fedadam"},
    "fedyogi": {"strategy": "fedyogi"},
    "finetune": {"strategy": "fedavg", "personalise": "finetune"},
    "ditto": {"strategy": "fedavg", "personalise": "ditto"},
}


def pooled_counts(grid: Any, rnd: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Summed confusion matrix and score histograms of round ``rnd``'s test-split evaluation."""
    conf = hist = None
    complete = True
    for msg, reply in grid.exchanges:
        if msg.metadata.message_type != "evaluate" or reply.has_error():
            continue
        cfg = msg.content["config"]
        if int(cfg.get("server-round", 0)) != rnd or cfg.get("eval-split", "test") != "test":
            continue
        m = reply.content["metrics"]
        if "confusion" not in m:
            continue
        k = int(m["num-classes"])
        c = np.asarray(m["confusion"], dtype=np.int64).reshape(k, k)
        conf = c if conf is None else conf + c
        if "score-hist" in m:
            h = np.asarray(m["score-hist"], dtype=np.int64).reshape(k, 2, -1)
            hist = h if hist is None else hist + h
        else:
            complete = False
    return conf, hist if complete else None


def run_option(args: argparse.Namespace, seed: int, name: str) -> dict[str, Any]:
    from fl_inprocess import ensure_cohort, run_inprocess

    from server.evalci import bootstrap_cis
    from server.pooled import metrics_from_sums
    from simulations.runner import SimulationSpec

    root = args.out / f"seed{seed}"
    spec = SimulationSpec(
        sites=args.sites, partition=args.partition, rounds=args.rounds,
        local_epochs=args.local_epochs, cases=args.cases, size=args.size, seed=seed,
        strategy=OPTIONS[name]["strategy"], out=root / name, baselines=False, network=args.network,
        extra={**{k: v for k, v in OPTIONS[name].items() if k != "strategy"},
               "cache-dir": str((root / "cache").resolve())})
    spec.cohort = ensure_cohort((args.cohort_root or args.out) / f"seed{seed}" / "cohort", spec)
    t0 = time.process_time()
    rounds, grid = run_inprocess(spec)
    last = rounds[-1]
    conf, hist = pooled_counts(grid, last["round"])
    pooled = metrics_from_sums(conf, hist)
    out = {"seed": seed, "option": name, "config": OPTIONS[name],
           "cpu_seconds": time.process_time() - t0, "rounds": len(rounds), "n": int(conf.sum()),
           "auc": pooled.get("auc"), "accuracy": pooled.get("accuracy"),
           "ci": bootstrap_cis(conf, hist, seed=seed),
           "auc_per_round": [r["pooled"].get("auc") for r in rounds],
           "best_round": (last.get("selection") or {}).get("best_round")}
    p = last.get("personalised")
    if p:
        out["personalised"] = {"auc": p["pooled"].get("auc"), "accuracy": p["pooled"].get("accuracy"),
                               "n": int(p["pooled"].get("num_examples", 0)), "ci": p["pooled_ci"],
                               "gain": p["gain"]}
    return out


def _fmt(value: Any, ci: list[float] | None) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def main() -> None:
    from fl_inprocess import federation_args

    ap = federation_args(argparse.ArgumentParser())
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--cohort-root", type=Path, default=None,
                    help="reuse OUT/seedN/cohort of another benchmark (e.g. the server-opt sweep)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_heterogeneity"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["seed"], r["option"]) for r in rows}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.options.split(","):
            if (seed, name) in done:
                continue
            row = run_option(args, seed, name)
            rows.append(row)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"{'option':10s} {'seed':>4s} {'n':>4s}  {'global AUC [95% CI]':24s} "
          f"{'global acc. [95% CI]':24s} personalised AUC [95% CI] (n)")
    for r in rows:
        p = r.get("personalised") or {}
        pers = f"{_fmt(p.get('auc'), p.get('ci', {}).get('auc'))} ({p.get('n')})" if p else ""
        print(f"{r['option']:10s} {r['seed']:4d} {r['n']:4d}  "
              f"{_fmt(r['auc'], r['ci'].get('auc')):24s} "
              f"{_fmt(r['accuracy'], r['ci'].get('accuracy')):24s} {pers}")


if __name__ == "__main__":
    main()
