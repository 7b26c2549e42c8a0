"""Time `gliofed site check` on a generated 200-case site (5 NIfTI of 48^3 per case).

python benchmarks/site_check_speed.py [--cases 200] [--size 48]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_site(root: Path, cases: int, size: int) -> Path:
    import nibabel as nib

    from shared.cohort import write_cohort

    rng = np.random.default_rng(0)
    rows = []
    for i in range(cases):
        cid = f"case{i:04d}"
        row = {"case_id": cid, "patient_id": f"p{i:04d}", "grade": "HGG" if i % 3 else "LGG"}
        for s in ("t1", "t1ce", "t2", "flair", "seg"):
            data = (rng.integers(0, 3, (size,) * 3).astype(np.uint8) * (1 + (rng.random() > 0.5))
                    if s == "seg" else rng.random((size,) * 3, dtype=np.float32))
            if s == "seg":
                data[data == 3] = 4
            p = root / cid / f"{cid}_{s}.nii.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(p))
            row[s] = str(p.relative_to(root))
        rows.append(row)
    write_cohort(root, rows)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--size", type=int, default=48)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gliofed-site-bench-") as tmp:
        site = make_site(Path(tmp) / "site", a.cases, a.size)
        gliofed = Path(sys.executable).with_name("gliofed")
        t = time.perf_counter()
        r = subprocess.run([str(gliofed), "site", "check", str(site)], capture_output=True, text=True,
                           check=False)
        wall = time.perf_counter() - t
    print(r.stdout.strip().splitlines()[-1])
    print(f"site check: {a.cases} cases x 5 files of {a.size}^3 on {os.cpu_count()} cores: "
          f"{wall:.1f} s (exit {r.returncode})")


if __name__ == "__main__":
    main()
