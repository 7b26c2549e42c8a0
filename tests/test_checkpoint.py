"""Checkpoints cannot run code: safetensors + JSON + SHA-256, legacy pickles refused, old rounds pruned."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    mark_best,
    prune_checkpoints,
    restore_rng,
    rng_state,
    round_dir,
    rounds_to_keep,
    save_checkpoint,
    saved_rounds,
)
from shared.config import RunConfig


def _ckpt(rnd: int) -> Checkpoint:
    rng = np.random.default_rng(rnd)
    weights = {"conv.weight": rng.normal(size=(4, 2, 3)).astype(np.float32),
               "conv.bias": np.arange(4, dtype=np.float32)}
    strategy = {"m_t": {k: v * 0.5 for k, v in weights.items()},
                "v_t": [np.ones(3, np.float64)], "step": 7}
    history = [{"round": r, "pooled": {"accuracy": 0.5 + r / 100}} for r in range(1, rnd + 1)]
    return Checkpoint(rnd, weights, strategy, rng_state(), history)


def test_round_trip_restores_weights_strategy_rng_and_history(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    ck = _ckpt(2)
    save_checkpoint(tmp_path, ck)
    expected = (random.random(), np.random.random())
    back = load_checkpoint(tmp_path)
    assert back.round == 2 and back.history == ck.history
    assert all(np.array_equal(back.weights[k], v) for k, v in ck.weights.items())
    assert np.array_equal(back.strategy_state["m_t"]["conv.bias"], ck.strategy_state["m_t"]["conv.bias"])
    assert back.strategy_state["step"] == 7 and len(back.strategy_state["v_t"]) == 1
    restore_rng(back.rng_state)
    assert (random.random(), np.random.random()) == expected
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # nothing pickled


def test_pickle_bomb_last_pt_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"round": 1, "weights": Bomb()}, folder / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: a pickle checkpoint .* refuses it"):
        load_checkpoint(tmp_path)
    assert not marker.exists()

    # the server's resume path refuses it too, before any round runs
    from server.rounds import start_state

    run = RunConfig(resume=True, run_dir=str(tmp_path), network="small_cnn", input_size=16)
    with pytest.raises(CheckpointError):
        start_state(run, tmp_path)
    assert not marker.exists()


def test_an_altered_checkpoint_file_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(1))
    weights = round_dir(tmp_path, 1) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(tmp_path)


def test_only_the_last_n_and_the_best_round_are_kept(tmp_path: Path) -> None:
    for rnd in (1, 2):
        save_checkpoint(tmp_path, _ckpt(rnd), keep_last=2)
    mark_best(tmp_path, 2)
    for rnd in (3, 4, 5):
        save_checkpoint(tmp_path, _ckpt(rnd), keep_last=2)
    assert saved_rounds(tmp_path) == [2, 4, 5]  # last two plus the best
    assert load_checkpoint(tmp_path).round == 5
    assert rounds_to_keep(tmp_path, 1) == {2, 5}
    assert prune_checkpoints(tmp_path, {5}) == [2, 4]
    save_checkpoint(tmp_path, _ckpt(6), keep_last=0)
    assert saved_rounds(tmp_path) == [5, 6]  # 0 keeps every round


def test_keep_checkpoints_default_is_the_same_in_run_config_and_pyproject() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    app = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app["keep-checkpoints"] == RunConfig().keep_checkpoints == 2
    assert RunConfig.from_flower(app).keep_checkpoints == 2
    assert json.dumps(RunConfig.from_flower({"keep-checkpoints": "5"}).keep_checkpoints) == "5"
