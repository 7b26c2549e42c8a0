"""Cross-site matrix, leave-one-site-out and their report heatmaps, on tiny sites with the real
ServerApp loop and ClientApp in-process (no Ray)."""

from __future__ import annotations

import json

import pytest

SITES = (3, 16)


@pytest.fixture(scope="module")
def federated(sites_root, tmp_path_factory):
    from fl_helpers import LocalGrid, run_config

    from server.app import serve
    from shared.config import RunConfig

    run_dir = tmp_path_factory.mktemp("cross") / "run"
    cfg = run_config(run_dir, sites_root, **{"num-server-rounds": 1, "min-available-nodes": 3})
    nodes = {100 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}
    serve(LocalGrid(nodes, cfg), cfg)
    return RunConfig.from_flower(cfg), run_dir


def _federate(sub, k):
    from fl_helpers import LocalGrid

    from server.app import serve

    raw = sub.to_flower()
    serve(LocalGrid({100 + i: {"partition-id": i, "num-partitions": k} for i in range(k)}, raw), raw)


def test_matrix_scores_every_model_on_every_site_and_the_report_draws_it(
        federated, sites_root, one_thread):
    from server.report import write_report
    from simulations.baselines import run_baselines, site_samples
    from simulations.crosseval import GLOBAL, cross_site_matrix, load_exported

    run, run_dir = federated
    dirs = [sites_root / f"site-{i}" for i in range(3)]
    per_site = site_samples(dirs, run.task, run.seed)
    base = run_baselines(run, dirs, per_site=per_site)
    glob = load_exported(run, run_dir / "model")
    models = {GLOBAL: glob, **{f"local-only {n}": r["model"] for n, r in base["local"].items()}}
    matrix = cross_site_matrix(run, per_site, models)
    assert matrix["sites"] == ["site-0", "site-1", "site-2", "pooled"]
    for name in models:
        row = matrix["cells"][name]
        assert [row[s]["n"] for s in matrix["sites"][:3]] == [len(per_site[s]["test"])
                                                            for s in matrix["sites"][:3]]
        assert row["pooled"]["n"] == sum(len(v["test"]) for v in per_site.values())
        assert "accuracy" in row["pooled"]["ci"]
    # the global model's pooled cell is the federation's own pooled test result (same cases, formula)
    last = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[-1])
    assert matrix["cells"][GLOBAL]["pooled"]["accuracy"] == pytest.approx(last["pooled"]["accuracy"])

    # a leave-one-site-out result as the harness keeps it (the real runs: the slow test below)
    loso = {s: {"loso": matrix["cells"][f"local-only {s}"][s], "global": matrix["cells"][GLOBAL][s],
                "trained_on": [t for t in per_site if t != s]} for s in per_site}
    summary = {"spec": {"task": "grading", "strategy": "fedavg", "partition": "iid", "seed": 0,
                        "network": "small_cnn", "size": 16, "local_epochs": 1},
               "run_config": run.to_flower(), "site_names": ["site-0", "site-1", "site-2"],
               "class_table": [], "rounds": [last], "fl_seconds": 1.0, "total_seconds": 2.0,
               "baselines": {"test_cases": 9, "centralised": {k: v for k, v in base["centralised"].items()
                                                             if k != "model"},
                             "local": {n: {k: v for k, v in r.items() if k != "model"}
                                       for n, r in base["local"].items()}},
               "cross_site": matrix, "loso": loso}
    page = write_report(run_dir, summary).read_text()
    assert (run_dir / "cross_site.png").stat().st_size > 5000 and (run_dir / "loso.png").is_file()
    assert "Cross-site" in page and "Leave-one-site-out" in page and "held-out site" in page
    cen = base["centralised"]["final"]
    row = page.split("<td>centralised</td>")[1].split("</tr>")[0]
    lo, hi = cen["ci"]["balanced_accuracy"]
    assert f"{cen['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in row and f"<td>{cen['n']}</td>" in row


@pytest.mark.slow
def test_leave_one_site_out_trains_without_the_held_out_site_and_scores_it(
        federated, sites_root, one_thread):
    from simulations.baselines import site_samples
    from simulations.crosseval import leave_one_site_out, load_exported

    run, run_dir = federated
    per_site = site_samples([sites_root / f"site-{i}" for i in range(3)], run.task, run.seed)
    glob = load_exported(run, run_dir / "model")
    loso = leave_one_site_out(run, sites_root, per_site, glob, _federate, run_dir / "loso",
                              echo=lambda *_: None)
    assert sorted(loso) == ["site-0", "site-1", "site-2"]
    for held, r in loso.items():
        assert held not in r["trained_on"] and len(r["trained_on"]) == 2
        assert r["loso"]["n"] == r["global"]["n"] == len(per_site[held]["test"])
        assert (run_dir / "loso" / held / "model" / "models" / "model.pt").is_file()
        # the held-out site's cases never reached the LOSO federation's site folders
        trained = "".join((run_dir / "loso" / held / "sites" / f"site-{i}" / "cohort.csv").read_text()
                          for i in range(2))
        assert all(s.case_id not in trained for s in per_site[held]["test"])

