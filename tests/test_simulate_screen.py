"""What `gliofed simulate` prints: progress and results only (no Flower INFO, deprecation notices,
Ray or MONAI warnings)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

NOISE = ("INFO", "DEPRECATED", "FutureWarning", "nvImageCodec", "NvImgCodec", "UserWarning")


def test_flower_info_and_deprecation_lines_are_filtered_warnings_kept(caplog):
    from simulations.progress import QuietFlower

    flwr = logging.getLogger("flwr")
    with caplog.at_level(logging.INFO, logger="flwr"), QuietFlower():
        flwr.info("configure_train: Sampled 3 nodes (out of 3)")
        flwr.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated")
        flwr.warning("a site replied with an error: no-test-cases")
    assert [r.getMessage() for r in caplog.records] == ["a site replied with an error: no-test-cases"]
    with caplog.at_level(logging.INFO, logger="flwr"), QuietFlower(enabled=False):
        flwr.info("shown when verbose")
    assert caplog.records[-1].getMessage() == "shown when verbose"


def test_round_line_shows_the_pooled_headline_with_ci_and_n():
    from shared.config import RunConfig
    from simulations.progress import round_line

    row = {"round": 2, "pooled": {"auc": 0.9125, "num_examples": 40.0},
           "ci": {"pooled": {"auc": [0.84, 0.97]}}, "replied": 3, "sampled": 3, "seconds": 12.06}
    assert round_line(row, RunConfig(num_server_rounds=5)) == (
        "round 2/5: pooled auc 0.912 [0.840, 0.970] (n=40), 3/3 sites, 12.1 s")


@pytest.mark.slow
def test_simulate_screen_shows_progress_and_results_only(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "gliofed", "simulate", "--task", "grading", "--sites", "2", "--rounds", "1",
         "--cases", "24", "--size", "16", "--local-epochs", "1", "--no-cross-site",
         "--network", "small_cnn", "--out",
         str(tmp_path / "run")], check=False, capture_output=True, text=True, env=env, timeout=900)
    screen = out.stdout + out.stderr
    assert out.returncode == 0, screen[-3000:]
    assert "round 1/1: pooled auc" in screen and "centralised: auc" in screen
    assert not [line for line in screen.splitlines() if any(n in line for n in NOISE)], screen
