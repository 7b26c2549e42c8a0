"""Federation tests: strategies, quorum deadline, crash-proof sites, message privacy, resume, pooled metrics.

Rounds run in-process through ``fl_helpers.LocalGrid`` (the real ClientApp and round loop, no Ray) on a
tiny 16^3 cohort with the learning core's ``small_cnn``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from fl_helpers import fail_in_training, run_config, write_tiny_cohort

from server.quorum import QuorumError, wait_for_quorum
from server.rounds import run_rounds
from server.strategy import STRATEGIES, build_strategy
from shared.config import NodeConfig, RunConfig

SITES = (3, 16)  # sites_root (tests/conftest.py): 3 sites of 16 cases
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_strategy_builds_and_unknown_is_named():
    for name in STRATEGIES:
        assert type(build_strategy(RunConfig(strategy=name))).__name__.lower() == name
    with pytest.raises(ValueError, match="strategy='fedfoo' is not one of fedavg"):
        build_strategy(RunConfig(strategy="fedfoo"))


def test_run_config_parses_kebab_case_and_rejects_unknown_keys():
    cfg = RunConfig.from_flower({"num-server-rounds": "4", "secagg": "true", "proximal-mu": 0.1})
    assert (cfg.num_server_rounds, cfg.secagg, cfg.proximal_mu) == (4, True, 0.1)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    with pytest.raises(ValueError, match="unknown key 'num-rounds'"):
        RunConfig.from_flower({"num-rounds": 3})
    with pytest.raises(ValueError, match="dp='laplace'"):
        RunConfig.from_flower({"dp": "laplace"})
    node = NodeConfig.from_flower({"partition-id": 2}, cfg.replace(sites_root="/data/sites"))
    assert node.data_path == "/data/sites/site-2" and node.site_id == "site-2"


def test_quorum_deadline_proceeds_or_stops_without_hanging(tmp_path, sites_root, make_grid):
    grid = make_grid(run_config(tmp_path, sites_root))
    grid.offline = {101, 102}
    run = RunConfig.from_flower(run_config(tmp_path, sites_root, **{
        "min-available-nodes": 3, "quorum-timeout": 0.6}))
    t0 = time.monotonic()
    assert wait_for_quorum(grid, run, sleep_s=0.1) == [100]
    assert 0.5 < time.monotonic() - t0 < 3
    with pytest.raises(QuorumError, match="quorum not reached: 1 of 3 sites connected after 0.6 s"):
        wait_for_quorum(grid, run.replace(quorum_action="stop"), sleep_s=0.1)


def test_sites_without_data_or_that_raise_answer_errors_and_the_run_goes_on(tmp_path, sites_root,
                                                                          make_grid):
    broken = write_tiny_cohort(tmp_path / "broken", n_cases=8, seed=5, site="B")
    cfg = run_config(tmp_path / "run", sites_root, **{"num-server-rounds": 1})
    grid = make_grid(cfg, n=2, extra={7: {"data-path": str(tmp_path / "missing")},
                                  8: {"data-path": str(broken), "site-id": "broken"}})
    fail_in_training(grid, broken)
    result = run_rounds(grid, RunConfig.from_flower(cfg))
    row = result.rounds[0]
    assert row["replied"] == 2 and row["failed"] == 1  # node 7 was never sampled: query failed
    assert sorted(result.sites) == ["site-0", "site-1"]
    errors = {(r.metadata.src_node_id, r.metadata.message_type): r.error.reason
              for r in grid.replies if r.has_error()}
    # fixed words only: the paths and the exception texts stay in the sites' logs
    assert errors == {(7, "query"): "cohort-unreadable", (8, "train"): "internal-error",
                      (8, "evaluate"): "internal-error"}


def _walk(value, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(str(k))
            _walk(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk(v, out)
    else:
        out.append(str(value))


def test_no_message_to_the_server_carries_ids_paths_or_images(tmp_path, sites_root, make_grid):
    cfg = run_config(tmp_path / "run", sites_root, **{"num-server-rounds": 1})
    grid = make_grid(cfg)
    run_rounds(grid, RunConfig.from_flower(cfg))
    from shared.cohort import read_cohort

    forbidden = set()
    for i in range(3):
        for case in read_cohort(sites_root / f"site-{i}").cases:
            forbidden |= {case.case_id, case.patient_id, *map(str, case.images.values())}
    model_keys = set(next(m for m in grid.sent if "arrays" in m.content).content["arrays"].keys())
    assert len(grid.replies) >= 9  # query + train + evaluate from 3 sites
    for reply in grid.replies:
        if reply.has_error():
            texts = [reply.error.reason]
        else:
            texts = []
            for name, record in reply.content.items():
                assert name in ("arrays", "metrics", "eligible", "config"), name
                if name == "arrays":  # only the model's own tensors, same shapes as sent
                    assert set(record.keys()) == model_keys
                    continue
                _walk(dict(record), texts)
        for text in texts:
            assert not any(f in text for f in forbidden), text
            assert "/" not in text and ".nii" not in text, text
    for reply in grid.replies:
        if not reply.has_error() and "metrics" in reply.content:
            for key, value in reply.content["metrics"].items():
                if isinstance(value, list):  # only count vectors: confusion and histograms
                    assert key in ("confusion", "score-hist") and all(float(v).is_integer()
                                                                      for v in value)


@pytest.mark.parametrize("strategy", ["fedadam"])
def test_resume_after_a_crash_gives_bitwise_identical_weights(tmp_path, sites_root, make_grid,
                                                              strategy):
    over = {"num-server-rounds": 3, "strategy": strategy}
    full_cfg = run_config(tmp_path / "full", sites_root, **over)
    full = run_rounds(make_grid(full_cfg), RunConfig.from_flower(full_cfg))

    cfg = run_config(tmp_path / "crash", sites_root, **over)

    def crash(rnd, row):
        if rnd == 2:
            raise KeyboardInterrupt("server killed after round 2")

    with pytest.raises(KeyboardInterrupt):
        run_rounds(make_grid(cfg), RunConfig.from_flower(cfg), on_round_end=crash)
    rows = [json.loads(x) for x in (tmp_path / "crash" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    resumed_cfg = {**cfg, "resume": True}
    resumed = run_rounds(make_grid(resumed_cfg), RunConfig.from_flower(resumed_cfg))
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    a, b = full.arrays.to_torch_state_dict(), resumed.arrays.to_torch_state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "crash" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "rounds.jsonl").read_text().splitlines()]
    assert rows[2]["pooled"] == full_rows[2]["pooled"]


def test_pooled_metrics_equal_metrics_on_the_concatenated_test_set():
    from server.pooled import round_metrics
    from shared.training.metrics import confusion, metrics_from_pooled, score_histograms

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    probs = rng.dirichlet([1, 1, 1], 90)
    probs[np.arange(90), labels] += 0.5
    probs /= probs.sum(1, keepdims=True)
    sites = {}
    for s, idx in enumerate(np.array_split(np.arange(90), [20, 55])):
        conf = confusion(labels[idx], probs[idx].argmax(1), 3)
        sites[f"s{s}"] = {"num-examples": len(idx), "accuracy": float(np.trace(conf) / len(idx)),
                          "confusion": conf.reshape(-1).tolist(), "num-classes": 3,
                          "score-hist": score_histograms(probs[idx], labels[idx], 3).reshape(-1).tolist()}
    out = round_metrics(sites)
    whole = metrics_from_pooled(confusion(labels, probs.argmax(1), 3),
                                score_histograms(probs, labels, 3), ["0", "1", "2"])
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert out["pooled"][key] == pytest.approx(whole[key], abs=1e-12)
    assert out["pooled"]["num_examples"] == 90
    assert out["weighted"]["accuracy"] == pytest.approx(whole["accuracy"])
    assert 0.5 < out["pooled"]["auc"] <= 1.0


def test_serve_evaluates_centrally_logs_rounds_and_exports_a_bundle_with_provenance(
        tmp_path, sites_root, make_grid):
    from server.app import serve

    cfg = run_config(tmp_path / "run", sites_root, **{
        "num-server-rounds": 1, "server-cohort": str(sites_root / "site-0"), "strategy": "fedprox"})
    grid = make_grid(cfg, n=2)
    model_dir = serve(grid, cfg)
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train_msgs and all(m.content["config"]["proximal-mu"] == 0.01 for m in train_msgs)
    # what every site knows from the run config is not sent again (task, local-epochs)
    assert not any({"task", "local-epochs"} & set(m.content["config"]) for m in train_msgs)
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert len(queries) == 2 and all(len(m.content) == 0 for m in queries)
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[0])
    # central evaluation = the exported global model scored on site-0's test split
    from shared.cohort import read_cohort
    from shared.learning import train_config_for
    from shared.tasks import get_task, select_samples
    from shared.training import evaluate_model
    from shared.training.bundle import load_bundle

    spec = get_task("grading")
    test, _ = select_samples(spec, read_cohort(sites_root / "site-0"), split="test")
    ev = evaluate_model(load_bundle(model_dir)[0], test, spec,
                        train_config_for(RunConfig.from_flower(cfg)))
    assert row["central"]["num_examples"] == len(test) == 4
    assert row["central"]["accuracy"] == pytest.approx(ev.metrics["accuracy"])
    assert set(row["sites"]) == {"site-0", "site-1"}
    assert row["bytes"]["train_sent"] > 2 * row["bytes"]["model"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    meta = json.loads((model_dir / "configs" / "metadata.json").read_text())
    prov = json.dumps(meta)
    assert '"strategy": "fedprox"' in prov and '"site-0"' in prov and '"dp": "none"' in prov


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_a_round_and_changes_the_weights(tmp_path, sites_root, make_grid,
                                                             strategy):
    from server.model import initial_arrays

    cfg = run_config(tmp_path / "run", sites_root, **{"num-server-rounds": 1, "strategy": strategy})
    run = RunConfig.from_flower(cfg)
    result = run_rounds(make_grid(cfg), run)
    assert result.rounds[0]["replied"] == 3
    before, after = initial_arrays(run).to_torch_state_dict(), result.arrays.to_torch_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pooled = result.rounds[0]["pooled"]
    assert pooled["num_examples"] == 3 * 4  # every site's test split (4 cases each), pooled
    assert pooled["accuracy"] * 12 == pytest.approx(round(pooled["accuracy"] * 12))  # k of 12


def test_round_metrics_carry_bootstrap_cis_of_the_pooled_counts():
    from server.evalci import bootstrap_cis
    from server.pooled import round_metrics
    from shared.training.metrics import confusion, score_histograms

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    probs = np.stack([1 - probs, probs], 1)
    sites, confs, hists = {}, [], []
    for s, idx in enumerate(np.array_split(np.arange(60), [25])):
        conf = confusion(labels[idx], probs[idx].argmax(1), 2)
        hist = score_histograms(probs[idx], labels[idx], 2)
        confs.append(conf)
        hists.append(hist)
        sites[f"s{s}"] = {"num-examples": len(idx), "confusion": conf.reshape(-1).tolist(),
                          "num-classes": 2, "score-hist": hist.reshape(-1).tolist()}
    out = round_metrics(sites)
    pooled = bootstrap_cis(sum(confs), sum(hists))
    assert out["ci"]["pooled"] == pooled
    lo, hi = out["ci"]["pooled"]["auc"]
    assert lo < out["pooled"]["auc"] < hi and hi - lo < 0.4
    assert out["ci"]["sites"]["s0"] == bootstrap_cis(confs[0], hists[0])
    # the smaller site's interval is wider than the pooled one (fewer cases)
    s_lo, s_hi = out["ci"]["sites"]["s0"]["auc"]
    assert s_hi - s_lo > hi - lo
