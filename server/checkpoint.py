"""Checkpoints that cannot run code: tensors in safetensors, state in JSON, a SHA-256 digest per file.

One folder per completed round, ``RUN_DIR/checkpoints/round-NNNN/``:

- ``weights.safetensors``: the global weights; ``strategy.safetensors``: the server optimiser's arrays
  (safetensors holds raw tensors only: loading it never executes anything, unlike a pickle);
- ``state.json``: the round, the run's round rows, Python's and numpy's RNG state, the strategy layout;
- ``sha256.json``: the digest of each of those files, checked before anything is read.

``last.json`` (replaced atomically) names the last completed round, so ``resume`` continues exactly
where an interrupted server stopped. Only the last ``keep-checkpoints`` rounds are kept, plus the one
``best.json`` names, if any. A ``last.pt`` pickle from an older gliofed is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LAST = "last.json"
BEST = "best.json"
LEGACY = "last.pt"
FILES = ("weights.safetensors", "strategy.safetensors", "state.json")
DIGESTS = "sha256.json"


class CheckpointError(RuntimeError):
    """A checkpoint that resume refuses: legacy pickle, digest mismatch, unreadable or incomplete."""


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    rng_state: Any
    history: list[dict[str, Any]]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def round_dir(run_dir: str | Path, rnd: int) -> Path:
    return checkpoint_dir(run_dir) / f"round-{rnd:04d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which JSON cannot store")


def _split_strategy(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (flat ``attr/d/key`` or ``attr/l/index`` names) and a JSON layout with the scalars."""
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {}
    for attr, value in state.items():
        if isinstance(value, dict):
            layout[attr] = {"kind": "dict", "keys": list(value)}
            for k, v in value.items():
                arrays[f"{attr}/d/{k}"] = np.ascontiguousarray(v)
        elif isinstance(value, list):
            layout[attr] = {"kind": "list", "n": len(value)}
            for i, v in enumerate(value):
                arrays[f"{attr}/l/{i}"] = np.ascontiguousarray(v)
        else:
            layout[attr] = {"kind": "value", "value": value}
    return arrays, layout


def _join_strategy(arrays: dict[str, np.ndarray], layout: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, spec in layout.items():
        if spec["kind"] == "dict":
            out[attr] = {k: arrays[f"{attr}/d/{k}"] for k in spec["keys"]}
        elif spec["kind"] == "list":
            out[attr] = [arrays[f"{attr}/l/{i}"] for i in range(spec["n"])]
        else:
            out[attr] = spec["value"]
    return out


def _rng_to_json(state: Any) -> dict[str, Any]:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {"python": [version, list(internal), gauss],
            "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]}


def _rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    return {"python": (version, tuple(internal), gauss),
            "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)}


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep_last: int = 2) -> Path:
    """Write ``round-NNNN/`` for ``ckpt.round``, point ``last.json`` at it, prune old rounds.

    ``keep_last``: completed rounds kept on disk (run config ``keep-checkpoints``; 0 = every round);
    the round ``best.json`` names is never removed.
    """
    from safetensors.numpy import save_file

    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".round-{ckpt.round:04d}."))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in ckpt.weights.items()},
                  str(tmp / "weights.safetensors"))
        arrays, layout = _split_strategy(ckpt.strategy_state)
        save_file(arrays, str(tmp / "strategy.safetensors"))
        state = {"round": int(ckpt.round), "history": ckpt.history, "strategy_layout": layout,
                 "rng": _rng_to_json(ckpt.rng_state)}
        (tmp / "state.json").write_text(json.dumps(state, default=_jsonable))
        for name in FILES:
            _fsync(tmp / name)
        digests = {name: _sha256(tmp / name) for name in FILES}
        _write_json_atomic(tmp / DIGESTS, digests)
        final = round_dir(run_dir, ckpt.round)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json_atomic(folder / LAST, {"round": int(ckpt.round), "dir": final.name})
    prune_checkpoints(run_dir, rounds_to_keep(run_dir, keep_last))
    return final


def saved_rounds(run_dir: str | Path) -> list[int]:
    """Rounds with a checkpoint folder, ascending."""
    out = []
    for p in checkpoint_dir(run_dir).glob("round-*"):
        suffix = p.name.removeprefix("round-")
        if p.is_dir() and suffix.isdigit():
            out.append(int(suffix))
    return sorted(out)


def _marked(run_dir: str | Path, name: str) -> int | None:
    path = checkpoint_dir(run_dir) / name
    try:
        return int(json.loads(path.read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_best(run_dir: str | Path, rnd: int, **info: Any) -> None:
    """Name round ``rnd`` the best (model selection): pruning never removes it. ``info`` (the metric,
    its value, n, ...) is stored beside the round in ``best.json``."""
    checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(checkpoint_dir(run_dir) / BEST, {"round": int(rnd), **info})


def clear_best(run_dir: str | Path) -> None:
    """Forget a previous run's best round (a fresh run in the same folder starts with none)."""
    (checkpoint_dir(run_dir) / BEST).unlink(missing_ok=True)


def rounds_to_keep(run_dir: str | Path, keep_last: int) -> set[int]:
    """The last ``keep_last`` saved rounds (all when 0), the ``last.json`` one and the best one."""
    saved = saved_rounds(run_dir)
    keep = set(saved if keep_last <= 0 else saved[-keep_last:])
    for name in (LAST, BEST):
        marked = _marked(run_dir, name)
        if marked is not None:
            keep.add(marked)
    return keep


def prune_checkpoints(run_dir: str | Path, keep: set[int]) -> list[int]:
    """Delete every round folder not in ``keep``; returns the rounds removed."""
    removed = []
    for rnd in saved_rounds(run_dir):
        if rnd not in keep:
            shutil.rmtree(round_dir(run_dir, rnd))
            removed.append(rnd)
    return removed


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The last completed round's checkpoint, or None when the run folder has none.

    Raises :class:`CheckpointError` for a legacy pickle ``last.pt`` (never unpickled), a file whose
    SHA-256 differs from ``sha256.json``, or a folder that is incomplete or unreadable.
    """
    folder = checkpoint_dir(run_dir)
    last = folder / LAST
    if not last.is_file():
        if (folder / LEGACY).exists():
            raise CheckpointError(
                f"{folder / LEGACY}: a pickle checkpoint (older gliofed format); loading a pickle can "
                "run arbitrary code, so resume refuses it. Start the run afresh (resume = false) or "
                "remove the file")
        return None
    rnd = _marked(run_dir, LAST)
    if rnd is None:
        raise CheckpointError(f"{last}: unreadable (expected {{\"round\": N}})")
    return read_round(run_dir, rnd)


def read_round(run_dir: str | Path, rnd: int) -> Checkpoint:
    """Verify and read ``round-NNNN/`` (digests first; only safetensors and JSON are parsed)."""
    from safetensors.numpy import load_file

    d = round_dir(run_dir, rnd)
    try:
        digests = json.loads((d / DIGESTS).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{d}: no readable {DIGESTS} ({type(err).__name__})") from None
    for name in FILES:
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if not isinstance(digests, dict) or _sha256(path) != digests.get(name):
            raise CheckpointError(f"{path}: SHA-256 differs from {DIGESTS} (corrupt or altered); "
                                  "resume refuses it")
    try:
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "weights.safetensors"))
        strategy = _join_strategy(load_file(str(d / "strategy.safetensors")),
                                  state["strategy_layout"])
        rng = _rng_from_json(state["rng"])
        return Checkpoint(int(state["round"]), weights, strategy, rng, list(state["history"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{d}: unreadable checkpoint ({type(err).__name__})") from None


def rng_state() -> Any:
    """Python's and numpy's global RNG state (Flower samples nodes with ``random``)."""
    return {"python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: Any) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
