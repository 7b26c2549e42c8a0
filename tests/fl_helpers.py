"""Helpers for the federation tests: a tiny learnable cohort and an in-process Grid.

``LocalGrid`` delivers messages straight to ``client.app.app`` (the real ClientApp, real handlers) in
this process, so round-loop tests run in seconds without Ray; it records every reply for inspection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from simulations.inprocess import InProcessGrid

SHAPE = (16, 16, 16)


def write_tiny_cohort(root: Path, n_cases: int = 24, seed: int = 0, site: str = "A",
                      splits: bool = True) -> Path:
    """A site folder with ``n_cases`` 16^3 4-sequence cases; HGG cases carry a bright enhancing blob."""
    import nibabel as nib

    from shared.cohort import write_cohort

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    zz, yy, xx = np.mgrid[:16, :16, :16]
    for i in range(n_cases):
        grade = "HGG" if i % 2 == 0 else "LGG"
        row: dict[str, Any] = {"case_id": f"{site}-case{i:03d}", "patient_id": f"{site}-pat{i:03d}",
                               "grade": grade, "site": site}
        if splits:
            row["split"] = "test" if i % 4 in (0, 1) and i < n_cases // 2 else "train"
        c = rng.integers(5, 11, size=3)
        blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 9
        for seq in ("t1", "t1ce", "t2", "flair"):
            img = rng.normal(1.0, 0.2, SHAPE).astype(np.float32)
            if seq == "t1ce" and grade == "HGG":
                img[blob] += 3.0
            elif seq == "flair":
                img[blob] += 1.0
            name = f"{row['case_id']}_{seq}.nii.gz"
            nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / name))
            row[seq] = name
        rows.append(row)
    write_cohort(root, rows)
    return root


def fail_in_training(grid: Any, folder: Path) -> None:
    """Make ``folder``'s site pass the eligibility query, then fail when it trains: its t1ce images
    are corrupted once the query has been answered."""
    inner = grid.send_and_receive

    def send_and_receive(messages, *, timeout: float | None = None):
        messages = list(messages)
        out = inner(messages, timeout=timeout)
        if any(m.metadata.message_type == "query" for m in messages):
            for f in Path(folder).glob("*_t1ce.nii.gz"):
                f.write_bytes(b"not a nifti file")
        return out

    grid.send_and_receive = send_and_receive


class LocalGrid(InProcessGrid):
    """``simulations.inprocess.InProcessGrid`` over the real ``client.app.app``; ``offline`` nodes
    never answer. The tiny test cohorts have 2-4 test cases a site, so every node reports its metrics
    (``min-report-cases = 1``) unless its node config says otherwise."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], run_config: dict[str, Any]) -> None:
        from client.app import app

        super().__init__({n: {"min-report-cases": 1, **c} for n, c in node_configs.items()}, app,
                         run_config)


def run_config(run_dir: Path, sites_root: Path | None = None, **over: Any) -> dict[str, Any]:
    """A small, deterministic run config for the tests (flat kebab-case, as Flower passes it)."""
    cfg: dict[str, Any] = {
        "task": "grading", "num-server-rounds": 2, "local-epochs": 1, "strategy": "fedavg",
        "network": "small_cnn", "input-size": 16, "batch-size": 4, "lr": 0.003,
        "run-dir": str(run_dir), "cache-dir": str(run_dir / "cache"), "device": "cpu",
        "min-available-nodes": 2, "quorum-timeout": 2.0,
    }
    if sites_root is not None:
        cfg["sites-root"] = str(sites_root)
    cfg.update(over)
    return cfg
