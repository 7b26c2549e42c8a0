"""``global-ema``: the scored, selected and exported model is a moving average of the rounds' models,
in the federation (checkpointed, resumed bit-exactly) and in the baselines it is compared with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fl_helpers import run_config

from server.checkpoint import read_round
from server.rounds import run_rounds
from shared.config import RunConfig
from shared.round_average import STATE_KEY, RoundAverage

SITES = (2, 16)
pytestmark = pytest.mark.usefixtures("one_thread")
DECAY = 0.6


def test_the_average_starts_at_the_first_round_then_moves_by_one_minus_the_decay():
    avg = RoundAverage(0.75)
    w1 = {"w": np.array([4.0, 8.0], np.float32), "n": np.array(3, np.int64)}
    w2 = {"w": np.array([0.0, 4.0], np.float32), "n": np.array(7, np.int64)}
    assert np.array_equal(avg.update(w1)["w"], w1["w"])
    out = avg.update(w2)
    assert np.allclose(out["w"], [3.0, 7.0]) and out["w"].dtype == np.float32
    assert out["n"] == 7  # integer buffers take the newest value
    w1["w"][:] = 100  # the average holds copies
    assert np.allclose(avg.state()["w"], [3.0, 7.0])
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="global-ema"):
            RoundAverage(bad)
    with pytest.raises(ValueError, match=r"global-ema=1.0 must be in \[0, 1\)"):
        RunConfig.from_flower({"global-ema": 1.0})
    assert RunConfig().global_ema == 0.0  # off by default


def _ema_of_checkpoints(run_dir, rounds: int) -> dict[str, np.ndarray]:
    avg = RoundAverage(DECAY)
    for rnd in range(1, rounds + 1):
        out = avg.update(read_round(run_dir, rnd).weights)  # a checkpoint holds the plain aggregate
    return out


def test_the_federation_scores_and_exports_the_average_and_resumes_it_bit_exactly(
        tmp_path, sites_root, make_grid):
    over = {"num-server-rounds": 3, "global-ema": DECAY, "keep-checkpoints": 0, "export": "final",
            "lr-schedule": "constant"}  # a 2-round run then trains rounds 1-2 as the 3-round one does
    cfg = run_config(tmp_path / "run", sites_root, **over)
    result = run_rounds(make_grid(cfg, n=2), RunConfig.from_flower(cfg))
    expected = _ema_of_checkpoints(tmp_path / "run", 3)
    final = result.arrays.to_torch_state_dict()
    assert final.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(final[k], torch.as_tensor(v), atol=1e-6), k
    plain = read_round(tmp_path / "run", 3).weights
    assert any(not np.array_equal(final[k].numpy(), plain[k]) for k in final)  # not the aggregate
    ckpt = read_round(tmp_path / "run", 3)
    assert all(np.array_equal(ckpt.strategy_state[STATE_KEY][k], final[k].numpy()) for k in final)
    # the best round's arrays are that round's average, not its plain aggregate
    best = result.selection.best_round
    assert all(np.array_equal(read_round(tmp_path / "run", best).strategy_state[STATE_KEY][k],
                              result.best_arrays.to_torch_state_dict()[k].numpy()) for k in final)

    from server.report import write_run_report

    if not (tmp_path / "run" / "run_config.json").is_file():
        (tmp_path / "run" / "run_config.json").write_text(json.dumps(cfg))
    assert "moving average of the aggregates up to its round (global-ema, decay 0.6" in \
        write_run_report(tmp_path / "run").read_text()

    # interrupted after round 2, resumed: the same average, to the bit, and the same scores
    cut = run_config(tmp_path / "cut", sites_root, **{**over, "num-server-rounds": 2})
    run_rounds(make_grid(cut, n=2), RunConfig.from_flower(cut))
    resumed = run_rounds(make_grid(cut, n=2), RunConfig.from_flower(
        {**cut, "num-server-rounds": 3, "resume": True}))
    again = resumed.arrays.to_torch_state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert resumed.rounds[-1]["pooled"] == result.rounds[-1]["pooled"]


def test_resuming_a_run_started_without_the_average_is_refused(tmp_path, sites_root, make_grid):
    cfg = run_config(tmp_path / "run", sites_root)
    run_rounds(make_grid(cfg, n=2), RunConfig.from_flower(cfg))
    with pytest.raises(RuntimeError, match="holds no moving average"):
        run_rounds(make_grid(cfg, n=2), RunConfig.from_flower(
            {**cfg, "num-server-rounds": 3, "resume": True, "global-ema": DECAY}))


def test_the_baselines_score_the_same_moving_average_of_their_rounds(tmp_path, sites_root):
    from simulations.baselines import site_samples, train_and_track

    per_site = site_samples(sorted(sites_root.glob("site-*")), "grading", 0)
    train = [s for v in per_site.values() for s in v["train"]]
    test = [s for v in per_site.values() for s in v["test"]]
    base = run_config(tmp_path / "b", None)
    plain = [train_and_track(RunConfig.from_flower(base), train, test, r, track=False)["model"]
             for r in (1, 2)]
    ema = train_and_track(RunConfig.from_flower({**base, "global-ema": DECAY}), train, test, 2)
    w1, w2 = plain[0].state_dict(), plain[1].state_dict()
    got = ema["model"].state_dict()
    changed = 0
    for k, v in got.items():
        if v.is_floating_point():
            assert torch.allclose(v, DECAY * w1[k] + (1 - DECAY) * w2[k], atol=1e-6), k
            changed += int(not torch.equal(v, w2[k]))
    assert changed  # the average is not the last round's model
    assert len(ema["curve"]) == 2 and ema["kept_round"] == 2
