"""QTM: transport simulator physics, QTMnet, the grading statistics, CLI and the federated qtm task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.qtm.phantom import Protocol, simulate_case
from shared.qtm.transport import solve_darcy

SMALL = (16, 16, 8)
FAST = Protocol(frame_s=6.0, duration_s=120.0)


@pytest.fixture(scope="module")
def hgg_case():
    return simulate_case("HGG", 11, FAST, shape=SMALL)


def test_tracer_budget_closes(hgg_case):
    """Mass conservation: what flowed in = what drained out + what is still in the tissue."""
    c = hgg_case
    assert c.budget_error < 1e-9
    assert c.concentration.max() > 0.05  # the bolus arrived
    assert np.isfinite(c.signal).all()


def test_darcy_flow_balances_every_voxel():
    rng = np.random.default_rng(0)
    k = np.exp(rng.normal(0, 0.5, SMALL))
    src = (rng.random(SMALL) < 0.1).astype(float)
    drain = (rng.random(SMALL) < 0.1) * 4.0
    flow = solve_darcy(k, src, drain, 2.0)
    assert flow.imbalance() < 1e-9
    assert flow.outflow.sum() == pytest.approx(src.sum(), rel=1e-9)
    assert (flow.plasma_flow() >= 0).all()
    with pytest.raises(ValueError, match="no venous outlet"):
        solve_darcy(k, src, np.zeros(SMALL), 2.0)


def test_ground_truth_maps_are_consistent(hgg_case):
    m, seg = hgg_case.maps, hgg_case.seg
    assert set(m) == {"fp", "vp", "ve", "ps", "ktrans", "umag"}
    assert (seg == 4).sum() > 10  # a viable tumour is there
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in m.values())
    # Ktrans = E Fp can exceed neither the flow limit nor the permeability limit
    assert (m["ktrans"] <= m["fp"] / 100 + 1e-6).all() and (m["ktrans"] <= m["ps"] + 1e-6).all()
    viable, normal = seg == 4, seg == 0
    assert np.median(m["ps"][viable]) > 10 * np.median(m["ps"][normal])  # broken barrier


def test_noisy_concentration_tracks_truth():
    c = simulate_case("LGG", 3, Protocol(frame_s=6.0, duration_s=120.0, snr=400.0), shape=SMALL)
    err = np.abs(c.noisy_concentration() - c.concentration).mean()
    assert err < 0.05 * c.concentration.max()


def test_grade_is_validated():
    with pytest.raises(ValueError, match="grade must be one of"):
        simulate_case("GBM", 0, FAST, shape=SMALL)


def test_resample_holds_the_last_value_and_is_linear():
    from shared.qtm.net import CONC_SCALE, TIME_AXIS_S, resample_curves

    times = np.arange(0.0, 200.0, 4.0)
    conc = np.broadcast_to(times / 100.0, (2, 2, 2, len(times))).copy()
    out = resample_curves(conc, times) / CONC_SCALE
    inside = TIME_AXIS_S <= times[-1]
    np.testing.assert_allclose(out[inside, 0, 0, 0], TIME_AXIS_S[inside] / 100.0, atol=1e-6)
    np.testing.assert_allclose(out[~inside, 1, 1, 1], times[-1] / 100.0, atol=1e-6)


def test_encode_decode_roundtrip(hgg_case):
    from shared.qtm.net import OUTPUTS, decode_maps, encode_maps

    back = decode_maps(encode_maps(hgg_case.maps))
    for name in OUTPUTS:
        np.testing.assert_allclose(back[name], hgg_case.maps[name], rtol=2e-3, atol=2e-4)


def test_qtmnet_handles_any_volume_size():
    from shared.qtm.net import TIME_AXIS_S, build_qtmnet, predict_volume

    torch.manual_seed(0)
    curves = np.random.default_rng(0).random((len(TIME_AXIS_S), 18, 13, 6)).astype(np.float32)
    maps = predict_volume(build_qtmnet(), curves)
    assert set(maps) == {"fp", "vp", "ve", "ps", "umag", "ktrans"}
    assert all(v.shape == (18, 13, 6) and np.isfinite(v).all() for v in maps.values())


def test_training_reduces_the_map_error():
    from shared.qtm.net import build_qtmnet
    from shared.qtm.train import evaluate_qtmnet, example_from_case, train_qtmnet

    examples = [example_from_case(simulate_case(g, s, FAST, shape=SMALL))
                for s, g in enumerate(["LGG", "HGG"] * 3)]
    torch.manual_seed(0)
    model = build_qtmnet()
    before = evaluate_qtmnet(model, examples[:2])["param_mae"]
    train_qtmnet(model, examples, epochs=8, batch_size=2)
    after = evaluate_qtmnet(model, examples[:2])["param_mae"]
    assert after < 0.7 * before


def _fake_case(i: int, grade: str, separable: bool):
    from shared.qtm.grade import CaseMaps

    rng = np.random.default_rng(i)
    level = (2.0 if grade == "HGG" else 1.0) if separable else 1.0
    maps = {n: np.full((4, 4, 4), level * rng.uniform(0.9, 1.1), np.float32)
            for n in ("fp", "vp", "ve", "ps", "ktrans", "umag")}
    roi = np.zeros((4, 4, 4), bool)
    roi[1:3, 1:3, 1:3] = True
    return CaseMaps(f"c{i}", f"p{i}", grade, roi, maps, dict(maps))


def test_grading_statistics():
    from shared.qtm.grade import run_grading

    sep = [_fake_case(i, "HGG" if i % 2 else "LGG", True) for i in range(20)]
    res = run_grading(sep, repeats=3, n_boot=200)
    assert res.auc["qtm"] == 1.0 and res.ci95["qtm"] == pytest.approx((1.0, 1.0))
    noise = [_fake_case(i, "HGG" if i % 2 else "LGG", False) for i in range(40)]
    res = run_grading(noise, repeats=3, n_boot=300)
    for m in ("qtm", "2cxm"):
        lo, hi = res.ci95[m]
        # no signal: a wide interval around an unremarkable AUC
        assert lo <= res.auc[m] <= hi and hi - lo > 0.15 and res.auc[m] < 0.85
    assert "| QTMnet (no AIF) |" in res.table()


def test_missing_ground_truth_is_a_clear_error(tmp_path):
    from shared.dce.io import write_dce
    from shared.qtm.train import read_ground_truth

    path = write_dce(tmp_path / "x_dce.nii.gz", np.zeros((2, 2, 2, 4)), np.arange(4.0))
    with pytest.raises(ValueError, match="no GroundTruth maps"):
        read_ground_truth(path)


@pytest.fixture(scope="module")
def qtm_site(tmp_path_factory):
    from simulations.qtm_cohort import generate_qtm_cohort

    out = tmp_path_factory.mktemp("qtm") / "site"
    generate_qtm_cohort(out, 8, sites=2, seed=3, shape=SMALL, test_fraction=0.5, with_concentration=True)
    return out


def test_simulated_site_follows_the_cohort_contract(qtm_site):
    from shared.cohort import read_cohort
    from shared.dce.io import read_dce
    from shared.tasks import select_samples

    cohort = read_cohort(qtm_site)
    assert not cohort.errors
    samples, skipped = select_samples("qtm", cohort)
    assert len(samples) == 8 and not skipped
    assert {c.labels["grade"] for c in cohort.cases} == {"LGG", "HGG"}
    assert {c.split for c in cohort.cases} == {"train", "test"}
    series = read_dce(samples[1].case.images["dce"])  # site-1: 2.5 s frames over 240 s
    assert series.quantity == "signal" and series.times_s[1] == pytest.approx(2.5)
    meta = json.loads(samples[1].case.images["dce"].with_name(
        samples[1].case.case_id + "_dce.json").read_text())
    assert set(meta["GroundTruth"]) == {"fp", "vp", "ve", "ps", "ktrans", "umag"}
    true = read_dce(qtm_site / meta["TrueConcentration"])
    noisy = series.concentration()
    assert true.data.shape == noisy.shape and true.quantity == "concentration"
    assert np.abs(noisy - true.data).mean() < 0.2 * true.data.max()  # signal -> conc recovers it


def test_cli_train_predict_grade(qtm_site, tmp_path):
    from typer.testing import CliRunner

    from gliofed.cli import app

    runner = CliRunner()
    model = tmp_path / "model"
    r = runner.invoke(app, ["qtm", "train", "--out", str(model), "--data", str(qtm_site),
                            "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    meta = json.loads((model / "configs" / "metadata.json").read_text())
    assert meta["task"] == "qtm" and meta["provenance"]["train_cases"] == 4
    dce = min(qtm_site.glob("*_dce.nii.gz"))
    r = runner.invoke(app, ["qtm", "predict", str(model), str(dce), "--out", str(tmp_path / "maps"),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "maps").glob("*_qtmnet_*.nii.gz"))) == 6
    r = runner.invoke(app, ["qtm", "grade", str(model), "--data", str(qtm_site), "--out",
                            str(tmp_path / "grade"), "--repeats", "2", "--n-boot", "100", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "grade" / "grading.json").read_text())
    for m in ("qtm", "2cxm"):
        assert 0.0 <= res["auc"][m] <= 1.0
        assert res["ci95"][m][0] <= res["auc"][m] <= res["ci95"][m][1]
    assert (tmp_path / "grade" / "grading_roc.png").stat().st_size > 1000
    r = runner.invoke(app, ["qtm", "predict", str(tmp_path), str(dce), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a QTMnet model folder" in " ".join(r.output.split())


def test_site_trains_and_evaluates_qtm_for_the_federation(qtm_site):
    from flwr.app import RecordDict

    from client.site import evaluate_site, train_site
    from server.model import initial_arrays
    from shared.config import NodeConfig, RunConfig
    from shared.contract import ARRAYS, METRICS, NUM_EXAMPLES

    run = RunConfig(task="qtm", local_epochs=1, batch_size=2, device="cpu")
    node = NodeConfig(data_path=str(qtm_site), site_id="site", min_report_cases=1)  # tiny site
    arrays = initial_arrays(run)
    reply = train_site(RecordDict({ARRAYS: arrays}), run, node)
    assert reply[METRICS][NUM_EXAMPLES] == 3  # 4 training cases, 1 carved out for validation
    assert set(reply[ARRAYS].keys()) == set(arrays.keys())
    ev = evaluate_site(RecordDict({ARRAYS: reply[ARRAYS]}), run, node)
    assert 0 < ev[METRICS]["param_mae"] < 5
    with pytest.raises(ValueError, match="not supported for the qtm task"):
        train_site(RecordDict({ARRAYS: arrays}), run.replace(dp="opacus"), node)


def test_init_model_starts_the_federation_from_given_weights(tmp_path):
    from server.model import initial_arrays
    from shared.config import RunConfig
    from shared.qtm.bundle import save_qtmnet
    from shared.qtm.net import build_qtmnet

    torch.manual_seed(5)
    model = build_qtmnet()
    save_qtmnet(model, tmp_path / "m", {"trained": "test"})
    arrays = initial_arrays(RunConfig(task="qtm", init_model=str(tmp_path / "m")))
    state = arrays.to_torch_state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    with pytest.raises(ValueError, match="do not fit this task's network"):
        initial_arrays(RunConfig(task="grading", network="small_cnn", init_model=str(tmp_path / "m")))


def test_regression_rounds_pool_by_example_weighting():
    from server.pooled import round_metrics

    out = round_metrics({"a": {"param_mae": 0.2, "num-examples": 1},
                         "b": {"param_mae": 0.5, "num-examples": 3}})
    assert out["pooled"]["param_mae"] == pytest.approx((0.2 + 1.5) / 4)
    assert out["pooled"]["num_examples"] == 4
