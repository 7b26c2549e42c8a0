"""FedBN: normalisation layers (BatchNorm, GroupNorm, InstanceNorm) never leave a site, survive in the
site's ``ctx.state`` to the next round, and the server averages only the rest.

Two rounds in-process (``fl_helpers.LocalGrid``: the real ClientApp with a per-node ``ctx.state``) on
tiny cohorts, with a BatchNorm network (``unet_encoder``) and a GroupNorm one (``small_cnn``).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from fl_helpers import run_config

from server.fedbn import norm_keys_for
from server.model import initial_arrays
from server.rounds import run_rounds
from shared.config import RunConfig

SITES = (2, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_norm_keys_are_every_batch_group_and_instance_norm_entry():
    from torch import nn

    from shared.fedbn import norm_keys

    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.GroupNorm(2, 4),
                          nn.InstanceNorm3d(4, affine=True, track_running_stats=True), nn.Flatten(),
                          nn.LazyLinear(2))
    assert norm_keys(model) == [
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "2.weight", "2.bias",
        "3.weight", "3.bias", "3.running_mean", "3.running_var", "3.num_batches_tracked"]


@pytest.mark.parametrize("network", ["unet_encoder", "small_cnn"])  # BatchNorm3d / GroupNorm
def test_fedbn_norm_layers_stay_at_the_site_survive_rounds_and_the_rest_averages(
        tmp_path, sites_root, make_grid, monkeypatch, network):
    import client.site

    loaded: list[tuple[str, str, int, dict]] = []  # (kind, site, round, norm weights the model got)
    real = client.site.load_received

    def spy(model, arrays, run, state=None):
        received = real(model, arrays, run, state)
        caller = inspect.stack()[1]  # train_site or evaluate_site: its locals say site and round
        local = caller.frame.f_locals
        kind = "train" if caller.function == "train_site" else local["split"]
        weights = model.state_dict()
        loaded.append((kind, local["site"].site_id, int(local["content"]["config"]["server-round"]),
                       {k: weights[k].clone() for k in keys}))
        return received

    cfg = run_config(tmp_path / "run", sites_root, network=network, fedbn=True)
    run = RunConfig.from_flower(cfg)
    keys = sorted(norm_keys_for(run))
    assert keys and (network != "unet_encoder" or any(k.endswith("running_mean") for k in keys))
    monkeypatch.setattr(client.site, "load_received", spy)
    saved: dict[int, dict] = {}
    grid = make_grid(cfg, n=2)

    def after(rnd, row):  # the site's own norm weights in ctx.state after each round
        saved[rnd] = {n: grid.states[n]["fedbn-norm"].to_torch_state_dict() for n in (100, 101)}

    result = run_rounds(grid, run, on_round_end=after)
    init = initial_arrays(run).to_torch_state_dict()

    # 1. the norm keys never leave a site: every train reply carries exactly the other weights
    replies = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert len(replies) == 4 and not any(m.has_error() for m in replies)
    for m in replies:
        assert set(m.content["arrays"].keys()) == set(init) - set(keys)

    # 2. the site keeps its own: trained (not the initial values), different per site, and each
    #    round's training and evaluation starts from what the site kept, not the global values
    for rnd in (1, 2):
        own = saved[rnd]
        assert set(own[100]) == set(keys)
        assert any(not torch.equal(own[100][k], init[k]) for k in keys)
        assert any(not torch.equal(own[100][k], own[101][k]) for k in keys)
    by_site = {"site-0": 100, "site-1": 101}
    for kind, site, rnd, norm in loaded:
        expected = (init if kind == "train" and rnd == 1 else
                    saved[rnd - 1][by_site[site]] if kind == "train" else saved[rnd][by_site[site]])
        assert all(torch.equal(norm[k], expected[k]) for k in keys), (kind, site, rnd)
    assert {(k, r) for k, _, r, _ in loaded} == {(k, r) for k in ("train", "val", "test")
                                                 for r in (1, 2)}

    # 3. the server never changes its norm layers and averages the rest, weighted by examples
    final = result.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], init[k]) for k in keys)
    last = replies[2:]
    n = [float(m.content["metrics"]["num-examples"]) for m in last]
    for k in set(final) - set(keys):
        parts = [m.content["arrays"][k].numpy() for m in last]
        expected = sum(w * torch.from_numpy(p).double() for w, p in zip(n, parts)) / sum(n)
        torch.testing.assert_close(final[k].double(), expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(final[k], init[k]) for k in set(final) - set(keys))


def test_fedbn_refuses_the_options_that_need_the_whole_update():
    with pytest.raises(ValueError, match="fedbn = true cannot be combined with secagg = true"):
        RunConfig(fedbn=True, secagg=True)
    with pytest.raises(ValueError, match='fedbn = true cannot be combined with dp = "central"'):
        RunConfig(fedbn=True, dp="central")
