"""Parity: federated strategies vs centralised vs local-only on a 5-site non-IID synthetic cohort.

    .venv/bin/python benchmarks/fl_parity.py --sites 5 --partition dirichlet:0.5 --rounds 5 \
        --strategies fedavg,fedprox,fedadam,fedyogi,fedavgm,fedmedian,fedtrimmedavg,krum,multikrum,bulyan

Every strategy trains on the same cohort, partition, seed and initial weights; the baselines run once
(with the first strategy). Scores are the pooled test set's binned-histogram AUC (same formula for all).
Prints one JSON line per strategy and a final table with the ratio to centralised.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--strategies", default="fedavg,fedprox")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_parity"))
    args = ap.parse_args()
    from simulations.runner import SimulationSpec, simulate

    cohort = args.out / "cohort"
    results = {}
    baselines = None
    for i, name in enumerate(args.strategies.split(",")):
        spec = SimulationSpec(sites=args.sites, partition=args.partition, rounds=args.rounds,
                              local_epochs=args.local_epochs, cases=args.cases, size=args.size,
                              strategy=name, out=args.out / name, baselines=i == 0,
                              cohort=cohort if cohort.is_dir() else None)
        simulate(spec, echo=lambda *a: None)
        if i == 0 and not cohort.is_dir():
            cohort = args.out / name / "cohort"
        summary = json.loads((args.out / name / "summary.json").read_text())
        baselines = baselines or summary["baselines"]
        results[name] = [r["pooled"].get("auc") for r in summary["rounds"]]
        print(json.dumps({"strategy": name, "pooled_auc_per_round": results[name]}), flush=True)
    central = baselines["centralised"]["final"]["auc"]
    local = {k: v["final"]["auc"] for k, v in baselines["local"].items()}
    print(f"centralised AUC {central:.3f}; local-only " +
          ", ".join(f"{k} {v:.3f}" for k, v in local.items()))
    for name, curve in results.items():
        final = curve[-1]
        print(f"{name:14s} final AUC {final:.3f}  best {max(curve):.3f}  "
              f"ratio to centralised {final / central:.3f}")


if __name__ == "__main__":
    main()
