"""Server optimisers: server-lr = 0 takes each strategy's swept default, an explicit value wins, and
FedAvgM gets it as its server learning rate (not a fixed 1.0)."""

from __future__ import annotations

import pytest

from server.strategy import build_strategy
from shared.config import SERVER_LR_DEFAULTS, RunConfig


@pytest.mark.parametrize("name,attr", [("fedadam", "eta"), ("fedyogi", "eta"),
                                       ("fedavgm", "server_learning_rate"),
                                       ("scaffold", "server_lr")])
def test_server_lr_default_comes_from_the_sweep_table_and_an_explicit_value_wins(name, attr):
    assert getattr(build_strategy(RunConfig(strategy=name)), attr) == SERVER_LR_DEFAULTS[name]
    assert getattr(build_strategy(RunConfig(strategy=name, server_lr=0.37)), attr) == 0.37


def test_fedavgm_momentum_is_the_run_configs():
    assert build_strategy(RunConfig(strategy="fedavgm", server_momentum=0.5)).server_momentum == 0.5
