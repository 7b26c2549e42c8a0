"""Export the final global model as a MODEL_DIR bundle with the federation's provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from shared.config import RunConfig, learning_core, train_config_for


def _epsilon(run: RunConfig, rounds_done: int, last_train: dict[str, Any]) -> float | None:
    """Spent epsilon: site-level (central DP, accounted here) or the sites' reported mean (opacus)."""
    if run.dp == "central":
        from server.privacy import central_epsilon

        return central_epsilon(run, rounds_done)
    if run.dp == "opacus":
        value = last_train.get("dp-epsilon")
        return float(value) if value is not None else None
    return None


def federation_provenance(run: RunConfig, sites: list[str], rounds_done: int,
                          last_train: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a model card needs to know about how the model was trained."""
    return {
        "kind": "federated",
        "task": run.task,
        "strategy": run.strategy,
        "rounds": rounds_done,
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
            "epsilon": _epsilon(run, rounds_done, last_train or {}),
        },
        "seed": run.seed,
    }


def export_global_model(
    arrays: ArrayRecord, run: RunConfig, out_dir: str | Path, provenance: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the global model to ``out_dir`` with the learning core's bundle format."""
    from shared.tasks import get_task

    spec = get_task(run.task)
    cfg = train_config_for(run, device="cpu")
    model = learning_core().build_model(spec, cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    out = Path(out_dir)
    try:
        from shared.training.bundle import export_bundle
    except ImportError:  # learning core without bundles (tests' toy core): weights + metadata
        import torch

        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "weights.pt")
        (out / "metadata.json").write_text(
            json.dumps({"provenance": provenance, "metrics": metrics}, indent=2, default=str)
        )
        return out
    export_bundle(model, spec, cfg, out, provenance, metrics)
    return out
