"""Cross-site evaluation (NVFlare's matrix) and leave-one-site-out generalisation, for simulations.

- :func:`cross_site_matrix`: every site's local-only model and the exported global model scored on every
  site's test split (and on the pooled test set), each cell with n and a bootstrap 95% CI. The
  simulation harness holds every site's data, so this runs in-process after the federation.
- :func:`leave_one_site_out`: for each site, a federation of the other K-1 sites (Flower's simulation
  engine, the same run config), scored on the held-out site's test split; next to it the full
  federation's global model on the same cases. K extra federations: off by default (``--loso``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.learning import learning_core, train_config_for

GLOBAL = "global (exported)"
POOLED = "pooled"


def load_exported(run: RunConfig, model_dir: Path) -> Any:
    """The task model with the weights of a MODEL_DIR bundle (the federation's exported model)."""
    from shared.tasks import get_task
    from shared.training.bundle import load_initial_weights

    model = learning_core().build_model(get_task(run.task), train_config_for(run))
    load_initial_weights(model, str(model_dir))
    return model


def score(run: RunConfig, model: Any, samples: list) -> dict[str, Any]:
    """Metrics (federation formula), n and CIs of ``model`` on ``samples``; ``{"n": 0}`` when empty."""
    from shared.tasks import get_task
    from simulations.baselines import scalars

    if not samples:
        return {"n": 0}
    spec = get_task(run.task)
    return scalars(learning_core().evaluate(model, samples, spec, train_config_for(run)), spec)


def cross_site_matrix(run: RunConfig, per_site: dict[str, dict[str, list]],
                      models: dict[str, Any]) -> dict[str, Any]:
    """{"models": [...], "sites": [..., "pooled"], "cells": {model: {site: metrics}}}."""
    sites = sorted(per_site)
    tests = {s: per_site[s]["test"] for s in sites}
    tests[POOLED] = [x for s in sites for x in per_site[s]["test"]]
    cells = {name: {s: score(run, model, cases) for s, cases in tests.items()}
             for name, model in models.items()}
    return {"models": list(models), "sites": [*sites, POOLED], "cells": cells}


def _loso_sites(sites_root: Path, keep: list[str], dest: Path, seed: int) -> Path:
    """``dest/site-0..``: the ``keep`` sites' cohorts, images referenced where they are (not copied)."""
    from shared.cohort import read_cohort, write_cohort
    from simulations.partition import cohort_row

    if dest.exists():
        shutil.rmtree(dest)
    for i, name in enumerate(keep):
        cohort = read_cohort(sites_root / name, seed=seed)
        write_cohort(dest / f"site-{i}", [cohort_row(c) for c in cohort.cases],
                     outside_roots=[cohort.root, *cohort.roots])
    return dest


def leave_one_site_out(run: RunConfig, sites_root: Path, per_site: dict[str, dict[str, list]],
                       global_model: Any, federate: Callable[[RunConfig, int], None],
                       out: Path, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """{held-out site: {"loso": metrics of the K-1-site federation, "global": the full federation's}}.

    ``federate(run, num_sites)`` runs one federation (the harness passes its Flower runner). Sites
    without test cases are skipped (nothing to score on); each LOSO run writes under ``out/<site>``.
    """
    names = sorted(per_site)
    if len(names) < 3:
        raise ValueError("leave-one-site-out needs at least 3 sites (a federation of >= 2 per run)")
    result: dict[str, Any] = {}
    for held in names:
        test = per_site[held]["test"]
        if not test:
            echo(f"leave-one-site-out: {held} has no test cases, skipped")
            continue
        keep = [n for n in names if n != held]
        root = _loso_sites(sites_root, keep, out / held / "sites", run.seed)
        sub = run.replace(sites_root=str(root.resolve()), run_dir=str((out / held).resolve()),
                          min_available_nodes=len(keep), resume=False)
        echo(f"leave-one-site-out: federation of {len(keep)} sites without {held}")
        federate(sub, len(keep))
        model = load_exported(run, out / held / "model")
        result[held] = {"loso": score(run, model, test), "global": score(run, global_model, test),
                        "trained_on": keep}
        echo(f"  {held}: held out {_fmt(result[held]['loso'], run)}, in the federation "
             f"{_fmt(result[held]['global'], run)}")
    return result


def _fmt(m: dict[str, Any], run: RunConfig) -> str:
    from shared.tasks import get_task

    key = get_task(run.task).headline_metric
    v = m.get(key, math.nan)
    return f"{key} {v:.3f} (n={m.get('n', 0)})" if isinstance(v, float) and math.isfinite(v) else \
        f"{key} n/a (n={m.get('n', 0)})"
