"""Checkpoints: global weights, last completed round, strategy optimiser state and RNG state.

One file per completed round in ``RUN_DIR/checkpoints/round-NNNN.pt`` plus ``last.pt`` (written
atomically), so ``resume`` continues exactly where an interrupted server stopped.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    rng_state: Any
    history: list[dict[str, Any]]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep_every_round: bool = True) -> Path:
    """Write the checkpoint for ``ckpt.round`` and point ``last.pt`` at it (atomic rename)."""
    import torch

    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "round": ckpt.round,
        "weights": ckpt.weights,
        "strategy_state": ckpt.strategy_state,
        "rng_state": ckpt.rng_state,
        "history": ckpt.history,
    }
    tmp = folder / "last.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / "last.pt")
    if keep_every_round:
        torch.save(payload, folder / f"round-{ckpt.round:04d}.pt")
    return folder / "last.pt"


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The last completed round's checkpoint, or None when the run folder has none."""
    path = checkpoint_dir(run_dir) / "last.pt"
    if not path.is_file():
        return None
    return _read(path)


def read_round(run_dir: str | Path, rnd: int) -> Checkpoint:
    """The checkpoint of round ``rnd`` (kept for the best round: model selection exports it)."""
    return _read(checkpoint_dir(run_dir) / f"round-{rnd:04d}.pt")


def _read(path: Path) -> Checkpoint:
    import torch

    try:
        data = torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"{path}: unreadable checkpoint ({err})") from None
    return Checkpoint(
        data["round"], data["weights"], data["strategy_state"], data["rng_state"], data["history"]
    )


def mark_best(run_dir: str | Path, rnd: int, **info: Any) -> Path:
    """Name round ``rnd`` the best (model selection) in ``checkpoints/best.json`` ({"round": rnd, **info},
    written atomically); ``clear_best`` removes it when a fresh run starts."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "best.json.tmp"
    tmp.write_text(json.dumps({"round": int(rnd), **info}))
    os.replace(tmp, folder / "best.json")
    return folder / "best.json"


def clear_best(run_dir: str | Path) -> None:
    (checkpoint_dir(run_dir) / "best.json").unlink(missing_ok=True)


def rng_state() -> Any:
    """Python's and numpy's global RNG state (Flower samples nodes with ``random``)."""
    return {"python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: Any) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
