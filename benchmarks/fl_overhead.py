"""Federation overhead and bytes per round, measured from a real Ray simulation's rounds.jsonl.

    .venv/bin/python benchmarks/fl_overhead.py --sites 5 --rounds 3 --out runs/bench_overhead

Overhead per round = round wall time minus the slowest site's local compute (train seconds reported by
the site), as a share of the round. With K sites on C cores, Ray runs min(K, C) sites at once, so on a
2-core box the round also waits for sites queued behind others; the script prints both the raw overhead
and the overhead against the ideal schedule (sum of site compute / concurrent slots).
Bytes: train_sent must equal sampled x (model ArrayRecord bytes + ConfigRecord bytes) exactly.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_overhead"))
    ap.add_argument("--skip-run", action="store_true", help="only analyse an existing run folder")
    args = ap.parse_args()
    if not args.skip_run:
        from simulations.runner import SimulationSpec, simulate

        simulate(SimulationSpec(sites=args.sites, rounds=args.rounds, out=args.out, cases=args.cases,
                                size=args.size, partition="iid", local_epochs=1, baselines=False,
                                network="small_cnn"))
    from flwr.app import ConfigRecord

    rows = [json.loads(x) for x in (args.out / "rounds.jsonl").read_text().splitlines()]
    slots = min(args.sites, os.cpu_count() or 1)
    cfg_bytes = ConfigRecord({"server-round": 1}).count_bytes()  # what the strategy adds to each
    print("round  wall_s  slowest_site_s  overhead%  ideal_s  overhead_vs_ideal%  train_sent  "
          "expected  train_recv  model_bytes")
    for r in rows:
        site = r["site_train_seconds"]
        slowest = max(site.values())
        ideal = max(slowest, sum(site.values()) / slots)
        expected = r["sampled"] * (r["bytes"]["model"] + cfg_bytes)
        print(f"{r['round']:5d} {r['train_seconds']:7.2f} {slowest:15.2f} "
              f"{100 * (r['train_seconds'] - slowest) / r['train_seconds']:9.1f} {ideal:8.2f} "
              f"{100 * (r['train_seconds'] - ideal) / r['train_seconds']:18.1f} "
              f"{r['bytes']['train_sent']:11d} {expected:9d} {r['bytes']['train_received']:11d} "
              f"{r['bytes']['model']:12d}")


if __name__ == "__main__":
    main()
