"""SCAFFOLD: the server variate is the mean of the sites' variates, the sites keep theirs in
``ctx.state``, the server's survives a resume (checkpoint), and each local step is corrected.

Two rounds in-process (``fl_helpers.LocalGrid``: the real ClientApp with a per-node ``ctx.state``) on
tiny cohorts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_helpers import run_config

from server.checkpoint import read_round
from server.rounds import run_rounds
from shared.config import RunConfig

SITES = (2, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


def _site_variates(grid) -> list[dict[str, torch.Tensor]]:
    return [grid.states[n]["scaffold-ci"].to_torch_state_dict() for n in sorted(grid.states)]


def test_scaffold_variates_update_live_at_the_sites_and_the_server_one_survives_resume(
        tmp_path, sites_root, make_grid):
    cfg = run_config(tmp_path / "run", sites_root, strategy="scaffold")
    grid = make_grid(cfg, n=2)
    c_after: dict[int, dict[str, np.ndarray]] = {}
    ci_after: dict[int, list[dict[str, torch.Tensor]]] = {}

    def after(rnd, row):
        c_after[rnd] = read_round(tmp_path / "run", rnd).strategy_state["control_variate"]
        ci_after[rnd] = _site_variates(grid)
        if rnd == 1:
            raise KeyboardInterrupt("server killed after round 1")

    with pytest.raises(KeyboardInterrupt):
        run_rounds(grid, RunConfig.from_flower(cfg), on_round_end=after)

    # round 1 went out with c = 0 (nothing yet) and came back with each site's variate update
    train_out = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_out) == 2 and all(len(m.content["scaffold-c"]) == 0 for m in train_out)
    replies = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert all("scaffold-delta" in m.content and not m.has_error() for m in replies)

    # the variates moved from zero: c_i at each site (different per site), c = their mean (2 sites)
    c1, sites1 = c_after[1], ci_after[1]
    params = {n for n, _ in _model(cfg).named_parameters()}
    assert set(c1) == params and all(set(ci) == params for ci in sites1)
    assert all(float(np.abs(v).sum()) > 0 for v in c1.values())
    assert any(not torch.equal(sites1[0][k], sites1[1][k]) for k in params)
    for k in params:
        mean = (sites1[0][k] + sites1[1][k]).numpy() / 2
        np.testing.assert_allclose(c1[k], mean, rtol=1e-5, atol=1e-6)

    # resume: the server variate comes back from the checkpoint and goes out with round 2; the
    # sites (same processes, same ctx.state) correct round 2 with c - c_i and update c_i again
    resumed_cfg = {**cfg, "resume": True}
    grid.sent.clear()
    grid.replies.clear()
    result = run_rounds(grid, RunConfig.from_flower(resumed_cfg), on_round_end=after)
    assert [r["round"] for r in result.rounds] == [1, 2]
    sent2 = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(sent2) == 2
    for m in sent2:
        got = m.content["scaffold-c"].to_torch_state_dict()
        assert set(got) == params
        assert all(np.array_equal(got[k].numpy(), c1[k]) for k in params)
    c2, sites2 = c_after[2], ci_after[2]
    assert any(not np.array_equal(c2[k], c1[k]) for k in params)
    for i in (0, 1):
        assert any(not torch.equal(sites2[i][k], sites1[i][k]) for k in params)
    for k in params:  # every site trained every round: c stays the mean of the c_i
        np.testing.assert_allclose(c2[k], (sites2[0][k] + sites2[1][k]).numpy() / 2,
                                   rtol=1e-4, atol=1e-5)


def _model(cfg):
    from shared.learning import learning_core, train_config_for
    from shared.tasks import get_task

    run = RunConfig.from_flower(cfg)
    return learning_core().build_model(get_task(run.task), train_config_for(run, device="cpu"))


def test_each_local_step_is_corrected_by_c_minus_ci(tmp_path, sites_root):
    """One local step with the correction lands exactly ``lr * (c - c_i)`` away from the same step
    without it (same batch, same gradient), on a real site's training data."""
    from client.site import load_site
    from shared.config import NodeConfig
    from shared.learning import learning_core, train_config_for
    from shared.training.scaffold import ScaffoldCorrection, parameter_names

    run = RunConfig.from_flower(run_config(tmp_path / "run", sites_root, **{"batch-size": 64}))
    site = load_site(run, NodeConfig.from_flower({"partition-id": 0}, run))
    core, cfg = learning_core(), train_config_for(run, device="cpu", epochs=1)
    start = _model(run_config(tmp_path / "run", sites_root)).state_dict()
    plain, corrected = core.build_model(site.spec, cfg), core.build_model(site.spec, cfg)
    plain.load_state_dict(start)
    corrected.load_state_dict(start)
    names = parameter_names(corrected)
    gen = torch.Generator().manual_seed(3)
    c = {n: torch.randn(p.shape, generator=gen) for n, p in corrected.named_parameters()}
    c_i = {n: torch.randn(p.shape, generator=gen) for n, p in corrected.named_parameters()}
    hook = ScaffoldCorrection(c, c_i, names, run.lr, reference=start)
    core.train(plain, site.train, site.spec, cfg, epochs=1)
    core.train(corrected, site.train, site.spec, cfg, epochs=1, after_step=hook)
    assert hook.steps == 1  # batch 64 > the site's training cases: one step
    a, b = dict(plain.named_parameters()), dict(corrected.named_parameters())
    for n in names:
        torch.testing.assert_close(b[n].detach() - a[n].detach(), -run.lr * (c[n] - c_i[n]),
                                   rtol=1e-4, atol=1e-6)
    # option II: c_i+ = c_i - c + (x - y) / (K lr)
    new, delta = hook.new_variates(start, corrected)
    n0 = names[0]
    expected = c_i[n0] - c[n0] + (start[n0] - b[n0].detach()) / run.lr
    torch.testing.assert_close(new[n0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(delta[n0], new[n0] - c_i[n0])


@pytest.mark.parametrize("combo", [{"secagg": True}, {"dp": "central"}])
def test_scaffold_refuses_secagg_and_central_dp(combo):
    with pytest.raises(ValueError, match="strategy = scaffold cannot be combined"):
        RunConfig(strategy="scaffold", **combo)
