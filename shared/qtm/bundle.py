"""Saving and loading a QTMnet MODEL_DIR: the same bundle format as the classifiers'
(:func:`shared.training.bundle.base_metadata`: MONAI's fields + gliofed's task, network, provenance)."""

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
    from shared.tasks import get_task
    from shared.training.bundle import base_metadata

    model_dir = Path(model_dir)
    for sub in ("models", "configs", "docs"):
        (model_dir / sub).mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_dir / WEIGHTS)
    base = int(model.enc1[0].out_channels)
    n_t = len(TIME_AXIS_S)
    data_format = {
        "inputs": {"dce": {"type": "image", "format": "concentration (mM)", "modality": "MR",
                           "num_channels": 1, "spatial_shape": ["*", "*", "*", n_t], "dtype": "float32",
                           "value_range": [], "is_patch_data": True,
                           "channel_def": {"0": "4D DCE concentration on the time axis below; no AIF"}}},
        "outputs": {"maps": {"type": "image", "format": "parameter maps", "num_channels": len(OUTPUTS),
                             "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [],
                             "is_patch_data": True,
                             "channel_def": {str(i): o for i, o in enumerate(OUTPUTS)}}},
    }
    meta = base_metadata(
        "gliofed QTMnet",
        "Maps a 4D DCE concentration series to Fp, vp, ve, PS and |u| without an arterial input function.",
        [get_task("qtm").reference], data_format, provenance, metrics,
        task="qtm", network={"name": "qtmnet", "base_channels": base},
        inputs={"dce": "4D concentration (mM), resampled to the time axis below; no AIF"},
        time_axis_s=[float(t) for t in TIME_AXIS_S],
        outputs=list(OUTPUTS) + ["ktrans (derived: PS Fp / (PS + Fp))"],
    )
    (model_dir / METADATA).write_text(json.dumps(meta, indent=2, default=str))
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
    net = meta.get("network")
    base = net.get("base_channels", 16) if isinstance(net, dict) else meta.get("base_channels", 16)
    model = QTMNet(base=int(base))
    model.load_state_dict(torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta
