"""MODEL_DIR is a MONAI bundle: export a trained model, load it back, rebuild its training config.

Layout: ``configs/metadata.json`` (MONAI's bundle fields plus gliofed's task, classes, inputs,
network, train config, provenance and metrics), ``configs/inference.json`` (MONAI transforms, the
network class shipped in ``scripts/`` and a cohort runner), ``models/model.pt`` (a plain state_dict),
``scripts/`` (self-contained code: torch + MONAI only) and ``docs/README.md``. MONAI runs it with
``python -m monai.bundle run --config_file MODEL_DIR/configs/inference.json --bundle_root MODEL_DIR
--dataset_dir SITE_DIR --output_dir OUT`` without gliofed installed.
"""

from __future__ import annotations

import json
import platform
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from shared.bundle_scripts.transforms import PREPROCESS_VERSION, preprocessing_config
from shared.models import seg_classes_for
from shared.tasks import TaskSpec, get_task

BUNDLE_FORMAT = "gliofed-bundle/2"
SCRIPTS = Path(__file__).resolve().parents[1] / "bundle_scripts"
MODELS_PY = Path(__file__).resolve().parents[1] / "models.py"
MODELS_GN_PY = MODELS_PY.with_name("models_gn.py")  # imported by models.py (the *_gnws networks)
MONAI_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                "meta_schema_20220324.json")


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("gliofed", "torch", "monai", "flwr", "opacus", "nibabel"):
        v = _version(pkg)
        if v:
            out[pkg] = v
    return out


def _copy_scripts(out: Path) -> None:
    dest = out / "scripts"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "transforms.py", "predict.py"):
        shutil.copyfile(SCRIPTS / name, dest / name)
    shutil.copyfile(MODELS_PY, dest / "models.py")
    shutil.copyfile(MODELS_GN_PY, dest / "models_gn.py")


def inference_config(spec: TaskSpec, cfg, inputs: list[str], ch: int) -> dict:
    """``configs/inference.json``: MONAI transforms + shipped network + cohort runner."""
    seg = seg_classes_for(cfg.network)
    return {
        "imports": ["$import torch", "$import scripts.models", "$import scripts.predict"],
        "bundle_root": ".",
        "dataset_dir": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "scripts.models.build_model", "name": cfg.network,
                        "in_channels": ch, "num_classes": spec.num_classes,
                        "dp_compatible": cfg.dp_compatible, "stem_stride": cfg.stem_stride,
                        "seg_classes": seg, "clinical": len(cfg.clinical)},
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing_config(inputs, cfg.input_size),
        "predictor": {"_target_": "scripts.predict.CohortPredictor", "network": "@network",
                      "preprocessing": "@preprocessing",
                      "checkpoint": "$@bundle_root + '/models/model.pt'", "inputs": inputs,
                      "classes": list(spec.classes), "timepoints": spec.timepoints,
                      "subtraction": cfg.subtraction, "clinical": list(cfg.clinical),
                      "device": "@device"},
        "run": ["$@predictor.run(@dataset_dir, @output_dir)"],
    }


def base_metadata(name: str, description: str, references: list[str], data_format: dict,
                  provenance: dict, metrics: dict | None, **fields) -> dict:
    """The metadata every MODEL_DIR carries (classifiers and regression maps alike): MONAI's bundle
    fields, then gliofed's format tag, creation time, versions, provenance and metrics."""
    import numpy

    return {
        "schema": MONAI_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by gliofed"},
        "monai_version": _version("monai") or "unknown",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": _version("nibabel") or "", "fire": _version("fire") or ""},
        "name": name,
        "description": description,
        "authors": "gliofed",
        "copyright": "see provenance",
        "data_source": "see provenance",
        "data_type": "nibabel",
        "intended_use": "research only; not for clinical use",
        "references": references,
        "network_data_format": data_format,
        "format": BUNDLE_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
        "versions": _versions(),
        "provenance": provenance,
        "metrics": metrics or {},
    }


def classifier_data_format(spec: TaskSpec, cfg, inputs: list[str], ch: int) -> tuple[dict, list[str]]:
    """MONAI ``network_data_format`` of a classifier, and its input channel names."""
    channels = [f"{c}@t{t}" if spec.timepoints == 2 else c
                for t in range(spec.timepoints) for c in inputs]
    if spec.timepoints == 2 and cfg.subtraction:
        channels += [f"{c}@t1-t0" for c in inputs]
    return {
        "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR",
                             "num_channels": ch, "spatial_shape": list(cfg.input_size),
                             "dtype": "float32", "value_range": [], "is_patch_data": False,
                             "channel_def": {str(i): c for i, c in enumerate(channels)}}},
        "outputs": {"pred": {"type": "probabilities", "format": "classes",
                             "num_channels": spec.num_classes, "spatial_shape": [1],
                             "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                             "channel_def": {str(i): c for i, c in enumerate(spec.classes)}}},
    }, channels


def export_bundle(model: nn.Module, spec: TaskSpec, cfg, out_dir: str | Path,
                  provenance: dict, metrics: dict | None = None, in_channels: int | None = None,
                  use_optional: bool = False) -> Path:
    """Write MODEL_DIR; ``cfg`` is the TrainConfig used (its fields are recorded)."""
    from shared.training.kinds import kind_adapter
    from shared.training.loop import _first_conv_in_channels

    cfg = cfg.resolved()
    adapter = kind_adapter(spec)
    if adapter is not None:
        return adapter.export(model, spec, cfg, out_dir, provenance, metrics)
    out = Path(out_dir)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    core = getattr(model, "_module", model)
    state = {k.removeprefix("_module."): v.detach().cpu() for k, v in core.state_dict().items()}
    torch.save(state, out / "models" / "model.pt")
    ch = in_channels or _first_conv_in_channels(core)
    from shared.data import input_channels

    # the network's first layer says whether it was built with the optional inputs
    use_optional = use_optional or (bool(spec.optional_inputs)
                                    and ch == input_channels(spec, True, cfg.subtraction))
    inputs = list(spec.inputs) + (list(spec.optional_inputs) if use_optional else [])
    from dataclasses import asdict

    data_format, channels = classifier_data_format(spec, cfg, inputs, ch)
    meta = base_metadata(
        f"gliofed {spec.name}",
        f"gliofed {spec.name} classifier ({cfg.network}); input: the whole brain from "
        f"{', '.join(inputs)} (no tumour mask needed).",
        [spec.reference], data_format, provenance, metrics,
        image_classes=f"{len(channels)} channel MR: {', '.join(channels)}",
        label_classes=", ".join(spec.classes), pred_classes=", ".join(spec.classes),
        task=spec.name, classes=list(spec.classes), label_column=spec.label_column, inputs=inputs,
        timepoints=spec.timepoints,
        network={"name": cfg.network, "in_channels": ch, "num_classes": spec.num_classes,
                 "dp_compatible": cfg.dp_compatible, "stem_stride": cfg.stem_stride,
                 "clinical": list(cfg.clinical)},
        preprocessing={"version": PREPROCESS_VERSION, "orientation": "RAS",
                       "crop": "images' non-zero support (whole brain); seg never used",
                       "resample_to": list(cfg.input_size),
                       "normalisation": "z-score per channel over non-zero voxels",
                       "subtraction": cfg.subtraction},
        train_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    )
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "configs" / "inference.json").write_text(
        json.dumps(inference_config(spec, cfg, inputs, ch), indent=2))
    _copy_scripts(out)
    (out / "docs" / "README.md").write_text(
        f"# gliofed model: {spec.name}\n\nClasses: {', '.join(spec.classes)}. Inputs: "
        f"{', '.join(inputs)} ({spec.timepoints} timepoint(s)): the whole brain (the images' non-zero "
        f"support), RAS, z-scored over non-zero voxels, resized to {'x'.join(map(str, cfg.input_size))}. "
        f"No tumour mask is needed.\nNetwork: {cfg.network} ({ch} input channels).\n\n"
        f"Provenance: `{json.dumps(provenance, default=str)}`\n\nUse: `gliofed predict --model "
        f"{out.name} --cohort SITE_DIR --out preds.csv`, or without gliofed: `python -m monai.bundle "
        f"run --config_file {out.name}/configs/inference.json --bundle_root {out.name} --dataset_dir "
        "SITE_DIR --output_dir OUT` (writes OUT/predictions.csv).\n"
    )
    return out


def train_config_from_meta(meta: dict, **overrides):
    """The TrainConfig a MODEL_DIR was trained with, for prediction (no augmentation)."""
    from shared.training.loop import TrainConfig

    tc = meta.get("train_config", {})
    net = meta["network"]
    kw = {"task": meta["task"], "network": net["name"], "input_size": tuple(tc["input_size"]),
          "batch_size": tc.get("batch_size", 4), "subtraction": tc.get("subtraction", False),
          "augment": False, "stem_stride": net.get("stem_stride", 2),
          "dp_compatible": net.get("dp_compatible", False),
          "clinical": tuple(net.get("clinical", []))}
    kw.update(overrides)
    return TrainConfig(**kw)


def load_bundle(model_dir: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network from metadata and load ``models/model.pt``."""
    from shared.models import build_model

    d = Path(model_dir)
    meta_path = d / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (not a gliofed MODEL_DIR)")
    meta = json.loads(meta_path.read_text())
    from shared.training.kinds import kind_adapter

    adapter = kind_adapter(get_task(meta["task"]))
    if adapter is not None:
        return adapter.load(d, meta)
    version = meta.get("preprocessing", {}).get("version", 1)
    if version != PREPROCESS_VERSION:
        raise ValueError(f"{d}: exported with preprocessing version {version} (the tumour crop read "
                         f"from seg); this gliofed uses version {PREPROCESS_VERSION} (whole brain, no "
                         "mask): retrain or re-export the model")
    spec = get_task(meta["task"])
    net = meta["network"]
    seg = seg_classes_for(net["name"])
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
