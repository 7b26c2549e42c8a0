"""Centralised QTMnet training, start to finish: examples in, trained model and held-out errors out.

``gliofed qtm train`` is a thin wrapper over this module (it parses options, draws progress bars and
prints the result). Examples come from site folders written by ``gliofed qtm simulate`` (their
non-test rows train, their test rows are held out) or are simulated in memory with one acquisition
protocol; :func:`train_centralised` trains and scores the model, :func:`save_centralised` writes the
MODEL_DIR (``shared.qtm.bundle``) and the loss history.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.qtm.bundle import save_qtmnet
from shared.qtm.net import build_qtmnet
from shared.qtm.phantom import Protocol
from shared.qtm.train import (
    QtmExample,
    evaluate_qtmnet,
    examples_from_samples,
    simulate_examples,
    train_qtmnet,
)

HELD_OUT_SEED_OFFSET = 7919  # the held-out simulated cases use another seed than the training ones


@dataclass
class QtmData:
    """Training and held-out examples, and where they came from (for the model's provenance)."""

    train: list[QtmExample]
    val: list[QtmExample]
    source: dict[str, Any]


@dataclass
class CentralisedResult:
    model: torch.nn.Module
    loss_history: list[float]  # mean training loss per epoch
    metrics: dict[str, float]  # held-out errors (empty without held-out cases)
    provenance: dict[str, Any]
    seconds: float = 0.0
    train_cases: int = 0


def site_examples(data_dirs: Sequence[Path], seed: int) -> QtmData:
    """Examples from site folders: rows outside the test split train, test rows are held out.

    Raises ``CohortError`` / ``ValueError`` / ``FileNotFoundError`` with the folder and the reason.
    """
    from shared.cohort import read_cohort
    from shared.tasks import select_samples

    train: list[QtmExample] = []
    val: list[QtmExample] = []
    for folder in data_dirs:
        samples, _ = select_samples("qtm", read_cohort(folder, seed=seed))
        train += examples_from_samples([s for s in samples if s.split != "test"])
        val += examples_from_samples([s for s in samples if s.split == "test"])
    return QtmData(train, val, {"data": [str(d) for d in data_dirs]})


def simulated_examples(cases: int, val_cases: int, seed: int, workers: int = 1,
                       progress: Callable[[int], None] | None = None) -> QtmData:
    """``cases`` training and ``val_cases`` held-out cases simulated with the default protocol
    (5 s frames over 300 s, the protocol of simulated site 0)."""
    protocols = (Protocol(),)
    train = simulate_examples(cases, seed, protocols, workers=workers, progress=progress)
    val = simulate_examples(val_cases, seed + HELD_OUT_SEED_OFFSET, protocols, workers=workers,
                            progress=progress)
    return QtmData(train, val, {"simulated_cases": cases, "protocol": "site-0 (5 s frames, 300 s)",
                                "seed": seed})


def train_centralised(data: QtmData, epochs: int, lr: float, batch_size: int, device: str,
                      seed: int, progress: Callable[[int, float], None] | None = None
                      ) -> CentralisedResult:
    """Train a fresh QTMnet on ``data.train``; score it on ``data.val``.

    ``progress(epoch, mean loss)`` is called after every epoch.
    """
    if not data.train:
        raise ValueError("no training cases")
    torch.manual_seed(seed)
    model = build_qtmnet()
    history: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        history.append(loss)
        if progress is not None:
            progress(epoch, loss)

    res = train_qtmnet(model, data.train, epochs, lr=lr, batch_size=batch_size, device=device,
                       seed=seed, progress=on_epoch)
    metrics = evaluate_qtmnet(model, data.val, device) if data.val else {}
    provenance = {"trained": "centralised", **data.source, "epochs": epochs,
                  "train_cases": len(data.train), "seconds": round(res["seconds"], 1),
                  "device": device}
    return CentralisedResult(model, history, metrics, provenance, res["seconds"], len(data.train))


def save_centralised(result: CentralisedResult, out: Path) -> Path:
    """MODEL_DIR with the model, its provenance and held-out metrics, plus ``history.json``."""
    save_qtmnet(result.model, out, result.provenance, result.metrics)
    (Path(out) / "history.json").write_text(json.dumps({"loss": result.loss_history}))
    return Path(out)
