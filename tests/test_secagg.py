"""Secure aggregation (SecAgg+): same trainer, the server sees only the sum, dropouts, refused options.

The fast tests run the real ServerApp loop (``server.app.serve``) and the real ClientApp in-process
through ``fl_helpers.LocalGrid``, with every message passed through Flower's protobuf serialisation as
on the wire (SecAgg+ sends one content object to several sites, and the sites' mod edits what it
receives). The Ray simulation test is marked ``integration``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fl_helpers import LocalGrid, fail_in_training, run_config, write_tiny_cohort

from shared.config import RunConfig


class WireGrid(LocalGrid):
    """LocalGrid whose messages and replies are serialised and parsed again, as over gRPC."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.serde import message_from_proto, message_to_proto

        copies = [message_from_proto(message_to_proto(m)) for m in messages]
        return [message_from_proto(message_to_proto(r))
                for r in super().send_and_receive(copies, timeout=timeout)]


SITES = (4, 12)  # sites_root (tests/conftest.py): 4 sites of 12 cases
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def grid_of(make_grid):
    """``grid_of(cfg, n=4, extra=None)``: a WireGrid of the module's 4 sites (plus ``extra`` nodes)."""
    return lambda cfg, n=4, extra=None: make_grid(cfg, n=n, extra=extra, cls=WireGrid)


def _max_diff(a, b) -> float:
    a, b = (x if isinstance(x, dict) else x.to_torch_state_dict() for x in (a, b))
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _round_weights(run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    """The global weights after round ``rnd`` (from the run's per-round checkpoint)."""
    from server.checkpoint import read_round

    weights = read_round(run_dir, rnd).weights
    return {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}


@pytest.fixture(scope="module")
def plain_run(sites_root, tmp_path_factory):
    """The same federation without SecAgg+ (2 rounds, 4 sites): (result, run folder). On one torch
    thread like the SecAgg+ runs (the module's ``one_thread`` is function-scoped, so it is not yet in
    force when this module-scoped fixture runs; 2 threads round differently and AdamW magnifies it)."""
    import torch

    from server.rounds import run_rounds

    run_dir = tmp_path_factory.mktemp("plain")
    cfg = run_config(run_dir, sites_root, **{"min-available-nodes": 4})
    nodes = {100 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_rounds(WireGrid(nodes, cfg), RunConfig.from_flower(cfg)), run_dir
    finally:
        torch.set_num_threads(before)


def test_secagg_run_equals_plain_fedavg_and_no_update_leaves_a_site_in_clear(
        tmp_path, sites_root, plain_run, grid_of):
    from server.app import serve
    from server.model import initial_arrays
    from server.runlog import read_rounds

    cfg = run_config(tmp_path / "run", sites_root, **{"min-available-nodes": 4, "secagg": True})
    grid = grid_of(cfg)
    model_dir = serve(grid, cfg)

    rows = read_rounds(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert (row["sampled"], row["replied"], row["failed"]) == (4, 4, 0)
        assert row["secagg"] == {"num_shares": 4, "reconstruction_threshold": 3,
                                 "max_weight": 6.0, "unmasked": True}  # 8 train, 2 to val
        assert set(row["sites"]) == {f"site-{i}" for i in range(4)}
        assert row["pooled"]["num_examples"] == 4 * 4  # each site's 4 test cases, pooled
        assert row["bytes"]["train_received"] > 0 and row["train"]["train-loss"] > 0
    meta = json.loads((model_dir / "configs" / "metadata.json").read_text())
    assert meta["provenance"]["privacy"]["secagg"] is True
    assert meta["provenance"]["num_sites"] == 4

    # the secure sum is the plain FedAvg mean of the same updates, up to SecAgg+'s quantisation
    # (~3e-6 here); later rounds only stay close: AdamW's first steps (lr * sign of the gradient)
    # turn such differences into up to lr on near-zero gradients
    plain, plain_dir = plain_run
    start = initial_arrays(RunConfig.from_flower(cfg))
    assert _max_diff(_round_weights(plain_dir, 1), start) > 1e-3  # training moved the weights
    assert _max_diff(_round_weights(tmp_path / "run", 1), _round_weights(plain_dir, 1)) < 2e-5
    assert _max_diff(_round_weights(tmp_path / "run", 2), plain.arrays) < 0.02
    assert rows[-1]["pooled"]["accuracy"] == pytest.approx(
        plain.rounds[-1]["pooled"]["accuracy"], abs=0.1)

    # what the server received from training: masked vectors, never a site's weights or update
    train_replies = [r for r in grid.replies if not r.has_error() and
                     r.metadata.message_type == "train"]
    assert len(train_replies) == 2 * 4 * 4  # 2 rounds x 4 SecAgg+ stages x 4 sites
    for reply in train_replies:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        assert "arrays" not in reply.content


def test_a_site_that_fails_while_training_is_unmasked_from_the_others_shares(tmp_path, sites_root,
                                                                            plain_run, grid_of):
    from server.rounds import run_rounds

    broken = write_tiny_cohort(tmp_path / "broken", n_cases=8, seed=9, site="B")
    cfg = run_config(tmp_path / "run", sites_root, **{"min-available-nodes": 5, "secagg": True})
    grid = grid_of(cfg, extra={9: {"data-path": str(broken), "site-id": "broken"}})
    fail_in_training(grid, broken)  # passes the eligibility query, fails in training
    result = run_rounds(grid, RunConfig.from_flower(cfg))

    for row in result.rounds:
        assert (row["sampled"], row["replied"], row["failed"]) == (5, 4, 1)
        assert row["secagg"]["reconstruction_threshold"] == 3 and row["secagg"]["unmasked"]
    assert result.sites == [f"site-{i}" for i in range(4)]
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert errors and all(str(tmp_path) not in e for e in errors)
    # the dropped site's masks were removed: the result is the mean of the 4 healthy sites
    assert _max_diff(_round_weights(tmp_path / "run", 1), _round_weights(plain_run[1], 1)) < 2e-5


def test_round_plan_and_too_many_dropouts_halt_without_changing_the_model(tmp_path, sites_root, grid_of):
    from server.rounds import run_rounds
    from server.secagg import secagg_plan

    run = RunConfig(secagg=True)
    assert secagg_plan(run, 2) == (2, 2)
    assert secagg_plan(run, 5) == (5, 3)
    assert secagg_plan(run.replace(secagg_num_shares=3), 10) == (3, 2)
    assert secagg_plan(run.replace(secagg_reconstruction_threshold=4), 6) == (6, 4)
    with pytest.raises(RuntimeError, match="at least 2 sites"):
        secagg_plan(run, 1)
    with pytest.raises(RuntimeError, match="threshold=4 needs at least 4 sites"):
        secagg_plan(run.replace(secagg_reconstruction_threshold=4), 3)

    # 2 sites, threshold 2: a site that fails in training leaves too few shares to unmask
    from server.model import initial_arrays

    cfg = run_config(tmp_path / "run", sites_root, **{"secagg": True, "num-server-rounds": 1})
    grid = grid_of(cfg, n=1, extra={9: {"data-path": str(tmp_path / "b"), "site-id": "b"}})
    write_tiny_cohort(tmp_path / "b", n_cases=4, seed=3, site="B")
    fail_in_training(grid, tmp_path / "b")
    ended = []  # the one round loop calls the same per-round hook for SecAgg+ rounds
    result = run_rounds(grid, RunConfig.from_flower(cfg),
                        on_round_end=lambda rnd, row: ended.append((rnd, row["secagg"]["unmasked"])))
    row = result.rounds[0]
    assert (row["sampled"], row["replied"], row["secagg"]["unmasked"]) == (2, 0, False)
    assert ended == [(1, False)]
    assert _max_diff(result.arrays, initial_arrays(RunConfig.from_flower(cfg))) == 0.0


def test_local_dp_and_fedprox_run_under_secagg(tmp_path, sites_root, grid_of):
    from server.rounds import run_rounds

    cfg = run_config(tmp_path / "run", sites_root, **{
        "secagg": True, "dp": "opacus", "strategy": "fedprox", "num-server-rounds": 1,
        "min-available-nodes": 4})
    grid = grid_of(cfg)
    row = run_rounds(grid, RunConfig.from_flower(cfg)).rounds[0]
    assert row["replied"] == 4 and row["secagg"]["unmasked"]
    assert row["train"]["dp-epsilon"] > 0  # each site's DP-SGD accounting still reaches the server
    fit = [m.content.config_records["fitins.config"] for m in grid.sent
           if "fitins.config" in m.content.config_records]
    assert len(fit) == 4 and all(c["proximal-mu"] == 0.01 for c in fit)


@pytest.mark.parametrize(("over", "message"), [
    ({"strategy": "krum"}, "secagg = true works with strategy fedavg or fedprox, not strategy='krum'"),
    ({"strategy": "fedadam"}, "not strategy='fedadam'"),
    ({"dp": "central"}, 'cannot be combined with dp = "central"'),
    ({"validate-updates": True}, "cannot be combined with validate-updates = true"),
    ({"secagg-num-shares": 4}, "secagg-num-shares=4 must be 0 .* or an odd number >= 3"),
    ({"secagg-num-shares": 1}, "secagg-num-shares=1"),
    ({"secagg-reconstruction-threshold": 1}, "secagg-reconstruction-threshold=1 must be 0"),
    ({"secagg-num-shares": 3, "secagg-reconstruction-threshold": 4},
     "secagg-reconstruction-threshold=4 is larger than secagg-num-shares=3"),
])
def test_refused_combinations_name_the_option(over, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flower({"secagg": True, **over})


def test_allowed_combinations_and_a_site_refuses_an_unmasked_train_request(tmp_path):
    for over in ({"dp": "opacus"}, {"strategy": "fedprox"}, {"secagg-num-shares": 5,
                 "secagg-reconstruction-threshold": 5}):
        assert RunConfig.from_flower({"secagg": True, **over}).secagg
    assert RunConfig.from_flower({"strategy": "krum", "validate-updates": True}).strategy == "krum"

    from flwr.app import RecordDict

    from client.app import train_plain
    from client.site import SiteError

    with pytest.raises(SiteError, match="secagg = true: this site sends its update only masked"):
        train_plain(RecordDict(), RunConfig(secagg=True), None)


@pytest.mark.integration
def test_secagg_in_the_ray_simulation_engine(tmp_path, sites_root):
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from server.runlog import read_rounds

    cfg = RunConfig.from_flower(run_config(tmp_path / "run", sites_root, **{
        "secagg": True, "min-available-nodes": 4, "quorum-timeout": 60.0})).to_flower()
    run_simulation(server_app=make_server_app(cfg),
                   client_app=make_client_app(cfg, {"min-report-cases": 1}),  # tiny synthetic sites
                   num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR"}})
    rows = read_rounds(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replied"] == 4 and r["secagg"]["unmasked"] for r in rows)
    assert (tmp_path / "run" / "model").is_dir()
    assert np.isfinite(rows[-1]["pooled"]["accuracy"])
