"""Parity: federated strategies vs a compute-matched centralised model vs local-only, over seeds.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fl_parity.py --sites 5 --partition dirichlet:0.5 \
        --rounds 5 --seeds 0,1,2 --strategies fedavg,fedprox --out runs/bench_parity
    # feature skew only (sites differ by scanner), and a real federation's site sizes:
    ... --partition scanner
    ... --partition sizes:PATH/partitioning_1.csv --cases 300
    # a larger pooled test set (280 more generated cases, test split only; training cases unchanged):
    ... --task typing --held-out-test 280

Per seed: one synthetic cohort and partition; every strategy trains on it from the same initial
weights; the baselines (centralised with the federation's epochs x examples, FLamby's rule; local-only
per site) train once per seed on the same training cases the sites use. Scores: pooled test set,
binned-histogram AUC (one formula for all), the federation's exported (best-validation) round.
Prints one JSON line per run and a table: mean federated/centralised ratio per strategy, mean
best-vs-final gap, and the small sites' local-only vs global AUC on the pooled test set.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from simulations.cohort_mix import RECURRENCE_RATIO


def _auc(m: dict[str, Any]) -> float:
    v = m.get("auc")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def one_run(args: argparse.Namespace, seed: int, strategy: str, baselines: bool, cohort: Path | None,
            extra: dict[str, str]) -> dict[str, Any]:
    from server.report import chosen_round
    from simulations.runner import SimulationSpec, simulate

    label = strategy + "".join(f"+{k}={v}" for k, v in extra.items())
    out = args.out / f"seed{seed}" / label  # fedavg and fedavg+fedbn=true never share a folder
    spec = SimulationSpec(task=args.task, sites=args.sites, partition=args.partition, rounds=args.rounds,
                          local_epochs=args.local_epochs, cases=args.cases, size=args.size,
                          network=args.network, lr=args.lr, strategy=strategy, out=out, seed=seed,
                          held_out_test=args.held_out_test if cohort is None else 0,
                          recurrence_ratio=args.recurrence_ratio,
                          baselines=baselines, cross_site=False, progress=False, cohort=cohort,
                          extra=extra, engine=args.engine)
    simulate(spec, echo=lambda *a: None)
    summary = json.loads((out / "summary.json").read_text())
    curve = [_auc(r["pooled"]) for r in summary["rounds"]]
    chosen = chosen_round(summary)
    row = {"seed": seed, "strategy": label,
           "auc_per_round": curve, "exported_round": chosen,
           "exported_auc": curve[chosen - 1] if chosen else math.nan, "final_auc": curve[-1],
           "exported_ci": ((summary["rounds"][chosen - 1].get("ci") or {}).get("pooled") or {}).get("auc"),
           "test_cases": int(summary["rounds"][-1]["pooled"].get("num_examples", 0))}
    base = summary.get("baselines") or {}
    if base.get("centralised"):
        row["centralised_auc"] = _auc(base["centralised"]["final"])
        row["local_auc"] = {n: _auc(r["final"]) for n, r in base["local"].items()}
        row["local_train"] = {n: r["num_train"] for n, r in base["local"].items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="grading")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--held-out-test", type=int, default=0,
                    help="more generated sessions in the test split only (a larger pooled test set)")
    ap.add_argument("--recurrence-ratio", type=float, default=RECURRENCE_RATIO,
                    help="recurrence share of a generated recurrence cohort (0.5: balanced)")
    ap.add_argument("--network", default="small_cnn")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strategies", default="fedavg,fedprox",
                    help="comma list; NAME+key=value adds run-config keys, e.g. fedavg+fedbn=true")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_parity"))
    ap.add_argument("--engine", default="ray", help="ray (Flower's simulation engine) or inprocess "
                    "(the same round loop and ClientApp, sites one after the other, no Ray)")
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        central: dict[str, Any] = {}
        cohort = None
        for i, item in enumerate(args.strategies.split(",")):
            name, *opts = item.split("+")
            extra = dict(o.split("=", 1) for o in opts)
            row = one_run(args, seed, name, i == 0, cohort, extra)
            if i == 0:
                central = {k: row[k] for k in ("centralised_auc", "local_auc", "local_train") if k in row}
                gen = args.out / f"seed{seed}" / item
                cohort = next((c for c in sorted(gen.glob("cohort*")) if (c / "cohort.csv").is_file()),
                              None)
            row.update(central)
            rows.append(row)
            print(json.dumps(row), flush=True)
    sites = len(rows[0].get("local_auc") or {}) or args.sites  # sizes:/site partitions set their own
    print(f"\n{args.task}, {sites} sites, {args.partition}, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs, seeds {args.seeds}, pooled test n={rows[0]['test_cases']}")
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        ratios = [r["exported_auc"] / r["centralised_auc"] for r in mine if r.get("centralised_auc")]
        gaps = [r["exported_auc"] - r["final_auc"] for r in mine]
        local_mean = [statistics.fmean(r["local_auc"].values()) for r in mine if r.get("local_auc")]
        print(f"{strategy:28s} exported AUC {statistics.fmean(r['exported_auc'] for r in mine):.3f}  "
              f"centralised {statistics.fmean(r['centralised_auc'] for r in mine):.3f}  "
              f"ratio {statistics.fmean(ratios):.3f} (per seed {', '.join(f'{x:.3f}' for x in ratios)})  "
              f"mean local-only {statistics.fmean(local_mean):.3f}  "
              f"best-final gap {', '.join(f'{g:+.3f}' for g in gaps)}")
    small = [(r["seed"], n, r["local_train"][n], r["local_auc"][n], r["exported_auc"])
             for r in rows if r.get("local_train") for n in r["local_train"]
             if r["local_train"][n] <= 10]
    for seed, name, n, local, fed in small:
        print(f"small site seed {seed} {name} ({n} training cases): local-only AUC {local:.3f}, "
              f"global {fed:.3f}")


if __name__ == "__main__":
    main()
