"""Baselines on the same cases as the federation: centralised (pooled data) and local-only per site.

Every arm trains on exactly the cases the sites train on: a site's ``train`` split, minus the
validation patients the ClientApp carves out when the cohort names no ``val`` split
(``client.site.carve_validation``), and keeps the round its validation split scores best, as the
federation exports its best round. Compute is matched per FLamby's rule: each "round" of a baseline is
``local-epochs`` epochs over its training cases, so the centralised model sees the same epochs x
examples as the whole federation. All are scored on the pooled test set (the union of the sites' test
splits) with the federation's formula (binned-histogram AUC) and a bootstrap 95% CI with n.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.contract import numpy_weights, state_dict
from shared.learning import learning_core, train_config_for
from shared.round_average import RoundAverage


def site_samples(site_dirs: Sequence[Path], task: str, seed: int) -> dict[str, dict[str, list]]:
    """{site folder name: {"train", "val", "test": samples}} by the ClientApp's rules (same carve)."""
    from client.site import carve_validation
    from shared.cohort import read_cohort
    from shared.tasks import select_samples

    out: dict[str, dict[str, list]] = {}
    for folder in site_dirs:
        samples, _ = select_samples(task, read_cohort(folder, seed=seed))
        train = [s for s in samples if s.split == "train"]
        val = [s for s in samples if s.split == "val"]
        if not val:
            train, val = carve_validation(train, seed)
        out[Path(folder).name] = {"train": train, "val": val,
                                  "test": [s for s in samples if s.split == "test"]}
    return out


def _fresh_model(run: RunConfig, spec: Any, cfg: Any) -> Any:
    import torch

    torch.manual_seed(run.seed)  # same initial weights as the federation (server.rounds)
    model = learning_core().build_model(spec, cfg)
    if run.init_model:
        from shared.training.bundle import load_initial_weights

        load_initial_weights(model, run.init_model)
    return model


def scalars(ev: Any, spec: Any) -> dict[str, Any]:
    """The model's metrics computed like the federation's pooled ones (binned-histogram AUC), so FL and
    baselines are compared with one formula; the exact (sklearn) AUC is kept as ``auc_exact``; ``n``
    (cases) and ``ci`` (bootstrap 95% intervals from the same counts)."""
    from server.evalci import bootstrap_cis
    from shared.training.metrics import metrics_from_pooled

    out: dict[str, Any] = {k: float(v) for k, v in ev.metrics.items() if isinstance(v, (int, float))}
    out["n"] = int(ev.num_examples)
    if "auc" in out:
        out["auc_exact"] = out["auc"]
    if ev.confusion is None:  # regression (qtm): its own metrics are the comparison
        return out
    pooled = metrics_from_pooled(ev.confusion, ev.score_hist, list(spec.classes))
    out.update({k: float(v) for k, v in pooled.items()})
    out["ci"] = bootstrap_cis(ev.confusion, ev.score_hist)
    return out


def _score(ev: Any, spec: Any) -> float:
    value = scalars(ev, spec).get(spec.headline_metric, math.nan)
    return -math.inf if not math.isfinite(value) else value


def train_and_track(run: RunConfig, train: list, test: list, rounds: int, val: list | None = None,
                    track: bool = True) -> dict[str, Any]:
    """Train one model for ``rounds * local_epochs`` epochs; pooled-test metrics after each round.

    With a ``val`` set the round with the best validation score is kept (``final`` is that round's
    model, ``last`` the last round's), as the federation exports its best round; ``model`` is the kept
    model (for the cross-site matrix; not serialised). With ``global-ema`` what is scored and kept
    after each round is the moving average of the rounds' weights, the federation's rule.
    """
    from dataclasses import replace

    from shared.tasks import get_task

    spec = get_task(run.task)
    core = learning_core()
    cfg = train_config_for(run)
    model = _fresh_model(run, spec, cfg)
    smooth = RoundAverage(run.global_ema) if run.global_ema > 0 else None
    scored = copy.deepcopy(model) if smooth is not None else model
    curve: list[dict[str, Any]] = []
    best = (-math.inf, 0, None)
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        # a new shuffle and augmentation draw each round, as the sites get (seed + round), and the
        # sites' learning rate of that round (lr-schedule)
        core.train(model, train, spec, replace(cfg, seed=run.seed + rnd, lr=run.round_lr(rnd)),
                   epochs=run.local_epochs, progress=False)
        if smooth is not None:
            scored.load_state_dict(state_dict(smooth.update(numpy_weights(model.state_dict()))))
        if val:
            score = _score(core.evaluate(scored, val, spec, cfg), spec)
            if score > best[0]:
                best = (score, rnd, copy.deepcopy(scored.state_dict()))
        if track or rnd == rounds:
            curve.append({"round": rnd, **scalars(core.evaluate(scored, test, spec, cfg), spec)})
    last = curve[-1] if curve else {}
    final, kept = last, rounds
    if best[2] is not None and best[1] != rounds:
        scored.load_state_dict(best[2])
        final, kept = {"round": best[1], **scalars(core.evaluate(scored, test, spec, cfg), spec)}, best[1]
    return {"curve": curve, "final": final, "last": last, "kept_round": kept,
            "num_train": len(train), "num_val": len(val or []),
            "seconds": time.perf_counter() - t0, "model": scored}


def run_baselines(run: RunConfig, site_dirs: Sequence[Path], progress: Any = None,
                  per_site: dict[str, dict[str, list]] | None = None) -> dict[str, Any]:
    """Centralised and local-only results, all on the pooled test set (models under ``model``)."""
    per_site = per_site or site_samples(site_dirs, run.task, run.seed)
    pooled = {split: [s for v in per_site.values() for s in v[split]] for split in ("train", "val", "test")}
    if not pooled["test"]:
        raise ValueError("the partition has no test cases: cannot evaluate baselines")
    rounds = run.num_server_rounds
    out: dict[str, Any] = {"test_cases": len(pooled["test"])}
    out["centralised"] = train_and_track(run, pooled["train"], pooled["test"], rounds, pooled["val"])
    if progress is not None:
        progress("centralised", out["centralised"]["final"])
    out["local"] = {}
    for name, split in per_site.items():
        if not split["train"]:
            continue
        out["local"][name] = train_and_track(run, split["train"], pooled["test"], rounds,
                                             split["val"], track=False)
        if progress is not None:
            progress(f"local-only {name}", out["local"][name]["final"])
    return out


def without_models(baselines: dict[str, Any]) -> dict[str, Any]:
    """``baselines`` minus the in-memory models (what summary.json keeps)."""
    out = {k: v for k, v in baselines.items() if k not in ("centralised", "local")}
    if "centralised" in baselines:
        out["centralised"] = {k: v for k, v in baselines["centralised"].items() if k != "model"}
    out["local"] = {n: {k: v for k, v in r.items() if k != "model"}
                    for n, r in baselines.get("local", {}).items()}
    return out
