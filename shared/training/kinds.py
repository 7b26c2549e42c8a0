"""Task kinds: the learning core's per-kind behaviour, so the training loop names no task.

``classification`` (grading, typing, rano, recurrence) is the loop's own path. Other kinds register an
adapter here (``TaskSpec.kind`` -> ``"module:attribute"``, imported on first use) that builds, trains,
evaluates, exports and loads their networks through the same federation interface.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Protocol

ADAPTERS: dict[str, str] = {
    "regression_maps": "shared.qtm.adapter:ADAPTER",
}


class KindAdapter(Protocol):
    """What a non-classification task kind supplies to the learning core."""

    def build(self, spec, cfg) -> Any: ...
    def train(self, model, samples, spec, cfg, *, epochs: int, proximal_mu: float,
              global_state, privatize) -> Any: ...
    def evaluate(self, model, samples, spec, cfg) -> Any: ...
    def export(self, model, spec, cfg, out, provenance: dict, metrics: dict | None) -> Any: ...
    def load(self, model_dir, meta: dict) -> Any: ...


def kind_adapter(spec) -> KindAdapter | None:
    """The adapter of ``spec.kind``; None for classification (the loop's own path)."""
    if spec.kind == "classification":
        return None
    try:
        module, attr = ADAPTERS[spec.kind].split(":")
    except KeyError:
        raise ValueError(f"task {spec.name!r}: no learning-core adapter for kind {spec.kind!r} "
                         f"(known: classification, {', '.join(ADAPTERS)})") from None
    return getattr(import_module(module), attr)
