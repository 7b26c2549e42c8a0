"""Personalisation: local fine-tuning after the last round and Ditto's personal models, each scored on
the site's own test split and logged under ``personalised``.

Two rounds in-process (``fl_helpers.LocalGrid``: the real ClientApp with a per-node ``ctx.state``) on
tiny cohorts.
"""

from __future__ import annotations

import json

import pytest
import torch
from fl_helpers import run_config

from server.rounds import run_rounds
from shared.config import RunConfig

SITES = (2, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_finetune_scores_a_tuned_copy_in_the_last_round_and_leaves_the_global_model(
        tmp_path, sites_root, make_grid, monkeypatch):
    import client.site

    seen: list[tuple[dict, dict, dict]] = []  # (global before, global after, personal)
    real = client.site.personal_model

    def spy(config, run, state, site, global_model, core, cfg):
        before = _state(global_model)
        personal = real(config, run, state, site, global_model, core, cfg)
        if personal is not None:
            seen.append((before, _state(global_model), _state(personal)))
        return personal

    monkeypatch.setattr(client.site, "personal_model", spy)
    cfg = run_config(tmp_path / "run", sites_root, personalise="finetune",
                     **{"finetune-epochs": 1})
    grid = make_grid(cfg, n=2)
    grid.node_configs[101]["min-report-cases"] = 100  # site 1: too few test cases to report
    result = run_rounds(grid, RunConfig.from_flower(cfg))

    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"
             and m.content["config"].get("eval-split", "test") == "test"]
    flags = {int(m.content["config"]["server-round"]): int(m.content["config"].get("personalise", 0))
             for m in evals}
    assert flags == {1: 0, 2: 1}  # fine-tuning is asked for in the last round only
    # only the reporting site fine-tuned; its tuned copy moved, the global model it got did not
    assert len(seen) == 1
    before, after, personal = seen[0]
    assert not _differs(before, after) and _differs(before, personal)
    # the scores come back, are pooled with n and a CI, and sit beside the global model's
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert "personalised" not in rows[0]
    p = rows[1]["personalised"]
    assert p["mode"] == "finetune" and set(p["sites"]) == {"site-0"}
    assert p["pooled"]["num_examples"] == 4 and set(p["pooled_ci"]) >= {"accuracy"}
    assert "site-1" in rows[1]["withheld"]  # its global metrics are withheld too
    own = [m for m in grid.replies if m.metadata.message_type == "evaluate"
           and "personal-metrics" in m.content]
    assert len(own) == 1 and own[0].content["personal-metrics"]["score-hist"] != \
        own[0].content["metrics"]["score-hist"]  # a different model was scored
    assert p["gain"]["site-0"] == pytest.approx(  # on the headline metric (grading: AUC)
        p["sites"]["site-0"]["auc"] - rows[1]["sites"]["site-0"]["auc"])
    assert result.rounds[-1]["personalised"]["pooled"]["auc"] == p["pooled"]["auc"]
    # the report shows them, next to the global model's score on the same site
    from server.report import write_run_report

    page = write_run_report(tmp_path / "run").read_text()
    assert "<h2>Personalised models</h2>" in page and "finetune: each site" in page
    assert "n = 4 test cases" in page


def test_ditto_personal_model_persists_in_ctx_state_across_rounds(tmp_path, sites_root, make_grid,
                                                                 monkeypatch):
    import client.site
    from shared.learning import learning_core

    core = learning_core()
    starts: list[tuple[str, dict, dict]] = []  # Ditto trainings: (site, start weights, anchor)

    def train(model, samples, spec, cfg, **kw):
        if kw.get("proximal_mu") == 0.5:  # the Ditto calls (ditto-lambda below)
            starts.append((samples[0].case_id.split("-")[0], _state(model),
                           {k: v.clone() for k, v in kw["global_state"].items()}))
        return core.train(model, samples, spec, cfg, **kw)

    monkeypatch.setattr(client.site, "learning_core", lambda: core.__class__(
        core.make_config, core.build_model, train, core.evaluate))
    cfg = run_config(tmp_path / "run", sites_root, personalise="ditto", **{"ditto-lambda": 0.5})
    grid = make_grid(cfg, n=2)
    kept: dict[int, dict[int, dict]] = {}

    def after(rnd, row):
        kept[rnd] = {n: grid.states[n]["ditto-model"].to_torch_state_dict() for n in (100, 101)}

    result = run_rounds(grid, RunConfig.from_flower(cfg), on_round_end=after)
    assert sorted(s for s, _, _ in starts) == ["S0", "S0", "S1", "S1"]  # each site, each round
    # round 1 starts from the received global model; round 2 from the site's own kept model
    for name, node in (("S0", 100), ("S1", 101)):
        (_, start1, anchor1), (_, start2, anchor2) = [x for x in starts if x[0] == name]
        assert not _differs({k: start1[k] for k in anchor1}, anchor1)
        assert not _differs(start2, kept[1][node])
        assert _differs({k: start2[k] for k in anchor2}, anchor2)
        assert _differs(kept[2][node], kept[1][node])  # and it trained on
    # every round's evaluation scores the personal models too
    for row in result.rounds:
        assert row["personalised"]["mode"] == "ditto"
        assert set(row["personalised"]["sites"]) == {"site-0", "site-1"}
        assert row["personalised"]["pooled"]["num_examples"] == 8


def test_personalise_options_are_checked():
    with pytest.raises(ValueError, match="personalise='local'"):
        RunConfig(personalise="local")
    with pytest.raises(ValueError, match='personalise = "ditto" cannot be combined with secagg'):
        RunConfig(personalise="ditto", secagg=True)
    with pytest.raises(ValueError, match="finetune-epochs=0"):
        RunConfig(personalise="finetune", finetune_epochs=0)
