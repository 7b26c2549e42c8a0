"""DP through the real round loop and ClientApp (in-process grid): opacus budgets and central DP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fl_helpers import LocalGrid, run_config

from server.model import federation_provenance
from server.privacy import central_epsilon, noisy_rounds
from server.rounds import run_rounds
from server.strategy import build_strategy
from shared.config import RunConfig

SITES = (3, 12)  # sites_root (tests/conftest.py): 3 sites of 12 cases


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread):
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
    assert "privacy-budget" in declined  # the fixed-vocabulary reply; the numbers stay in its log


def test_central_dp_runs_and_accounts(tmp_path, sites_root, make_grid):
    cfg = run_config(tmp_path / "run", sites_root, dp="central",
                     **{"noise-multiplier": 0.5, "max-grad-norm": 5.0})
    run = RunConfig.from_flower(cfg)
    result = run_rounds(make_grid(cfg), run)
    eps = [r["dp"]["epsilon"] for r in result.rounds]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < math.inf
    # the model card states what the run log says: one rule counts the noisy rounds
    assert federation_provenance(run, result.sites, result.rounds)["privacy"]["epsilon"] == eps[-1]


def test_central_epsilon_counts_only_rounds_that_added_noise():
    run = RunConfig(dp="central", noise_multiplier=0.5)
    rows = [{"round": 1, "replied": 3}, {"round": 2, "replied": 0}, {"round": 3, "replied": 2}]
    assert noisy_rounds(rows) == 2
    epsilon = federation_provenance(run, ["a", "b"], rows)["privacy"]["epsilon"]
    assert epsilon == central_epsilon(run, 2) < central_epsilon(run, 3)


def test_central_dp_refuses_non_averaging_strategies_when_the_config_is_parsed():
    with pytest.raises(ValueError, match="dp='central' cannot be combined with strategy='krum'"):
        RunConfig.from_flower({"task": "grading", "dp": "central", "strategy": "krum"})
    assert build_strategy(RunConfig(dp="central", strategy="fedadam")).strategy.__class__.__name__ \
        == "FedAdam"
