"""What a site sends when things go wrong: fixed-vocabulary errors, k-anonymous metrics, skipped cases."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fl_helpers import LocalGrid, run_config, write_tiny_cohort

from client.disclosure import enough_cases, k_anonymous_row, k_anonymous_rows
from client.site import SiteError, evaluate_site, safe_reason, train_site
from server.pooled import round_metrics
from server.rounds import run_rounds
from shared.config import NodeConfig, RunConfig
from shared.learning import learning_core, train_config_for
from shared.tasks import TASKS
from tests.nifti_helpers import write_nii

REASON = re.compile(r"^[a-z-]+( column=[a-z0-9_]+)?( count=\d+)?( task=[a-z]+)?$")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _message(run: RunConfig, task: str = "grading"):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    model = learning_core().build_model(TASKS[task], train_config_for(run, device="cpu"))
    arrays = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    return RecordDict({"arrays": arrays, "config": ConfigRecord({})})


def test_error_replies_never_carry_paths_names_or_dates(tmp_path: Path) -> None:
    personal = tmp_path / "Doe John 1970-01-01" / "Müller Zoë 05.03.2024"
    sites = tmp_path / "sites"
    for i in range(2):
        write_tiny_cohort(sites / f"site-{i}", n_cases=8, seed=i, site=f"S{i}")
    gone = write_tiny_cohort(personal / "all files gone", n_cases=8, seed=3, site="G")
    for f in gone.glob("*.nii.gz"):
        f.unlink()
    cfg = run_config(tmp_path / "run", sites, **{"num-server-rounds": 1})
    grid = LocalGrid({100: {"partition-id": 0}, 101: {"partition-id": 1},
                      7: {"data-path": str(personal / "no cohort here")},
                      8: {"data-path": str(gone), "site-id": "gone"}}, cfg)
    run_rounds(grid, RunConfig.from_flower(cfg))
    reasons = sorted({r.error.reason for r in grid.replies if r.has_error()})
    assert reasons == ["cohort-unreadable", "no-usable-cases column=t1 count=8"]
    for reason in reasons:
        assert REASON.match(reason), reason
        assert not any(w in reason for w in ("Doe", "John", "1970", "Müller", "Zoë", "2024", "/"))


def test_safe_reason_uses_only_the_vocabulary() -> None:
    err = SiteError("model-mismatch", "weights of /data/Doe John/x do not fit", task="grading")
    assert safe_reason(err) == "model-mismatch task=grading"
    assert safe_reason(SiteError("no-usable-cases", column="/etc/Doe", count=3)) == \
        "no-usable-cases count=3"  # a column outside the cohort's names is not sent
    assert safe_reason(FileNotFoundError("/data/Doe John 1970-01-01/t1.nii.gz")) == "internal-error"
    with pytest.raises(ValueError, match="unknown site error kind"):
        SiteError("Doe John")


def test_weights_of_another_task_are_a_clear_model_mismatch(tmp_path: Path) -> None:
    site = write_tiny_cohort(tmp_path / "site", n_cases=8)
    run = RunConfig.from_flower(run_config(tmp_path / "run"))
    node = NodeConfig.from_flower({"data-path": str(site)}, run)
    content = _message(run.replace(task="typing"), task="typing")
    with pytest.raises(SiteError, match="do not fit the grading network") as err:
        train_site(content, run, node)
    assert safe_reason(err.value) == "model-mismatch task=grading"


def test_a_site_below_min_report_cases_sends_no_metric(tmp_path: Path) -> None:
    site = write_tiny_cohort(tmp_path / "site", n_cases=16)  # 4 test cases
    run = RunConfig.from_flower(run_config(tmp_path / "run"))
    small = evaluate_site(_message(run), run, NodeConfig.from_flower({"data-path": str(site)}, run))
    assert dict(small["metrics"]) == {"skipped": 0}  # default k = 10 > 4 test cases
    ok = evaluate_site(_message(run), run, NodeConfig.from_flower(
        {"data-path": str(site), "min-report-cases": 2}, run))
    m = dict(ok["metrics"])
    assert m["num-examples"] == 4 and sum(m["confusion"]) == 4
    if "score-hist" in m:  # sent only when no bin singles out fewer than 2 cases
        assert min(v for v in m["score-hist"] if v) >= 2
    pooled = round_metrics({"site-a": m, "site-b": dict(small["metrics"])})
    assert pooled["withheld"] == ["site-b"]
    assert pooled["pooled"]["num_examples"] == 4 and set(pooled["sites"]) == {"site-a"}


def test_k_anonymous_histograms_merge_bins_or_are_withheld() -> None:
    row = np.zeros(100, np.int64)
    row[[3, 10, 11, 50, 51, 52, 90]] = [1, 2, 3, 4, 1, 1, 2]  # 14 cases
    out = k_anonymous_row(row, 5)
    assert out.sum() == 14 and min(v for v in out if v) >= 5
    assert np.count_nonzero(out) == 2  # [3..50] holds 10, the tail of 4 joins the last group
    assert k_anonymous_row(np.array([0, 3, 1, 0]), 5) is None  # 4 cases cannot be hidden
    assert np.array_equal(k_anonymous_row(np.zeros(5, np.int64), 5), np.zeros(5))
    hist = np.zeros((2, 2, 10), np.int64)
    hist[0, 0, 2], hist[0, 1, 7], hist[1, 0, 7], hist[1, 1, 2] = 6, 6, 6, 6
    assert np.array_equal(k_anonymous_rows(hist, 5), hist)
    hist[1, 1, 3] = 1
    assert k_anonymous_rows(hist, 8) is None
    assert enough_cases(10, 10) and not enough_cases(9, 10) and enough_cases(1, 0)


def test_a_bad_file_is_skipped_and_counted_not_fatal(tmp_path: Path, caplog) -> None:
    site = write_tiny_cohort(tmp_path / "site", n_cases=16)
    (site / "A-case002_t1.nii.gz").unlink()  # missing (cases 2, 6, 8 are training cases)
    d = site / "A-case006_t2.nii.gz"
    d.unlink()
    d.mkdir()  # a folder where a file is expected
    write_nii(site / "A-case008_flair.nii.gz", np.ones((16, 16), np.float32))  # 2-D
    run = RunConfig.from_flower(run_config(tmp_path / "run"))
    node = NodeConfig.from_flower({"data-path": str(site), "min-report-cases": 1}, run)
    with caplog.at_level(logging.WARNING, logger="client.site"):
        out = train_site(_message(run), run, node)
    from client.site import load_site

    held_out = len(load_site(run, node).val)  # carved out for validation (model selection)
    assert held_out >= 1
    assert out["metrics"]["skipped"] == 3 and out["metrics"]["num-examples"] == 9 - held_out
    lines = [r.getMessage() for r in caplog.records if "skipped case" in r.getMessage()]
    assert sorted(lines) == [
        "site site: skipped case A-case002: t1: missing file",
        ("site site: skipped case A-case006: t2: not a file (a folder or device where an image is "
         "expected)"),
        "site site: skipped case A-case008: flair: not a 3D image (shape (16, 16))",
    ]
    shutil.rmtree(d)


def test_a_diverged_global_model_is_refused_with_its_own_reason(tmp_path: Path) -> None:
    """Weights holding NaN (a diverged server optimiser) are refused by name, not as internal-error."""
    from flwr.app import ArrayRecord

    from client.site import load_received

    run = RunConfig.from_flower(run_config(tmp_path / "run"))
    spec = TASKS["grading"]
    model = learning_core().build_model(spec, train_config_for(run))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in good.items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][...] = float("nan")
    with pytest.raises(SiteError) as err:
        load_received(model, ArrayRecord(state), run)
    assert err.value.kind == "model-not-finite"
    assert safe_reason(err.value).startswith("model-not-finite")
    load_received(model, ArrayRecord(good), run)  # finite weights still load


def test_sites_train_at_each_rounds_learning_rate(tmp_path: Path, monkeypatch) -> None:
    """lr-schedule = cosine: round r trains at lr * (1 + cos(pi (r - 1) / R)) / 2 at every site (the
    oscillating late rounds of the parity benchmark); constant keeps lr."""
    import math

    import shared.training

    seen: list[float] = []
    real = shared.training.train_epochs

    def spy(model, samples, spec, cfg, **kw):
        seen.append(cfg.lr)
        return real(model, samples, spec, cfg, **kw)

    monkeypatch.setattr(shared.training, "train_epochs", spy)
    sites = tmp_path / "sites"
    for i in range(2):
        write_tiny_cohort(sites / f"site-{i}", n_cases=8, seed=i, site=f"S{i}")
    cfg = run_config(tmp_path / "run", sites, **{"num-server-rounds": 3, "lr-schedule": "cosine"})
    grid = LocalGrid({100: {"partition-id": 0}, 101: {"partition-id": 1}}, cfg)
    run_rounds(grid, RunConfig.from_flower(cfg))
    want = [0.003 * (1 + math.cos(math.pi * r / 3)) / 2 for r in range(3)]
    assert [round(x, 9) for x in seen] == [round(x, 9) for x in want for _ in range(2)]
    assert RunConfig(lr=0.01, lr_schedule="constant").round_lr(2) == 0.01
    assert RunConfig(lr=0.01, num_server_rounds=3).round_lr(2) == pytest.approx(0.0075)  # grading: cosine
    assert RunConfig(task="typing", lr=0.01, num_server_rounds=3).round_lr(2) == 0.01  # typing: constant
    assert RunConfig(task="typing", lr=0.01, num_server_rounds=3, lr_schedule="cosine").round_lr(2) < 0.01
    with pytest.raises(ValueError, match="lr-schedule"):
        RunConfig(lr_schedule="step")
