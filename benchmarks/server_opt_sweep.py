"""Server-optimiser sweep: FedAvgM / FedAdam / FedYogi server learning rate (and FedAvgM momentum).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/server_opt_sweep.py --seeds 0,1 \
        --out runs/bench_server_opt

Every grid point trains the same 5-site dirichlet-0.5 grading federation (one synthetic cohort and
partition per seed, shared by all grid points of that seed; run in process by
``benchmarks/fl_inprocess.py``: the real round loop and ClientApp, no Ray) with plain FedAvg as the
reference. A
grid point is scored by the pooled *validation* AUC of the global model it exports (the best-validation
round, ``export = best``; the sites' validation splits, never the test split), averaged over the seeds;
the pooled test AUC of that round is printed beside it. The
best point of each strategy is the default in ``shared.config.SERVER_LR_DEFAULTS`` /
``RunConfig.server_momentum``. Results are appended to ``OUT/results.jsonl`` (a rerun skips the grid
points already there) and the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean
from typing import Any

GRID: dict[str, list[dict[str, float]]] = {
    "fedavg": [{}],
    "fedadam": [{"server-lr": lr} for lr in (0.01, 0.003, 0.03)],
    "fedyogi": [{"server-lr": lr} for lr in (0.01, 0.003, 0.03)],
    "fedavgm": [{"server-lr": lr, "server-momentum": m} for lr, m in
                ((1.0, 0.9), (1.0, 0.5), (0.5, 0.9))],
}


def grid_points(strategies: list[str]) -> list[tuple[str, dict[str, float]]]:
    """The grid, breadth first (every strategy's first point, then every second one, ...), so that a
    sweep cut short still covers every strategy."""
    depth = max(len(GRID[s]) for s in strategies)
    return [(s, GRID[s][i]) for i in range(depth) for s in strategies if i < len(GRID[s])]


def parse_points(text: str) -> list[tuple[str, dict[str, float]]]:
    """'fedavg;fedavgm:server-lr=0.5,server-momentum=0.9' -> [(strategy, params), ...]."""
    out = []
    for item in filter(None, text.split(";")):
        strategy, _, kvs = item.partition(":")
        out.append((strategy, {k: float(v) for k, v in (kv.split("=", 1) for kv in kvs.split(",") if kv)}))
    return out


def point_name(strategy: str, params: dict[str, float]) -> str:
    return strategy + "".join(f"_{k.split('-')[-1]}{v:g}" for k, v in sorted(params.items()))


def final_scores(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The exported (best-validation) round's pooled validation and test AUC (and n), the final
    round's too, and the validation AUC per round."""
    vals = [((r.get("val") or {}).get("pooled") or {}).get("auc") for r in rounds]
    best_round = (rounds[-1].get("selection") or {}).get("best_round") or len(rounds)
    best = int(best_round) - 1
    chosen, last = rounds[best], rounds[-1]
    return {"val_auc": vals[best], "val_n": ((chosen.get("val") or {}).get("pooled") or {})
            .get("num_examples"), "exported_round": best + 1,
            "test_auc": chosen.get("pooled", {}).get("auc"),
            "test_n": chosen.get("pooled", {}).get("num_examples"),
            "final_val_auc": vals[-1], "final_test_auc": last.get("pooled", {}).get("auc"),
            "val_auc_per_round": vals}


def run_point(args: argparse.Namespace, seed: int, strategy: str, params: dict[str, float]
              ) -> dict[str, Any]:
    from fl_inprocess import ensure_cohort, run_inprocess

    from simulations.runner import SimulationSpec

    out = args.out / f"seed{seed}" / point_name(strategy, params)
    spec = SimulationSpec(sites=args.sites, partition=args.partition, rounds=args.rounds,
                          local_epochs=args.local_epochs, cases=args.cases, size=args.size,
                          strategy=strategy, seed=seed, out=out, baselines=False, network=args.network,
                          extra={**args.extra, **params,
                                 "cache-dir": str((args.out / f"seed{seed}" / "cache").resolve())})
    spec.cohort = ensure_cohort(args.out / f"seed{seed}" / "cohort", spec)
    t0 = time.process_time()
    rounds, _ = run_inprocess(spec)
    return {"seed": seed, "strategy": strategy, "params": params, "extra": args.extra,
            "rounds": args.rounds,
            "cpu_seconds": time.process_time() - t0, **final_scores(rounds)}


def table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean scores per grid point; the best point of each strategy by mean validation AUC."""
    points: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        points.setdefault((r["strategy"], json.dumps(r["params"], sort_keys=True)), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    print(f"{'strategy':10s} {'params':42s} {'seeds':>5s} {'val AUC':>8s} {'test AUC':>8s}")
    for (strategy, params), group in sorted(points.items()):
        val = mean(r["val_auc"] for r in group if r["val_auc"] is not None)
        test = mean(r["test_auc"] for r in group if r["test_auc"] is not None)
        print(f"{strategy:10s} {params:42s} {len(group):5d} {val:8.3f} {test:8.3f}")
        if strategy not in best or val > best[strategy]["val_auc"]:
            best[strategy] = {"params": json.loads(params), "val_auc": val, "test_auc": test,
                              "seeds": len(group)}
    for strategy, b in best.items():
        print(f"best {strategy}: {b['params']} (mean val AUC {b['val_auc']:.3f}, "
              f"test AUC {b['test_auc']:.3f}, {b['seeds']} seeds)")
    return best


def main() -> None:
    from fl_inprocess import federation_args

    ap = federation_args(argparse.ArgumentParser())
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--strategies", default=",".join(GRID))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_server_opt"))
    ap.add_argument("--points", default="", help="instead of the grid: ';'-separated "
                    "STRATEGY[:key=value,...] points, e.g. 'fedavg;fedavgm:server-lr=0.5,server-momentum=0.9'")
    ap.add_argument("--extra", default="", help="run-config keys for every point, e.g. lr=0.002")
    args = ap.parse_args()
    args.extra = dict(kv.split("=", 1) for kv in args.extra.split(",") if kv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["seed"], r["strategy"], json.dumps(r["params"], sort_keys=True)) for r in rows}
    for seed in (int(s) for s in args.seeds.split(",")):
        points = (parse_points(args.points) if args.points
                  else grid_points(args.strategies.split(",")))
        for strategy, params in points:
            if (seed, strategy, json.dumps(params, sort_keys=True)) in done:
                continue
            row = run_point(args, seed, strategy, params)
            rows.append(row)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    table(rows)


if __name__ == "__main__":
    main()
