"""Privacy-utility curve: federated grading AUC at several epsilons (opacus at each site) and without DP.

    .venv/bin/python benchmarks/dp_utility.py --epsilons 1,3,8 --sites 5 --partition dirichlet:0.5

Same synthetic cohort, partition, seed and initial weights for every run; ``target-epsilon`` is the
budget each site spends over all planned rounds (RDP, delta 1e-5); score = pooled test AUC of the final
global model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_dp_utility"))
    a = ap.parse_args()
    from server.runlog import read_rounds
    from simulations.runner import SimulationSpec, simulate

    base = SimulationSpec(sites=a.sites, partition=a.partition, rounds=a.rounds,
                          local_epochs=a.local_epochs, cases=a.cases, size=a.size,
                          out=a.out / "no-dp", baselines=False, network="small_cnn")
    results = {}
    for eps in ["none", *a.epsilons.split(",")]:
        extra = {} if eps == "none" else {"dp": "opacus", "target-epsilon": float(eps)}
        spec = base if eps == "none" else replace(base, out=a.out / f"eps-{eps}",
                                                  cohort=a.out / "no-dp" / "cohort", extra=extra)
        simulate(spec, echo=lambda *x: None)
        last = read_rounds(spec.out)[-1]
        results[eps] = {"auc": round(float(last["pooled"].get("auc", float("nan"))), 3),
                        "reported_epsilon": last["train"].get("dp-epsilon")}
        print(json.dumps({"epsilon": eps, **results[eps]}), flush=True)
    print(json.dumps({"sites": a.sites, "partition": a.partition, "rounds": a.rounds,
                      "local_epochs": a.local_epochs, "results": results}))


if __name__ == "__main__":
    main()
