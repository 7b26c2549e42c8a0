"""`gliofed simulate`: site folders + `flwr run` command (fast), and a full Ray simulation (integration)."""

from __future__ import annotations

import json

import pytest
from fl_helpers import write_tiny_cohort
from typer.testing import CliRunner

from gliofed.cli import app


def test_prepare_only_writes_site_folders_and_prints_the_flwr_run_command(tmp_path):
    cohort = write_tiny_cohort(tmp_path / "cohort", n_cases=24, splits=False)
    res = CliRunner().invoke(app, ["simulate", "--cohort", str(cohort), "--sites", "3",
                                   "--partition", "iid", "--out", str(tmp_path / "run"),
                                   "--prepare-only"])
    assert res.exit_code == 0, res.output
    assert "flwr run . --stream -c 'task=\"grading\"" in res.output
    assert "num-supernodes=3" in res.output
    for i in range(3):
        assert (tmp_path / "run" / "sites" / f"site-{i}" / "cohort.csv").is_file()


def test_held_out_test_cases_enlarge_only_the_pooled_test_set(tmp_path):
    """--held-out-test N: the generated cohort gets N more sessions, every one in a site's test split."""
    from shared.cohort import read_cohort

    args = ["simulate", "--task", "typing", "--cases", "21", "--size", "16", "--sites", "2",
            "--partition", "iid", "--prepare-only"]
    res = CliRunner().invoke(app, [*args, "--held-out-test", "14", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "cohort-ht14" / "cohort.csv").is_file()
    sites = [read_cohort(tmp_path / "run" / "sites" / f"site-{i}") for i in range(2)]
    cases = [c for s in sites for c in s.cases]
    held = [c for c in cases if c.case_id.startswith("HT")]
    assert len(cases) == 35 and len(held) == 14
    assert {c.split for c in held} == {"test"}
    assert sum(c.split == "test" for c in cases) >= 14 + 2
    res = CliRunner().invoke(app, [*args, "--held-out-test", "14", "--cohort", str(tmp_path / "run" / "cohort-ht14"),
                                   "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "adds generated cases to a generated cohort" in res.output


def test_recurrence_ratio_sets_the_class_mix_of_the_generated_cohort(tmp_path):
    """--recurrence-ratio 0.5: a balanced generated recurrence cohort in its own folder; refused where
    there is no generated recurrence cohort to mix, or where one class would be missing."""
    from shared.cohort import read_cohort

    args = ["simulate", "--task", "recurrence", "--cases", "40", "--size", "16", "--sites", "2",
            "--partition", "iid", "--prepare-only"]
    res = CliRunner().invoke(app, [*args, "--recurrence-ratio", "0.5", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    cohort = read_cohort(tmp_path / "run" / "cohort-r0.5")
    kinds = [c.labels.get("recurrence") for c in cohort.cases]
    assert kinds.count("necrosis") == kinds.count("recurrence") == 20
    sites = [read_cohort(tmp_path / "run" / "sites" / f"site-{i}") for i in range(2)]
    assert sum(len(s.cases) for s in sites) == 40
    for bad, why in ((["--recurrence-ratio", "1.0"], "strictly between 0 and 1"),
                     (["--recurrence-ratio", "0.5", "--task", "grading"], "only with --task recurrence")):
        res = CliRunner().invoke(app, [*args, *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and why in res.output, res.output


def test_bad_partition_is_a_one_line_error(tmp_path):
    cohort = write_tiny_cohort(tmp_path / "cohort", n_cases=8, splits=False)
    res = CliRunner().invoke(app, ["simulate", "--cohort", str(cohort), "--partition", "zipf:2",
                                   "--out", str(tmp_path / "run"), "--prepare-only"])
    assert res.exit_code == 2
    assert "unknown partition 'zipf:2'" in res.output


@pytest.mark.integration
@pytest.mark.slow
def test_full_ray_simulation_writes_rounds_model_and_report(tmp_path):
    cohort = write_tiny_cohort(tmp_path / "cohort", n_cases=24, splits=False)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["simulate", "--cohort", str(cohort), "--sites", "2",
                                   "--rounds", "2", "--partition", "iid", "--size", "16",
                                   "--local-epochs", "1", "--network", "small_cnn", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replied"] == 2 for r in rows)
    assert 0.0 <= rows[-1]["pooled"]["accuracy"] <= 1.0
    assert (out / "report.html").is_file() and (out / "learning_curves.png").is_file()
    assert (out / "model" / "models" / "model.pt").is_file()
    meta = json.loads((out / "model" / "configs" / "metadata.json").read_text())
    assert "federated" in json.dumps(meta)


def test_inprocess_engine_runs_the_same_federation_without_ray(tmp_path):
    """`--engine inprocess`: the round loop, model export and report as with Ray; the rounds match a
    second in-process run bit for bit (same seed), and an unknown engine is refused by name."""
    cohort = write_tiny_cohort(tmp_path / "cohort", n_cases=24, splits=False)
    common = ["simulate", "--cohort", str(cohort), "--sites", "2", "--rounds", "2", "--partition",
              "iid", "--size", "16", "--local-epochs", "1", "--network", "small_cnn",
              "--no-baselines", "--engine", "inprocess"]
    runs = []
    for name in ("a", "b"):
        res = CliRunner().invoke(app, [*common, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        runs.append([json.loads(x) for x in (tmp_path / name / "rounds.jsonl").read_text().splitlines()])
    assert "round 2/2" in res.output  # progress, not Flower's log or MONAI's reader warnings
    assert "INFO" not in res.output and "nvImageCodec" not in res.output
    assert [r["round"] for r in runs[0]] == [1, 2] and all(r["replied"] == 2 for r in runs[0])
    assert [r["pooled"] for r in runs[0]] == [r["pooled"] for r in runs[1]]
    assert (tmp_path / "a" / "model" / "models" / "model.pt").is_file()
    assert "sites one after the other in process" in (tmp_path / "a" / "report.html").read_text()
    res = CliRunner().invoke(app, [*common[:-1], "threads", "--out", str(tmp_path / "c")])
    assert res.exit_code != 0 and "engine='threads' is not one of ray, inprocess" in res.output


def test_inprocess_runs_keep_their_message_logs_without_the_weights(tmp_path):
    """A benchmark's in-process grid logs every exchange for its metrics, but not the 57 MB weights
    of each message (twelve rounds of five resnet10 sites kept whole ran a sweep out of memory)."""
    from simulations.runner import SimulationSpec, run_inprocess

    cohort = write_tiny_cohort(tmp_path / "cohort", n_cases=24, splits=False)
    spec = SimulationSpec(cohort=cohort, sites=2, rounds=1, partition="iid", size=16,
                          network="small_cnn", out=tmp_path / "run", baselines=False, progress=False)
    rounds, grid = run_inprocess(spec)
    assert rounds[-1]["replied"] == 2
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train) == 2 and all("arrays" not in r.content for r in train)
    assert all("metrics" in r.content for r in train)
    assert all("arrays" not in m.content for m, _ in grid.exchanges)
