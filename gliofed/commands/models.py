"""`gliofed train|predict|evaluate|explain`: the centralised learning core through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

TaskOpt = Annotated[str, typer.Option("--task", help="grading | typing | rano | recurrence")]
CohortOpt = Annotated[Path, typer.Option("--cohort", help="Site folder with cohort.csv.")]
ModelOpt = Annotated[Path, typer.Option("--model", help="MODEL_DIR written by train or a federation.")]


AllowOpt = Annotated[list[Path], typer.Option(
    "--allow-outside", help="A folder outside the site that cohort.csv may reference (repeatable).")]
MaxImageOpt = Annotated[float, typer.Option(
    "--max-image-mb", help="Largest image to open, MiB as float32 (default: node config's).")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _load_cohort(path: Path, allow_outside: list[Path] = (), max_image_mb: float = 0.0):
    from shared.cohort import CohortError, read_cohort
    from shared.imageio import set_max_image_mb

    if max_image_mb:
        set_max_image_mb(max_image_mb)
    try:
        cohort = read_cohort(path, allow_outside=allow_outside)
    except CohortError as exc:
        _fail(str(exc))
    for p in cohort.errors:
        typer.secho(str(p), fg="yellow", err=True)
    return cohort


def _writable(out: Path, folder: bool) -> None:
    """Fail now, before any work, when ``out`` (a folder, or a file's folder) cannot be written."""
    import tempfile

    where = out if folder else out.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        _fail(f"cannot write --out {out}: {exc.strerror or type(exc).__name__}")


def _screened(samples, spec, cfg, in_channels: int | None = None, what: str = "cases"):
    """The samples whose images open, after one line per skipped case; fails when none is left."""
    from shared.training.screen import screen_samples

    ok, skipped = screen_samples(samples, spec, cfg, in_channels)
    for cid, reason in skipped:
        typer.echo(f"skipped {cid}: {reason}")
    if samples and not ok:
        _fail(f"every one of the {len(samples)} {what} was skipped (reasons above)")
    return ok


def train(
    task: TaskOpt,
    cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="MODEL_DIR to write.")],
    network: Annotated[str, typer.Option(help="Network (default: the task's).")] = "",
    epochs: int = 20,
    batch_size: int = 4,
    size: Annotated[int, typer.Option(help="Cubic input size in voxels (0: the task's).")] = 0,
    lr: float = 1e-3,
    lr_schedule: Annotated[str, typer.Option(
        help="constant (the default) or cosine (the rate decays to 0 at the last epoch).")] = "",
    ema_decay: Annotated[float, typer.Option(
        help="> 0: validate and export an exponential moving average of the weights, updated every "
             "step with this decay (e.g. 0.99); 0: the trained weights.")] = 0.0,
    calibrate: Annotated[bool, typer.Option(
        help="Fold a temperature and per-class offsets, fitted on the validation split so that every "
             "class weighs the same, into the output layer (classifiers).")] = False,
    seed: int = 0,
    device: str = "auto",
    patience: int = 5,
    cache_dir: Annotated[str, typer.Option(help="Preprocessing cache (default ~/.cache/gliofed).")] = "",
    subtraction: Annotated[bool | None, typer.Option(
        "--subtraction/--no-subtraction",
        help="Add the follow-up minus baseline image (default: the task's; on for rano).")] = None,
    clinical: Annotated[str, typer.Option(help="Comma-separated numeric cohort columns to fuse (e.g. age).")] = "",
    allow_outside: AllowOpt = [],  # noqa: B006
    max_image_mb: MaxImageOpt = 0.0,
) -> None:
    """Train a task centrally (the pooled baseline) and export MODEL_DIR with test metrics and plots.

    A case whose images cannot be used is skipped with a one-line reason."""
    from shared.tasks import get_task, select_samples
    from shared.training import TrainConfig, evaluate_model, fit, model_inputs
    from shared.training.bundle import export_bundle
    from shared.training.report import write_eval_outputs

    try:
        spec = get_task(task)
    except ValueError as exc:
        _fail(str(exc))
    _writable(out, folder=True)
    c = _load_cohort(cohort, allow_outside, max_image_mb)
    tr, _ = select_samples(spec, c, "train")
    va, _ = select_samples(spec, c, "val")
    te, _ = select_samples(spec, c, "test")
    if not tr:
        _fail(f"{cohort}: no eligible {task} training cases (run `gliofed site check {cohort}`)")
    cfg = TrainConfig(task=task, network=network or None, input_size=(size,) * 3 if size else None,
                      epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                      patience=patience, cache_dir=cache_dir or None, subtraction=subtraction,
                      clinical=tuple(c for c in clinical.split(",") if c), ema_decay=ema_decay,
                      calibrate=calibrate,
                      **({"lr_schedule": lr_schedule} if lr_schedule else {}))
    try:
        cfg = cfg.resolved()
    except ValueError as exc:
        _fail(str(exc))
    tr = _screened(tr, spec, cfg, what="training cases")
    va, te = _screened(va, spec, cfg), _screened(te, spec, cfg)
    typer.echo(f"{task}: {len(tr)} train / {len(va)} val / {len(te)} test cases")
    model, history = fit(spec, cfg, tr, va, progress=True, log=typer.echo)
    ev = evaluate_model(model, te, spec, cfg) if te else None
    prov = {"mode": "centralised", "cohort": str(cohort.resolve()), "train_cases": len(tr),
            "val_cases": len(va), "test_cases": len(te), "epochs_run": len(history)}
    export_bundle(model, spec, cfg, out, prov, ev.metrics if ev else None,
                  use_optional=model_inputs(spec, cfg, [*tr, *va])["use_optional"])
    from shared.training.loop import write_history

    write_history(history, out / "history.jsonl")
    if ev is not None:
        write_eval_outputs(ev, spec, out / "eval")
        typer.echo("test: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.metrics.items()))
    typer.echo(f"model written to {out}")


def _bundle(model_dir: Path):
    """(model, metadata) of MODEL_DIR, or a clear error: missing, truncated, or another task's weights."""
    import json

    import torch

    from shared.tasks import TASKS
    from shared.training.bundle import load_bundle

    weights = model_dir / "models" / "model.pt"
    try:
        return load_bundle(model_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        _fail(f"{model_dir}/configs/metadata.json: unreadable ({type(exc).__name__}: {exc})")
    except RuntimeError as exc:
        meta = json.loads((model_dir / "configs" / "metadata.json").read_text())
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - truncated zip, not a state dict, ...
            _fail(f"{weights}: truncated or not a PyTorch state dict (re-export the model)")
        outs = [v.shape[0] for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
        fits = [n for n, t in TASKS.items() if t.classes and outs and len(t.classes) == outs[-1]
                and n != meta["task"]]
        guess = f"; its output has {outs[-1]} classes, as a {' or '.join(fits)} model" if fits else ""
        _fail(f"{weights}: these weights are not the {meta['task']} {meta['network']['name']} network "
              f"configs/metadata.json describes{guess} ({str(exc).splitlines()[0][:160]})")
    except Exception as exc:  # noqa: BLE001 - a corrupt model.pt (bad zip, EOF, pickle error)
        _fail(f"{weights}: truncated or not a PyTorch state dict ({type(exc).__name__})")


def _eligible(model_dir: Path, cohort: Path, require_label: bool = True,
              allow_outside: list[Path] = (), max_image_mb: float = 0.0):
    from shared.tasks import get_task, select_samples
    from shared.training.bundle import train_config_from_meta

    model, meta = _bundle(model_dir)
    spec = get_task(meta["task"])
    c = _load_cohort(cohort, allow_outside, max_image_mb)
    samples, skipped = select_samples(spec, c, require_label=require_label)
    return model, meta, spec, train_config_from_meta(meta), samples, skipped


def predict(
    model: ModelOpt, cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="CSV to write.")],
    allow_outside: AllowOpt = [],  # noqa: B006
    max_image_mb: MaxImageOpt = 0.0,
) -> None:
    """Write case_id,label,prob_<class>... for every eligible row; others are skipped with a reason."""
    import csv

    from shared.training import predict_probs
    from shared.training.loop import _first_conv_in_channels

    _writable(out, folder=False)
    net, _meta, spec, cfg, samples, skipped = _eligible(model, cohort, False, allow_outside,
                                                        max_image_mb)
    samples = _screened(samples, spec, cfg, _first_conv_in_channels(net))
    probs = predict_probs(net, samples, spec, cfg) if samples else []
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "label", *[f"prob_{c}" for c in spec.classes]])
        for s, p in zip(samples, probs, strict=True):
            w.writerow([s.case_id, spec.classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    for cid, reason in skipped:
        typer.echo(f"skipped {cid}: {reason}")
    typer.echo(f"{len(samples)} predictions written to {out}")


def evaluate(
    model: ModelOpt, cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json and plots.")],
    split: Annotated[str, typer.Option(help="test | val | train | all")] = "test",
    allow_outside: AllowOpt = [],  # noqa: B006
    max_image_mb: MaxImageOpt = 0.0,
) -> None:
    """Metrics (AUC, balanced accuracy, sensitivity, ...), ROC and confusion-matrix PNGs.

    A case whose images cannot be used is skipped with a one-line reason."""
    from shared.training import evaluate_model
    from shared.training.loop import _first_conv_in_channels
    from shared.training.report import write_eval_outputs

    _writable(out, folder=True)
    net, _meta, spec, cfg, samples, _ = _eligible(model, cohort, True, allow_outside, max_image_mb)
    if split != "all":
        samples = [s for s in samples if s.split == split]
    if not samples:
        _fail(f"{cohort}: no labelled {spec.name} cases in split {split}")
    samples = _screened(samples, spec, cfg, _first_conv_in_channels(net))
    ev = evaluate_model(net, samples, spec, cfg)
    write_eval_outputs(ev, spec, out)
    typer.echo(", ".join(f"{k} {v:.3f}" for k, v in ev.metrics.items()))
    typer.echo(f"metrics and plots written to {out}")


def explain(
    model: ModelOpt, cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")],
    case: Annotated[list[str], typer.Option("--case", help="case_id (repeatable); default: 4 test cases")] = [],  # noqa: B006
    method: Annotated[str, typer.Option(
        "--method", help="saliency: occlusion (one forward pass per 8-voxel cube, no gradients; "
                         "the most mass on the lesion in benchmarks/explain_lesion.py), "
                         "integrated_gradients (16 gradients), input_x_gradient, gradient or "
                         "smoothgrad")] = "occlusion",
) -> None:
    """Grad-CAM and a saliency map of the predicted class (the mask only drawn as a contour), one PNG per case."""
    from shared.training.explain import SALIENCY_METHODS, explain_cases
    from shared.training.loop import _first_conv_in_channels

    net, _meta, spec, cfg, samples, _ = _eligible(model, cohort)
    samples = _screened(samples, spec, cfg, _first_conv_in_channels(net))
    chosen = [s for s in samples if s.case_id in case] if case else [
        s for s in samples if s.split == "test"][:4]
    if not chosen:
        _fail("no matching eligible cases to explain")
    if method not in SALIENCY_METHODS:
        _fail(f"--method {method!r}: choose one of {', '.join(SALIENCY_METHODS)}")
    for row in explain_cases(net, chosen, spec, cfg, out, methods=(method,)):
        typer.echo(f"wrote {row['png']} (Grad-CAM {row['cam_inside']:.2f}, saliency "
                   f"{row['saliency_inside']:.2f} of the mass inside the lesion)")


def register(app: typer.Typer) -> None:
    """Add train, predict, evaluate and explain."""
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)
    app.command("explain")(explain)
