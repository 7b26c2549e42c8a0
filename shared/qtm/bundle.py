"""Saving and loading a QTMnet MODEL_DIR (MONAI bundle layout, like the classifiers' bundles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.qtm.net import OUTPUTS, TIME_AXIS_S, QTMNet

WEIGHTS = Path("models") / "model.pt"
METADATA = Path("configs") / "metadata.json"


def save_qtmnet(model: torch.nn.Module, model_dir: Path, provenance: dict[str, Any],
                metrics: dict[str, float] | None = None) -> Path:
    model_dir = Path(model_dir)
    (model_dir / "models").mkdir(parents=True, exist_ok=True)
    (model_dir / "configs").mkdir(parents=True, exist_ok=True)
    (model_dir / "docs").mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_dir / WEIGHTS)
    meta = {
        "name": "gliofed QTMnet",
        "task": "qtm",
        "network": "qtmnet",
        "base_channels": int(model.enc1[0].out_channels),
        "inputs": {"dce": "4D concentration (mM), resampled to the time axis below; no AIF"},
        "time_axis_s": [float(t) for t in TIME_AXIS_S],
        "outputs": list(OUTPUTS) + ["ktrans (derived: PS Fp / (PS + Fp))"],
        "provenance": provenance,
        "metrics": metrics or {},
        "versions": {"torch": torch.__version__},
    }
    (model_dir / METADATA).write_text(json.dumps(meta, indent=2))
    (model_dir / "docs" / "README.md").write_text(
        "# QTMnet (gliofed)\n\nMaps a 4D DCE concentration series to Fp, vp, ve, PS and |u| without an "
        "arterial input function. Trained only on gliofed's transport simulator (see provenance in "
        "configs/metadata.json). Use: `gliofed qtm predict MODEL_DIR case_dce.nii.gz --out maps/`.\n")
    return model_dir


def load_qtmnet(model_dir: Path, device: str = "cpu") -> tuple[QTMNet, dict[str, Any]]:
    model_dir = Path(model_dir)
    meta_path = model_dir / METADATA
    if not meta_path.is_file() or not (model_dir / WEIGHTS).is_file():
        raise FileNotFoundError(f"{model_dir}: not a QTMnet model folder (needs {METADATA} and {WEIGHTS})")
    meta = json.loads(meta_path.read_text())
    if meta.get("task") != "qtm":
        raise ValueError(f"{model_dir}: model is for task {meta.get('task')!r}, not qtm")
    model = QTMNet(base=int(meta.get("base_channels", 16)))
    model.load_state_dict(torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta
