"""The task model as the server holds it: seeded initial weights, evaluation on the server's cohort,
and the export of the final global model as a MODEL_DIR bundle with the federation's provenance.

The round loop (start of a run), update validation (reference keys and shapes) and the export all build
the model here, so they always agree on what a well-formed set of weights looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from server.privacy import central_epsilon, noisy_rounds
from shared.config import RunConfig
from shared.contract import is_number, state_dict
from shared.learning import learning_core, train_config_for


def initial_arrays(run: RunConfig) -> ArrayRecord:
    """Weights of a freshly built task model (seeded: every run starts from the same point)."""
    import torch

    from shared.tasks import get_task

    torch.manual_seed(run.seed)
    model = learning_core().build_model(get_task(run.task), train_config_for(run, device="cpu"))
    if run.init_model:
        from shared.training.bundle import load_initial_weights

        load_initial_weights(model, run.init_model)
    return ArrayRecord(state_dict(model))


def central_evaluator(run: RunConfig) -> Callable[[ArrayRecord], dict[str, float]] | None:
    """Evaluation of the global model on the server's own test cohort (``server-cohort``), if any."""
    if not run.server_cohort:
        return None
    from shared.cohort import read_cohort
    from shared.tasks import get_task, select_samples

    spec = get_task(run.task)
    samples, _ = select_samples(spec, read_cohort(run.server_cohort, seed=run.seed), split="test")
    if not samples:
        raise ValueError(f"{run.server_cohort}: server-cohort has no eligible test cases for {run.task}")
    core = learning_core()
    cfg = train_config_for(run)

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        model = core.build_model(spec, cfg)
        model.load_state_dict(arrays.to_torch_state_dict())
        ev = core.evaluate(model, samples, spec, cfg)
        out = {k: float(v) for k, v in ev.metrics.items() if is_number(v)}
        out["num_examples"] = float(ev.num_examples)
        return out

    return evaluate


def _epsilon(run: RunConfig, rows: Sequence[dict[str, Any]]) -> float | None:
    """Spent epsilon: site-level (central DP, accounted here) or the sites' reported mean (opacus)."""
    if run.dp == "central":
        return central_epsilon(run, noisy_rounds(rows))
    if run.dp == "opacus":
        value = (rows[-1].get("train") or {}).get("dp-epsilon") if rows else None
        return float(value) if value is not None else None
    return None


def federation_provenance(run: RunConfig, sites: list[str],
                          rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a model card needs to know about how the model was trained (``rows``: the run log)."""
    return {
        "kind": "federated",
        "task": run.task,
        "strategy": run.strategy,
        "rounds": len(rows),
        "local_epochs": run.local_epochs,
        "sites": sites,
        "num_sites": len(sites),
        "privacy": {
            "dp": run.dp,
            "noise_multiplier": run.noise_multiplier if run.dp != "none" else None,
            "target_epsilon": run.target_epsilon if run.dp != "none" else None,
            "target_delta": run.target_delta if run.dp != "none" else None,
            "max_grad_norm": run.max_grad_norm if run.dp != "none" else None,
            "secagg": run.secagg,
            "epsilon": _epsilon(run, rows),
        },
        "seed": run.seed,
        "global_ema": run.global_ema,
        **({"global_ema_note": f"the exported weights are a moving average of the global models over "
                               f"rounds (decay {run.global_ema:g} per round)"} if run.global_ema > 0 else {}),
        "fedbn": run.fedbn,
        **({"fedbn_note": "normalisation layers stayed at the sites (FedBN): this model carries the "
                          "initial ones; a site uses its own"} if run.fedbn else {}),
    }


def selection_provenance(run: RunConfig, result: Any) -> dict[str, Any]:
    """Which round's global model is exported and why (``result``: ``server.rounds.FederationResult``).

    ``export = "best"`` takes the round whose new global model scored best on the sites' pooled
    validation splits; without any validation score (no site holds a validation split) the final
    round is exported and the reason says so.
    """
    sel = result.selection
    final = result.rounds[-1]["round"] if result.rounds else 0
    out: dict[str, Any] = {
        "requested": run.export, "final_round": final, "rounds_run": len(result.rounds),
        "stopped_early": result.stopped_early, "early_stop_patience": run.early_stop_patience,
        "metric": sel.metric if sel else None, "split": "val (pooled over the sites)",
        "best_round": sel.best_round if sel else None, "best_value": sel.best_value if sel else None,
    }
    if run.export == "best" and sel is not None and sel.best_round is not None:
        better = "highest" if sel.higher_is_better else "lowest"
        reason = (f"{better} pooled validation {sel.metric} ({sel.best_value:.4g}) of the new global "
                  f"model, rounds 1-{final}")
        if sel.peak_round is not None and sel.peak_round != sel.best_round:
            reason = (f"the last round within select-tolerance {sel.tolerance:g} of the {better} pooled "
                      f"validation {sel.metric} ({sel.peak_value:.4g}, round {sel.peak_round}): "
                      f"{sel.best_value:.4g}, rounds 1-{final}")
        return {**out, "exported": "best", "round": sel.best_round, "value": sel.best_value,
                "peak_round": sel.peak_round, "peak_value": sel.peak_value, "reason": reason}
    why = ("export = final" if run.export == "final"
           else "export = best, but no round had a validation score (no site holds a val split)")
    value = (result.rounds[-1].get("selection") or {}).get("value") if result.rounds else None
    return {**out, "exported": "final", "round": final, "value": value, "reason": why}


def export_global_model(arrays: ArrayRecord, run: RunConfig, out_dir: str | Path,
                        provenance: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write the global model to ``out_dir`` in the learning core's bundle format."""
    from shared.tasks import get_task
    from shared.training.bundle import export_bundle

    spec = get_task(run.task)
    cfg = train_config_for(run, device="cpu")
    model = learning_core().build_model(spec, cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    return export_bundle(model, spec, cfg, Path(out_dir), provenance, metrics)
