"""Scale: round time and peak memory of a Ray simulation with 5 vs 50 sites on this machine.

    .venv/bin/python benchmarks/fl_scale.py --sites 5,50 --rounds 2 --out runs/bench_scale

Each site count runs in its own subprocess (fresh Ray); peak RSS is the largest sum of RSS over the
process tree (driver + raylet + Ray workers), sampled every 0.5 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parents[int(d)] = int(fields[1])
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in keep:
                keep.add(c)
                frontier.append(c)
    return sum(rss.get(p, 0) for p in keep)


def run_one(sites: int, rounds: int, out: Path, cohort: Path, size: int) -> dict:
    code = (
        "from pathlib import Path; from simulations.runner import SimulationSpec, simulate; "
        f"simulate(SimulationSpec(sites={sites}, rounds={rounds}, out=Path('{out}'), "
        f"cohort=Path('{cohort}'), size={size}, partition='iid', local_epochs=1, baselines=False, "
        "batch_size=4, network='small_cnn'))"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    done.set()
    th.join()
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()] if rc == 0 else []
    return {"sites": sites, "rc": rc, "wall_s": time.perf_counter() - t0, "peak_rss_gib": peak / 2**30,
            "round_s": [round(r["seconds"], 2) for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="5,50")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_scale"))
    args = ap.parse_args()
    cohort = args.out / "cohort"
    if not (cohort / "cohort.csv").is_file():
        from simulations.synth import generate_cohort

        generate_cohort(cohort, cases=args.cases, sites=4, shape=args.size, tasks=["grading"], seed=0)
    for k in (int(s) for s in args.sites.split(",")):
        res = run_one(k, args.rounds, args.out / f"sites-{k}", cohort.resolve(), args.size)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
