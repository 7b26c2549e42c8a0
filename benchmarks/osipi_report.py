"""OSIPI DCE-MRI reference cases: pass count per file for shared.dce (and failing cases in detail).

The reference CSVs stay outside the project: --osipi-dir, else $GLIOFED_OSIPI_DIR, else
../shared/reference/osipi-dce next to the project root.

    .venv/bin/python benchmarks/osipi_report.py [--osipi-dir DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from shared.dce.osipi import TOLERANCES, check_all


def default_dir() -> Path:
    env = os.environ.get("GLIOFED_OSIPI_DIR")
    return (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / "shared" / "reference" / "osipi-dce"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--osipi-dir", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    folder = args.osipi_dir or default_dir()
    if not folder.is_dir():
        print(f"{folder}: OSIPI reference folder not found (use --osipi-dir or GLIOFED_OSIPI_DIR)")
        return 2
    start = time.perf_counter()
    reports = check_all(folder)
    seconds = time.perf_counter() - start
    if args.markdown:
        print("| file | setting | pass |")
        print("|---|---|---|")
        for r in reports:
            print(f"| {r.file} | {r.setting} | {r.n_pass}/{len(r.cases)} |")
    else:
        for r in reports:
            print(f"{r.file:34s} {r.setting:22s} {r.n_pass:3d}/{len(r.cases):<3d}")
    for r in reports:
        for case in r.failures:
            detail = ", ".join(
                f"{k} {fit:.4g} vs {ref:.4g} (tol {TOLERANCES[k][0]}+{TOLERANCES[k][1]}*ref)"
                if k in TOLERANCES
                else f"{k} {fit:.3g}"
                for k, (fit, ref) in case.values.items()
            )
            print(f"FAIL {r.file} [{r.setting}] {case.label}: {detail}")
    print(f"all checks in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
