"""Baselines on the same splits as the federation: centralised (pooled data) and local-only per site.

All are evaluated on the pooled test set (the union of the sites' test splits), the same cases the
federation's pooled metrics cover, with the same network, seed, initial weights and epoch budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.learning import learning_core, train_config_for


def site_samples(site_dirs: Sequence[Path], task: str, seed: int) -> dict[str, dict[str, list]]:
    """{site folder name: {"train": samples, "test": samples}} using the same rules as the ClientApp."""
    from shared.cohort import read_cohort
    from shared.tasks import select_samples

    out: dict[str, dict[str, list]] = {}
    for folder in site_dirs:
        samples, _ = select_samples(task, read_cohort(folder, seed=seed))
        out[Path(folder).name] = {
            "train": [s for s in samples if s.split in ("train", "val")],
            "test": [s for s in samples if s.split == "test"],
        }
    return out


def _fresh_model(run: RunConfig, spec: Any, cfg: Any) -> Any:
    import torch

    torch.manual_seed(run.seed)  # same initial weights as the federation (server.rounds)
    model = learning_core().build_model(spec, cfg)
    if run.init_model:
        from shared.training.bundle import load_initial_weights

        load_initial_weights(model, run.init_model)
    return model


def _scalars(ev: Any, spec: Any) -> dict[str, float]:
    """The model's metrics computed like the federation's pooled ones (binned-histogram AUC), so FL and
    baselines are compared with one formula; the exact (sklearn) AUC is kept as ``auc_exact``."""
    from shared.training.metrics import metrics_from_pooled

    out = {k: float(v) for k, v in ev.metrics.items() if isinstance(v, (int, float))}
    if "auc" in out:
        out["auc_exact"] = out["auc"]
    if ev.confusion is None:  # regression (qtm): its own metrics are the comparison
        return out
    pooled = metrics_from_pooled(ev.confusion, ev.score_hist, list(spec.classes))
    out.update({k: float(v) for k, v in pooled.items()})
    return out


def train_and_track(run: RunConfig, train: list, test: list, rounds: int,
                    track: bool = True) -> dict[str, Any]:
    """Train one model for ``rounds * local_epochs`` epochs; pooled-test metrics after each round."""
    from shared.tasks import get_task

    spec = get_task(run.task)
    core = learning_core()
    cfg = train_config_for(run)
    model = _fresh_model(run, spec, cfg)
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        core.train(model, train, spec, cfg, epochs=run.local_epochs, progress=False)
        if track or rnd == rounds:
            ev = core.evaluate(model, test, spec, cfg)
            curve.append({"round": rnd, **_scalars(ev, spec)})
    return {"curve": curve, "final": curve[-1] if curve else {}, "num_train": len(train),
            "seconds": time.perf_counter() - t0}


def run_baselines(run: RunConfig, site_dirs: Sequence[Path], progress: Any = None) -> dict[str, Any]:
    """Centralised and local-only results, all on the pooled test set."""
    per_site = site_samples(site_dirs, run.task, run.seed)
    pooled_train = [s for v in per_site.values() for s in v["train"]]
    pooled_test = [s for v in per_site.values() for s in v["test"]]
    if not pooled_test:
        raise ValueError("the partition has no test cases: cannot evaluate baselines")
    rounds = run.num_server_rounds
    out: dict[str, Any] = {"test_cases": len(pooled_test)}
    out["centralised"] = train_and_track(run, pooled_train, pooled_test, rounds)
    if progress is not None:
        progress("centralised", out["centralised"]["final"])
    out["local"] = {}
    for name, split in per_site.items():
        if not split["train"]:
            continue
        out["local"][name] = train_and_track(run, split["train"], pooled_test, rounds, track=False)
        if progress is not None:
            progress(f"local-only {name}", out["local"][name]["final"])
    return out
