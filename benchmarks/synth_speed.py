"""Benchmark: wall time of `generate_cohort` for a 200-case, 4-site cohort on the 2 mm MNI grid.

Target (issue 3): under 60 s on 2 cores. Run: ``.venv/bin/python benchmarks/synth_speed.py``
(``--cases``, ``--spacing``/``--shape``, ``--workers``, ``--out`` to keep the folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--shape", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from simulations.synth import generate_cohort
    from simulations.synth.anatomy import load_template

    out = args.out or Path(tempfile.mkdtemp(prefix="synth_bench_"))
    t0 = time.perf_counter()
    load_template()
    t_tpl = time.perf_counter() - t0
    t1 = time.perf_counter()
    generate_cohort(out, cases=args.cases, sites=args.sites, spacing=None if args.shape else args.spacing,
                    shape=args.shape, workers=args.workers, progress=False, seed=0)
    t_gen = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    grid = f"shape {args.shape}^3" if args.shape else f"spacing {args.spacing} mm"
    print(f"cases={args.cases} sites={args.sites} {grid} workers={args.workers or os.cpu_count()}")
    print(f"template load {t_tpl:.1f} s; generation {t_gen:.1f} s; total {t_tpl + t_gen:.1f} s; "
          f"{t_gen / args.cases * 1000:.0f} ms/session; {size / 2**20:.0f} MiB written")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
