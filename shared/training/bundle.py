"""MODEL_DIR in the MONAI bundle convention: export a trained model and load it back without training state.

Layout: ``configs/metadata.json`` (task, classes, inputs, preprocessing, network, versions, provenance,
metrics), ``configs/inference.json``, ``models/model.pt`` (a plain state_dict), ``docs/README.md``.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from shared.tasks import TaskSpec, get_task

BUNDLE_FORMAT = "gliofed-bundle/1"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("gliofed", "torch", "monai", "flwr", "opacus", "nibabel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def export_bundle(model: nn.Module, spec: TaskSpec, cfg, out_dir: str | Path,
                  provenance: dict, metrics: dict | None = None, in_channels: int | None = None,
                  use_optional: bool = False) -> Path:
    """Write MODEL_DIR; ``cfg`` is the TrainConfig used (its fields are recorded)."""
    from dataclasses import asdict

    from shared.training.loop import _first_conv_in_channels

    cfg = cfg.resolved()
    out = Path(out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    core = getattr(model, "_module", model)
    state = {k.removeprefix("_module."): v.detach().cpu() for k, v in core.state_dict().items()}
    torch.save(state, out / "models" / "model.pt")
    ch = in_channels or _first_conv_in_channels(core)
    inputs = list(spec.inputs) + (list(spec.optional_inputs) if use_optional else [])
    meta = {
        "format": BUNDLE_FORMAT,
        "version": "0.1.0",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": spec.name,
        "classes": list(spec.classes),
        "label_column": spec.label_column,
        "inputs": inputs,
        "timepoints": spec.timepoints,
        "network": {"name": cfg.network, "in_channels": ch, "num_classes": spec.num_classes,
                    "dp_compatible": cfg.dp_compatible, "stem_stride": cfg.stem_stride,
                    "clinical": list(cfg.clinical)},
        "preprocessing": {"orientation": "RAS", "crop": "tumour box (x2) if seg else brain box",
                          "resample_to": list(cfg.input_size), "normalisation": "z-score in brain",
                          "subtraction": cfg.subtraction},
        "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "versions": _versions(),
        "provenance": provenance,
        "metrics": metrics or {},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": ch,
                                 "spatial_shape": list(cfg.input_size), "format": "magnitude"}},
            "outputs": {"pred": {"type": "probabilities", "channel_def": dict(enumerate(spec.classes))}},
        },
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    inference = {"imports": ["$import shared.training.bundle"],
                 "network_def": "$shared.training.bundle.load_bundle(@bundle_root)[0]",
                 "bundle_root": ".", "task": spec.name, "inputs": inputs}
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (out / "docs" / "README.md").write_text(
        f"# gliofed model: {spec.name}\n\nClasses: {', '.join(spec.classes)}. Inputs: "
        f"{', '.join(inputs)} ({spec.timepoints} timepoint(s)), RAS, z-scored in brain, resampled to "
        f"{'x'.join(map(str, cfg.input_size))}.\nNetwork: {cfg.network} ({ch} input channels).\n\n"
        f"Provenance: `{json.dumps(provenance)}`\n\nUse: `gliofed predict --model {out.name} "
        "--cohort SITE_DIR --out preds.csv`\n"
    )
    return out


def load_bundle(model_dir: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network from metadata and load ``models/model.pt``."""
    from shared.models import build_model

    d = Path(model_dir)
    meta_path = d / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (not a gliofed MODEL_DIR)")
    meta = json.loads(meta_path.read_text())
    spec = get_task(meta["task"])
    net = meta["network"]
    seg = 4 if net["name"] == "unet_encoder" else 0
    model = build_model(net["name"], net["in_channels"], spec.num_classes,
                        dp_compatible=net.get("dp_compatible", False),
                        stem_stride=net.get("stem_stride", 2), seg_classes=seg,
                        clinical=len(net.get("clinical", [])))
    state = torch.load(d / "models" / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, meta


def load_initial_weights(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """Start from a MODEL_DIR's ``models/model.pt`` (run config ``init-model``: fine-tuning).

    The keys and shapes must match the task's network exactly; a mismatch is an error that names them.
    """
    path = Path(model_dir) / "models" / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"init-model {model_dir}: no models/model.pt there")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        raise ValueError(f"init-model {model_dir}: weights do not fit this task's network "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}, other shape {shapes[:3]})")
    model.load_state_dict(state)
    return model
