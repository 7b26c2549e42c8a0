"""DP through the real round loop and ClientApp (in-process grid): opacus budgets and central DP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fl_helpers import LocalGrid, run_config, write_tiny_cohort

from server.rounds import run_rounds
from server.strategy import build_strategy
from shared.config import RunConfig


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpsites")
    for i in range(3):
        write_tiny_cohort(root / f"site-{i}", n_cases=12, seed=i, site=f"S{i}")
    return root


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("GLIOFED_PRIVACY_DIR", str(tmp_path / "ledgers"))


def test_opacus_sites_report_epsilon_and_an_exhausted_site_declines(tmp_path, sites_root):
    cfg = run_config(tmp_path / "run", sites_root, dp="opacus", **{"noise-multiplier": 1.0})
    nodes = {100 + i: {"partition-id": i, "num-partitions": 3} for i in range(2)}
    nodes[102] = {"data-path": str(sites_root / "site-2"), "site-id": "tight", "max-epsilon": 0.01}
    grid = LocalGrid(nodes, cfg)
    result = run_rounds(grid, RunConfig.from_flower(cfg))
    assert [r["replied"] for r in result.rounds] == [2, 2]
    assert all(math.isfinite(r["train"]["dp-epsilon"]) and r["train"]["dp-epsilon"] > 0
               for r in result.rounds)
    assert result.rounds[1]["train"]["dp-epsilon"] > result.rounds[0]["train"]["dp-epsilon"]
    declined = [r.error.reason for r in grid.replies if r.has_error()]
    assert any("max-epsilon 0.01" in d and "declines to train" in d for d in declined)


def test_central_dp_runs_and_accounts(tmp_path, sites_root):
    cfg = run_config(tmp_path / "run", sites_root, dp="central",
                     **{"noise-multiplier": 0.5, "max-grad-norm": 5.0})
    nodes = {100 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}
    result = run_rounds(LocalGrid(nodes, cfg), RunConfig.from_flower(cfg))
    eps = [r["dp"]["epsilon"] for r in result.rounds]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < math.inf


def test_central_dp_refuses_non_averaging_strategies_when_the_config_is_parsed():
    with pytest.raises(ValueError, match="dp='central' cannot be combined with strategy='krum'"):
        RunConfig.from_flower({"task": "grading", "dp": "central", "strategy": "krum"})
    assert build_strategy(RunConfig(dp="central", strategy="fedadam")).strategy.__class__.__name__ \
        == "FedAdam"
