"""One source of defaults and one parse: RunConfig, pyproject's app config, the simulation's defaults."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest

from shared.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_equals_runconfig_defaults_key_by_key():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_flower()
    assert list(app_config) == list(defaults)  # same keys, same order as the dataclass fields
    for key, value in defaults.items():
        assert app_config[key] == value and type(app_config[key]) is type(value), key


def test_simulate_cli_defaults_are_simulation_spec_defaults():
    from gliofed.commands.simulate import simulate
    from simulations.runner import SimulationSpec

    spec = SimulationSpec()
    params = inspect.signature(simulate).parameters
    shared = [name for name, p in params.items()
              if hasattr(spec, name) and p.default is not inspect.Parameter.empty]  # --out is required
    assert len(shared) >= 15
    for name in shared:
        assert params[name].default == getattr(spec, name), name
    # the simulation's own defaults are the named exceptions; the rest are RunConfig's
    run = RunConfig()
    assert (spec.strategy, spec.lr, spec.batch_size, spec.seed, spec.local_epochs) == (
        run.strategy, run.lr, run.batch_size, run.seed, run.local_epochs)
    assert (spec.rounds, run.num_server_rounds) == (5, 3)


def test_simulation_run_config_is_typed_and_carries_the_spec(tmp_path):
    from simulations.runner import SimulationSpec, run_config_for

    spec = SimulationSpec(out=tmp_path / "run", extra={"dp": "opacus", "proximal-mu": "0.5"})
    run = run_config_for(spec, tmp_path / "sites")
    assert isinstance(run, RunConfig)
    assert (run.num_server_rounds, run.network, run.input_size, run.dp, run.proximal_mu) == (
        5, "resnet10", 32, "opacus", 0.5)
    with pytest.raises(ValueError, match="strategy='fedfoo' is not one of fedavg"):
        run_config_for(SimulationSpec(out=tmp_path, strategy="fedfoo"), tmp_path / "sites")


def test_option_combinations_are_refused_when_the_config_is_built():
    with pytest.raises(ValueError, match="strategy='fedfoo'"):
        RunConfig(strategy="fedfoo")
    with pytest.raises(ValueError, match="dp='central' cannot be combined with strategy='krum'"):
        RunConfig().replace(dp="central", strategy="krum")
    with pytest.raises(ValueError, match="quorum-action='wait'"):
        RunConfig.from_flower({"quorum-action": "wait"})
    base = RunConfig(task="typing")
    assert base.overridden({}) is base
    assert base.overridden({"lr": "0.01"}) == base.replace(lr=0.01)


def test_a_site_parses_its_configs_once_per_process():
    from types import SimpleNamespace

    from client import app

    base = RunConfig(task="typing")
    node = {"partition-id": 1, "num-partitions": 2, "data-path": "/data/a"}
    ctx = SimpleNamespace(run_config={"lr": 0.01}, node_config=node)
    app._parse.cache_clear()
    first = app.site_configs(ctx, base)
    again = app.site_configs(SimpleNamespace(run_config={"lr": 0.01}, node_config=dict(node)), base)
    assert again == first and app._parse.cache_info().hits == 1  # parsed once, then reused
    run, site = first
    assert (run.task, run.lr, site.data_path, site.site_id) == ("typing", 0.01, "/data/a", "a")
    other = SimpleNamespace(run_config={"lr": 0.02}, node_config={"data-path": "/data/a"})
    assert app.site_configs(other, base)[0].lr == 0.02
