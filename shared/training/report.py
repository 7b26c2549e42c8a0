"""Write an evaluation's metrics.json, ROC and confusion-matrix PNGs into a folder."""

from __future__ import annotations

import json
from pathlib import Path

from shared.tasks import TaskSpec
from shared.training.loop import EvalResult
from shared.training.metrics import plot_confusion, plot_roc


def write_eval_outputs(ev: EvalResult, spec: TaskSpec, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(
        {"task": spec.name, "n": ev.num_examples, "metrics": ev.metrics,
         "confusion": ev.confusion.tolist(), "classes": list(spec.classes)}, indent=2))
    plot_roc(ev.labels, ev.probs, spec.classes, out / "roc.png", title=f"{spec.name}: ROC (n={ev.num_examples})")
    plot_confusion(ev.confusion, spec.classes, out / "confusion.png", title=f"{spec.name}: confusion")
    return out
