"""Batched 2CXM / extended Tofts fitting: parameter recovery on synthetic curves, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.dce import extended_tofts, parker_aif, twocxm
from shared.dce.fit import fit_2cxm, fit_extended_tofts, levenberg_marquardt


def _truth_2cxm(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fp": rng.uniform(10, 100, n),
        "ps": rng.uniform(0.02, 0.3, n),
        "ve": rng.uniform(0.1, 0.5, n),
        "vp": rng.uniform(0.02, 0.12, n),
        "delay": rng.uniform(0.0, 8.0, n),
    }


def test_fit_2cxm_recovers_parameters_and_delay():
    torch.set_num_threads(1)
    t = np.arange(0.0, 300.0, 5.0)  # 60 frames
    ca = parker_aif(t, 10.0)
    truth = _truth_2cxm(40, seed=1)
    clean = twocxm(t, ca, truth["fp"], truth["ps"], truth["ve"], truth["vp"], truth["delay"])
    noisy = clean + np.random.default_rng(2).normal(0, 0.002, clean.shape)
    res = fit_2cxm(noisy, t, ca, device="cpu")
    assert set(res) >= {"fp", "ps", "ve", "vp", "delay", "ktrans", "rss", "success"}
    assert res["success"].float().mean() >= 0.9
    for name, tol in [("fp", 0.15), ("ps", 0.15), ("ve", 0.1), ("vp", 0.1)]:
        rel = np.abs(res[name].numpy() - truth[name]) / truth[name]
        assert np.median(rel) < tol / 3, name
        assert np.mean(rel < tol) >= 0.85, name
    assert np.median(np.abs(res["delay"].numpy() - truth["delay"])) < 0.5
    ktrans = truth["ps"] * truth["fp"] / 100 / (truth["ps"] + truth["fp"] / 100)
    assert np.median(np.abs(res["ktrans"].numpy() - ktrans) / ktrans) < 0.05
    # the fit is at least as good as the truth in least-squares terms
    rss_truth = ((clean - noisy) ** 2).sum(-1)
    assert np.median(res["rss"].numpy() / rss_truth) <= 1.0


def test_fit_extended_tofts_recovers_parameters_without_noise():
    t = np.arange(0.0, 300.0, 4.0)
    ca = parker_aif(t, 12.0)
    rng = np.random.default_rng(3)
    ktrans, ve, vp = (
        rng.uniform(0.01, 0.3, 25),
        rng.uniform(0.1, 0.5, 25),
        rng.uniform(0.01, 0.1, 25),
    )
    curves = extended_tofts(t, ca, ktrans, ve, vp)
    res = fit_extended_tofts(curves, t, ca, device="cpu", chunk_size=10)  # 3 chunks
    np.testing.assert_allclose(res["ktrans"].numpy(), ktrans, rtol=1e-3)
    np.testing.assert_allclose(res["ve"].numpy(), ve, rtol=1e-3)
    np.testing.assert_allclose(res["vp"].numpy(), vp, rtol=1e-3, atol=1e-4)
    assert bool(res["success"].all())


def test_levenberg_marquardt_respects_bounds():
    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    y = (3.0 * x).expand(4, -1)  # best slope 3, but the box stops at 2

    def line(p: torch.Tensor) -> torch.Tensor:
        return p[:, :1] * x

    lower, upper = (
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([2.0], dtype=torch.float64),
    )
    p, rss, _ = levenberg_marquardt(
        line, y, torch.full((4, 1), 0.5, dtype=torch.float64), lower, upper
    )
    assert torch.allclose(p, torch.full_like(p, 2.0))
    assert torch.all(rss > 0)


def test_fit_rejects_mismatched_shapes():
    t = np.arange(0.0, 100.0, 5.0)
    with pytest.raises(ValueError, match="curves have 10 frames but t has 20"):
        fit_2cxm(np.zeros((3, 10)), t, parker_aif(t), device="cpu")
    with pytest.raises(ValueError, match=r"concentration must be \[N, T\]"):
        fit_2cxm(np.zeros(20), t, parker_aif(t), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            fit_2cxm(np.zeros((3, 20)), t, parker_aif(t), device="cuda")


def test_fit_on_non_uniform_frames_uses_the_exact_general_path():
    """Tissue frames that are not the AIF grid (variable frame rate) still fit exactly."""
    t = np.concatenate([np.arange(0.0, 60.0, 2.0), np.arange(60.0, 300.0, 10.0)])
    ta = np.arange(0.0, 300.0, 1.0)
    ca = parker_aif(ta, 10.0)
    ktrans, ve, vp = np.array([0.05, 0.2]), np.array([0.2, 0.4]), np.array([0.02, 0.06])
    curves = extended_tofts(t, ca, ktrans, ve, vp, ta=ta)
    res = fit_extended_tofts(curves, t, ca, ta=ta, device="cpu")
    np.testing.assert_allclose(res["ktrans"].numpy(), ktrans, rtol=1e-3)
    np.testing.assert_allclose(res["vp"].numpy(), vp, rtol=1e-3)


def test_temporal_resolution_sidecar_gives_uniform_frame_times(tmp_path):
    from shared.dce.io import read_dce, write_dce

    path = write_dce(tmp_path / "x_dce.nii.gz", np.zeros((2, 2, 1, 4)), np.arange(4.0))
    (tmp_path / "x_dce.json").write_text('{"TemporalResolution": 2.5, "StartTime": 1.0}')
    series = read_dce(path)
    np.testing.assert_allclose(series.times_s, [1.0, 3.5, 6.0, 8.5])
    assert series.quantity == "concentration" and series.hct == 0.42
