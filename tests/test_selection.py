"""Global model selection: each round's new global model scored on the sites' pooled validation splits,
the best round exported (or the final one), early stopping, and the validation split a site carves.

Rounds run in-process (``fl_helpers.LocalGrid``: the real ClientApp and round loop) on tiny cohorts.
Where a test needs a later round to score worse, the pooled validation score is replaced by a fixed
sequence after the real validation ran (``scripted_scores``); everything else is real.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fl_helpers import run_config, write_tiny_cohort

from server.checkpoint import read_round
from server.rounds import run_rounds
from shared.config import NodeConfig, RunConfig

SITES = (2, 16)  # sites_root (tests/conftest.py): 2 sites of 16 cases (4 test, 12 train of which 2 val)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scripted_scores(monkeypatch):
    """``scripted_scores([a, b, ...])``: round r's pooled validation AUC becomes the r-th value."""
    import server.rounds
    from server.selection import validate_round

    def install(values: list[float]) -> None:
        def scripted(grid, run, rnd, arrays, validators):
            out, replies, val = validate_round(grid, run, rnd, arrays, validators)
            val["pooled"]["auc"] = values[rnd - 1]
            return out, replies, val

        monkeypatch.setattr(server.rounds, "validate_round", scripted)

    return install


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from shared.training.bundle import load_bundle

    return load_bundle(model_dir)[0].state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(np.asarray(b[k])), a[k].cpu())
                                        for k in a)


def test_each_round_scores_its_own_new_global_model_on_the_pooled_validation_splits(
        tmp_path, sites_root, make_grid):
    """No one-round lag: round r's logged validation metrics are those of round r's weights."""
    from client.site import load_site
    from shared.learning import learning_core, train_config_for
    from shared.training.metrics import confusion, metrics_from_pooled, score_histograms

    cfg = run_config(tmp_path / "run", sites_root)
    run = RunConfig.from_flower(cfg)
    result = run_rounds(make_grid(cfg, n=2), run)
    sites = [load_site(run, NodeConfig.from_flower({"partition-id": i}, run)) for i in range(2)]
    val = [s for site in sites for s in site.val]
    assert len(val) == 4  # 2 patients carved per site (one per grade), 2 sites
    core = learning_core()
    tcfg = train_config_for(run)
    for row in result.rounds:
        model = core.build_model(sites[0].spec, tcfg)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in
                               read_round(run.run_dir, row["round"]).weights.items()})
        ev = core.evaluate(model, val, sites[0].spec, tcfg)
        labels = np.asarray(ev.labels)
        whole = metrics_from_pooled(confusion(labels, ev.probs.argmax(1), 2),
                                    score_histograms(ev.probs, labels, 2), ["0", "1"])
        pooled = row["val"]["pooled"]
        assert pooled["num_examples"] == 4
        for key in ("accuracy", "balanced_accuracy", "auc"):
            assert pooled[key] == pytest.approx(whole[key], abs=1e-12), (row["round"], key)
        assert row["selection"]["metric"] == "auc" and row["selection"]["n"] == 4
        assert set(row["val"]["sites"]) == {"site-0", "site-1"}
    sizes = result.rounds[0]["bytes"]
    assert 2 * sizes["model"] < sizes["val_sent"] < 2 * sizes["model"] + 1000  # model + config, 2 sites
    logged = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["val"]["pooled"]["num_examples"] for r in logged] == [4, 4]


def test_the_best_round_is_exported_with_its_reason_and_export_final_takes_the_last(
        tmp_path, sites_root, make_grid, scripted_scores):
    from server.app import serve

    scripted_scores([0.6, 0.9, 0.4])  # round 2 is the best; round 3 is worse
    cfg = run_config(tmp_path / "best", sites_root, **{"num-server-rounds": 3})
    model_dir = serve(make_grid(cfg, n=2), cfg)
    best_json = json.loads((tmp_path / "best" / "checkpoints" / "best.json").read_text())
    assert best_json == {**best_json, "round": 2, "metric": "auc", "value": 0.9, "n": 4}
    assert _same(_weights(model_dir), read_round(tmp_path / "best", 2).weights)
    assert not _same(_weights(model_dir), read_round(tmp_path / "best", 3).weights)
    meta = json.loads((model_dir / "configs" / "metadata.json").read_text())
    text = json.dumps(meta)
    assert '"exported": "best"' in text and '"round": 2' in text
    assert "highest pooled validation auc (0.9)" in text
    rows = [json.loads(x) for x in (tmp_path / "best" / "rounds.jsonl").read_text().splitlines()]
    assert [r["selection"]["best_round"] for r in rows] == [1, 2, 2]

    scripted_scores([0.6, 0.9, 0.4])
    cfg = run_config(tmp_path / "final", sites_root, **{"num-server-rounds": 3, "export": "final"})
    model_dir = serve(make_grid(cfg, n=2), cfg)
    assert _same(_weights(model_dir), read_round(tmp_path / "final", 3).weights)
    assert '"reason": "export = final"' in json.dumps(
        json.loads((model_dir / "configs" / "metadata.json").read_text()))


def test_early_stopping_ends_the_run_after_patience_rounds_without_improvement_and_resumes_the_best(
        tmp_path, sites_root, make_grid, scripted_scores):
    scripted_scores([0.7, 0.8, 0.8, 0.5, 0.9, 0.9])  # best stays round 2 (a tie does not improve)
    cfg = run_config(tmp_path / "run", sites_root, **{"num-server-rounds": 6, "select-tolerance": 0.0,
                                                      "early-stop-patience": 2})
    result = run_rounds(make_grid(cfg, n=2), RunConfig.from_flower(cfg))
    assert [r["round"] for r in result.rounds] == [1, 2, 3, 4]
    assert result.stopped_early and result.selection.best_round == 2
    assert _same(result.best_arrays.to_torch_state_dict(), read_round(tmp_path / "run", 2).weights)
    # a resumed run rebuilds the selection from the log and the best round's checkpoint, and stops
    resumed = run_rounds(make_grid(cfg, n=2), RunConfig.from_flower({**cfg, "resume": True}))
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4] and resumed.stopped_early
    assert _same(resumed.best_arrays.to_torch_state_dict(), read_round(tmp_path / "run", 2).weights)


def test_a_site_without_a_val_split_carves_one_per_patient_and_an_explicit_one_is_used(tmp_path):
    from client.site import carve_validation, load_site

    run = RunConfig(task="grading", seed=3)
    root = write_tiny_cohort(tmp_path / "site-a", n_cases=24, site="A")
    site = load_site(run, NodeConfig(data_path=str(root), site_id="a"))
    assert len(site.train) + len(site.val) == 18 and len(site.test) == 6
    val_patients = {s.case.patient_id for s in site.val}
    assert val_patients and not val_patients & {s.case.patient_id for s in site.train}
    assert sorted(s.label for s in site.val) == ["HGG", "LGG"]  # stratified: 1 of 9 per grade
    again = carve_validation([*site.train, *site.val], seed=3)[1]
    assert {s.case_id for s in again} == {s.case_id for s in site.val}  # deterministic
    assert site.counts["eligible-val-HGG"] == 1

    import csv

    explicit = write_tiny_cohort(tmp_path / "site-b", n_cases=16, site="B")
    rows = list(csv.DictReader((explicit / "cohort.csv").open()))
    for i, row in enumerate(rows):
        if row["split"] == "train" and i % 3 == 0:
            row["split"] = "val"
    with (explicit / "cohort.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    site = load_site(run, NodeConfig(data_path=str(explicit), site_id="b"))
    assert {s.case_id for s in site.val} == {r["case_id"] for r in rows if r["split"] == "val"}


def test_a_later_round_within_the_tolerance_of_the_peak_is_exported_and_the_report_says_why(
        tmp_path, sites_root, make_grid, scripted_scores):
    """Round 1 peaks on a lucky validation draw (0.90); round 3 scores 0.895, within 1% of it, and has
    trained longer: it is exported, with the peak named. Tolerance 0 exports the peak round itself."""
    from server.app import serve
    from server.report import write_report
    from server.selection import Selection

    scripted_scores([0.9, 0.7, 0.895, 0.5])
    cfg = run_config(tmp_path / "tol", sites_root, **{"num-server-rounds": 4})
    assert RunConfig.from_flower(cfg).select_tolerance == 0.01  # the default
    model_dir = serve(make_grid(cfg, n=2), cfg)
    assert _same(_weights(model_dir), read_round(tmp_path / "tol", 3).weights)
    prov = json.dumps(json.loads((model_dir / "configs" / "metadata.json").read_text()))
    assert "the last round within select-tolerance 0.01 of the highest pooled validation auc (0.9, round 1)" in prov
    rows = [json.loads(x) for x in (tmp_path / "tol" / "rounds.jsonl").read_text().splitlines()]
    assert [r["selection"]["best_round"] for r in rows] == [1, 1, 3, 3]
    assert [r["selection"]["peak_round"] for r in rows] == [1, 1, 1, 1]
    summary = {"spec": {"task": "grading", "strategy": "fedavg", "partition": "dirichlet", "seed": 0,
                        "network": "small_cnn", "size": 16, "local_epochs": 1},
               "run_config": {"export": "best"}, "site_names": ["a", "b"], "class_table": [],
               "rounds": [{**r, "pooled": {"auc": 0.8, "num_examples": 8.0}, "replied": 2, "sampled": 2,
                           "seconds": 1.0, "bytes_sent": 1, "bytes_received": 1} for r in rows],
               "baselines": {}, "fl_seconds": 1.0, "total_seconds": 2.0}
    page = write_report(tmp_path, summary).read_text()
    assert "Exported model: <b>round 3</b>, the last round within 0.01 (relative) of the best" in page

    scripted_scores([0.9, 0.7, 0.895, 0.5])
    cfg = run_config(tmp_path / "peak", sites_root, **{"num-server-rounds": 4, "select-tolerance": 0.0})
    assert _same(_weights(serve(make_grid(cfg, n=2), cfg)), read_round(tmp_path / "peak", 1).weights)

    # a new peak always wins, a score outside the tolerance never does; a loss-based selection
    # (lower is better) gets the same rule mirrored
    sel = Selection("auc", True, tolerance=0.01)
    assert [sel.update(r, {"auc": v}) for r, v in enumerate([0.9, 0.95, 0.9405, 0.94, 0.96], 1)] == [
        True, True, True, False, True]
    assert (sel.best_round, sel.peak_round) == (5, 5)
    err = Selection("param_mae", False, tolerance=0.1)
    assert [err.update(r, {"param_mae": v}) for r, v in enumerate([1.0, 1.05, 1.2], 1)] == [True, True, False]
    assert (err.best_round, err.peak_round, err.best_value) == (2, 1, 1.05)


def test_export_and_patience_options_are_checked():
    with pytest.raises(ValueError, match="export='latest' is not one of best, final"):
        RunConfig.from_flower({"export": "latest"})
    with pytest.raises(ValueError, match=r"select-tolerance=1.0 must be in \[0, 1\)"):
        RunConfig.from_flower({"select-tolerance": 1.0})
    with pytest.raises(ValueError, match="early-stop-patience=-1 must be >= 0"):
        RunConfig.from_flower({"early-stop-patience": -1})


def test_the_report_marks_the_exported_round_and_compares_its_model(tmp_path):
    from server.report import comparison, write_report

    def row(rnd, test_auc, val_auc, best):
        return {"round": rnd, "pooled": {"auc": test_auc, "num_examples": 8.0}, "replied": 2,
                "sampled": 2, "seconds": 1.0, "bytes_sent": 1024, "bytes_received": 1024,
                "val": {"pooled": {"auc": val_auc, "num_examples": 4.0}},
                "selection": {"metric": "auc", "value": val_auc, "n": 4, "best_round": best,
                              "best_value": 0.9}}

    summary = {"spec": {"task": "grading", "strategy": "fedavg", "partition": "dirichlet", "seed": 0,
                        "network": "small_cnn", "size": 16, "local_epochs": 1},
               "run_config": {"export": "best"}, "site_names": ["a", "b"], "class_table": [],
               "rounds": [row(1, 0.70, 0.6, 1), row(2, 0.81, 0.9, 2), row(3, 0.55, 0.4, 2)],
               "baselines": {}, "fl_seconds": 1.0, "total_seconds": 2.0}
    assert comparison(summary)["federated"] == 0.81
    page = write_report(tmp_path, summary).read_text()
    assert "Exported model: <b>round 2</b>, the best pooled validation auc (0.900)" in page
    assert "<tr><td>2</td><td>\u2605 exported</td><td>0.900 (4)</td>" in page
    summary["run_config"]["export"] = "final"
    assert comparison(summary)["federated"] == 0.55
    assert "Exported model: <b>round 3</b>, the final round" in write_report(tmp_path, summary).read_text()


def test_equal_validation_scores_are_told_apart_by_the_pooled_validation_loss():
    """A small validation split saturates (AUC 1.0 in rounds 9 and 10 of a 12-round parity run):
    the tie goes to the lower pooled cross-entropy, a full tie to the earlier round."""
    from server.pooled import round_metrics
    from server.selection import Selection

    sel = Selection("auc", True)
    assert sel.update(1, {"auc": 0.9, "cross_entropy": 0.5})
    assert sel.update(2, {"auc": 1.0, "cross_entropy": 0.4})
    assert sel.update(3, {"auc": 1.0, "cross_entropy": 0.2})  # same AUC, better calibrated
    assert not sel.update(4, {"auc": 1.0, "cross_entropy": 0.3})
    assert not sel.update(5, {"auc": 1.0, "cross_entropy": 0.2})  # full tie: round 3 stays
    assert not sel.update(6, {"auc": 0.99, "cross_entropy": 0.01})  # the score still comes first
    assert (sel.best_round, sel.best_loss) == (3, 0.2)
    # sites' cross-entropies pool as the example-weighted mean, which is the pooled mean exactly
    from shared.contract import CONFUSION, NUM_CLASSES, NUM_EXAMPLES

    site = {NUM_EXAMPLES: 2, NUM_CLASSES: 2, CONFUSION: [1, 0, 0, 1]}
    pooled = round_metrics({"a": {**site, "cross_entropy": 0.1},
                            "b": {**site, NUM_EXAMPLES: 6, CONFUSION: [3, 0, 0, 3],
                                  "cross_entropy": 0.5}})["pooled"]
    assert pooled["cross_entropy"] == pytest.approx((2 * 0.1 + 6 * 0.5) / 8)
