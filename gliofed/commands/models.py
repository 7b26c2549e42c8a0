"""`gliofed train|predict|evaluate|explain`: the centralised learning core through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

TaskOpt = Annotated[str, typer.Option("--task", help="grading | typing | rano | recurrence")]
CohortOpt = Annotated[Path, typer.Option("--cohort", help="Site folder with cohort.csv.")]
ModelOpt = Annotated[Path, typer.Option("--model", help="MODEL_DIR written by train or a federation.")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _load_cohort(path: Path):
    from shared.cohort import CohortError, read_cohort

    try:
        cohort = read_cohort(path)
    except CohortError as exc:
        _fail(str(exc))
    for p in cohort.errors:
        typer.secho(str(p), fg="yellow", err=True)
    return cohort


def train(
    task: TaskOpt,
    cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="MODEL_DIR to write.")],
    network: Annotated[str, typer.Option(help="Network (default: the task's).")] = "",
    epochs: int = 20,
    batch_size: int = 4,
    size: Annotated[int, typer.Option(help="Cubic input size in voxels (0: the task's).")] = 0,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    patience: int = 5,
    cache_dir: Annotated[str, typer.Option(help="Preprocessing cache (default ~/.cache/gliofed).")] = "",
    subtraction: Annotated[bool, typer.Option(help="rano: add the follow-up minus baseline image.")] = False,
    clinical: Annotated[str, typer.Option(help="Comma-separated numeric cohort columns to fuse (e.g. age).")] = "",
) -> None:
    """Train a task centrally (the pooled baseline) and export MODEL_DIR with test metrics and plots."""
    from shared.tasks import get_task, select_samples
    from shared.training import TrainConfig, evaluate_model, fit, model_inputs
    from shared.training.bundle import export_bundle
    from shared.training.report import write_eval_outputs

    try:
        spec = get_task(task)
    except ValueError as exc:
        _fail(str(exc))
    c = _load_cohort(cohort)
    tr, _ = select_samples(spec, c, "train")
    va, _ = select_samples(spec, c, "val")
    te, _ = select_samples(spec, c, "test")
    if not tr:
        _fail(f"{cohort}: no eligible {task} training cases (run `gliofed site check {cohort}`)")
    typer.echo(f"{task}: {len(tr)} train / {len(va)} val / {len(te)} test cases")
    cfg = TrainConfig(task=task, network=network or None, input_size=(size,) * 3 if size else None,
                      epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                      patience=patience, cache_dir=cache_dir or None, subtraction=subtraction,
                      clinical=tuple(c for c in clinical.split(",") if c)).resolved()
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


def _eligible(model_dir: Path, cohort: Path, require_label: bool = True):
    from shared.tasks import get_task, select_samples
    from shared.training.bundle import load_bundle, train_config_from_meta

    try:
        model, meta = load_bundle(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    spec = get_task(meta["task"])
    c = _load_cohort(cohort)
    samples, skipped = select_samples(spec, c, require_label=require_label)
    return model, meta, spec, train_config_from_meta(meta), samples, skipped


def predict(
    model: ModelOpt, cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="CSV to write.")],
) -> None:
    """Write case_id,label,prob_<class>... for every eligible row; others are skipped with a reason."""
    import csv

    from shared.training import predict_probs

    net, _meta, spec, cfg, samples, skipped = _eligible(model, cohort, require_label=False)
    probs = predict_probs(net, samples, spec, cfg) if samples else []
    out.parent.mkdir(parents=True, exist_ok=True)
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
) -> None:
    """Metrics (AUC, balanced accuracy, sensitivity, ...), ROC and confusion-matrix PNGs."""
    from shared.training import evaluate_model
    from shared.training.report import write_eval_outputs

    net, _meta, spec, cfg, samples, _ = _eligible(model, cohort)
    if split != "all":
        samples = [s for s in samples if s.split == split]
    if not samples:
        _fail(f"{cohort}: no labelled {spec.name} cases in split {split}")
    ev = evaluate_model(net, samples, spec, cfg)
    write_eval_outputs(ev, spec, out)
    typer.echo(", ".join(f"{k} {v:.3f}" for k, v in ev.metrics.items()))
    typer.echo(f"metrics and plots written to {out}")


def explain(
    model: ModelOpt, cohort: CohortOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")],
    case: Annotated[list[str], typer.Option("--case", help="case_id (repeatable); default: 4 test cases")] = [],  # noqa: B006
) -> None:
    """Grad-CAM and saliency maps of the predicted class (the mask only drawn as a contour), one PNG per case."""
    from shared.training.explain import explain_cases

    net, _meta, spec, cfg, samples, _ = _eligible(model, cohort)
    chosen = [s for s in samples if s.case_id in case] if case else [
        s for s in samples if s.split == "test"][:4]
    if not chosen:
        _fail("no matching eligible cases to explain")
    for row in explain_cases(net, chosen, spec, cfg, out):
        typer.echo(f"wrote {row['png']} (Grad-CAM {row['cam_inside']:.2f}, saliency "
                   f"{row['saliency_inside']:.2f} of the mass inside the lesion)")


def register(app: typer.Typer) -> None:
    """Add train, predict, evaluate and explain."""
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)
    app.command("explain")(explain)
