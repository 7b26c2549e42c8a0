"""The benchmarks' in-process federation: ``simulations.inprocess`` (the real round loop and ClientApp
with the sites answering in this process, no Ray start-up per run) plus the benchmark federation's
options (:func:`federation_args`) and a cohort shared by several runs (:func:`ensure_cohort`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulations.inprocess import InProcessGrid
from simulations.runner import run_inprocess

__all__ = ["InProcessGrid", "ensure_cohort", "federation_args", "run_inprocess"]


def federation_args(ap: Any) -> Any:
    """The benchmark federation's options on ``ap`` (an argparse parser): 5 sites, Dirichlet 0.5 label
    skew, the demo's training (resnet10, 5 rounds of 1 local epoch) on 300 synthetic cases at 32^3."""
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--network", default="resnet10")
    return ap


def ensure_cohort(cohort: Path, spec: Any) -> Path:
    """``cohort``, generated first (as ``gliofed simulate`` would for ``spec``) when it holds none, so
    that several runs share one cohort."""
    if not (cohort / "cohort.csv").is_file():
        from simulations.synth import generate_cohort

        generate_cohort(cohort, cases=spec.cases, sites=max(spec.sites, 2), shape=spec.size,
                        tasks=[spec.task], seed=spec.seed)
    return cohort
