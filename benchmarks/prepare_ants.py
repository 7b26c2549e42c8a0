"""SimpleITK vs ANTsPy for `site prepare`'s template registration, on the cases that
``prepare_speed.py --ants-export DIR`` wrote (run this in a venv holding antspyx, never the project's:
antspyx pins older numpy/scipy).

    python3 -m venv /tmp/antsvenv && /tmp/antsvenv/bin/pip install antspyx
    /tmp/antsvenv/bin/python benchmarks/prepare_ants.py DIR [--types Affine,AffineFast]

Per case: the N4-corrected 2 mm T1ce (what gliofed registers) to the 2 mm MNI152 template by
``ants.registration`` (fixed: template); the template landmarks mapped into the scanner through the
result and compared with where they truly are (LPS mm); CPU seconds of the registration. SimpleITK's
figures (its two affine passes) come from the export. Only antspyx and numpy are imported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _bootstrap(x: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    a = np.asarray(x, float)
    means = np.random.default_rng(seed).choice(a, (n, a.size)).mean(1)
    return float(a.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--types", default="Affine", help="ants type_of_transform values, comma-separated")
    a = ap.parse_args()
    import ants
    import pandas as pd

    fixed = ants.image_read(str(a.export / "template.nii.gz"))
    cases = sorted(p.stem for p in a.export.glob("*.json"))
    out: dict[str, tuple[list[float], list[float]]] = {"SimpleITK (gliofed)": ([], [])}
    for cid in cases:
        info = json.loads((a.export / f"{cid}.json").read_text())
        out["SimpleITK (gliofed)"][0].append(info["sitk_landmark_mm"])
        out["SimpleITK (gliofed)"][1].append(info["sitk_cpu_s"])
        moving = ants.image_read(str(a.export / f"{cid}_t1ce.nii.gz"))
        pts = np.asarray(info["template_points_lps"])
        truth = np.asarray(info["true_points_lps"])
        line = [f"{cid} ({info['kind']}): SimpleITK {info['sitk_landmark_mm']:.2f} mm"]
        for kind in a.types.split(","):
            c0 = time.process_time()
            reg = ants.registration(fixed, moving, type_of_transform=kind, random_seed=0)
            cpu = time.process_time() - c0
            # ANTs maps points the opposite way to images: the forward transforms, which bring the
            # moving image onto the fixed grid, take a fixed (template) point to its moving
            # (scanner) point
            df = pd.DataFrame(pts, columns=["x", "y", "z"])
            est = ants.apply_transforms_to_points(3, df, reg["fwdtransforms"]).to_numpy()
            err = float(np.linalg.norm(est - truth, axis=1).mean())
            out.setdefault(f"ANTsPy {kind}", ([], []))
            out[f"ANTsPy {kind}"][0].append(err)
            out[f"ANTsPy {kind}"][1].append(cpu)
            line.append(f"ANTsPy {kind} {err:.2f} mm")
        print(", ".join(line), flush=True)
    for name, (err, cpu) in out.items():
        m, lo, hi = _bootstrap(err)
        print(f"TEMPLATE {name}: landmark error {m:.2f} mm (95% CI {lo:.2f}-{hi:.2f}), "
              f"{np.mean(cpu):.1f} s CPU/registration, n={len(err)}")


if __name__ == "__main__":
    main()
