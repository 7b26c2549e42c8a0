"""DCE physics: Parker AIF, SPGR signal <-> concentration, exact-convolution kinetic models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.dce import (
    conc_to_signal,
    extended_tofts,
    parker_aif,
    parker_blood,
    signal_to_conc,
    tofts,
    twocxm,
)
from shared.dce.models import exp_convolution


def _fine_convolution(t_s: np.ndarray, ca: np.ndarray, k_per_min: float, q_s: float) -> float:
    """Brute-force reference: trapezoid on a 1 ms grid of the piecewise-linear AIF."""
    fine = np.arange(0.0, q_s + 1e-9, 0.001)
    values = np.interp(fine, t_s, ca, left=0.0) * np.exp(-k_per_min * (q_s - fine) / 60.0)
    return float(np.trapezoid(values, fine / 60.0))


def test_parker_aif_shape_delay_and_plasma_scaling():
    t = np.arange(0.0, 300.0, 1.0)
    cb = parker_blood(t)
    assert isinstance(cb, np.ndarray) and cb.shape == t.shape
    assert 9.0 <= t[np.argmax(cb)] <= 11.0  # first-pass peak at T1 = 0.17046 min
    assert 5.5 < cb.max() < 6.5
    delayed = parker_blood(t, 12.0)
    assert np.all(delayed[t < 12.0] == 0.0)
    np.testing.assert_allclose(delayed[12:], cb[:-12], rtol=1e-12)
    np.testing.assert_allclose(parker_aif(t, hct=0.45), cb / 0.55, rtol=1e-12)
    per_voxel = parker_aif(torch.tensor(t), torch.tensor([0.0, 5.0, 10.0]))
    assert isinstance(per_voxel, torch.Tensor) and per_voxel.shape == (3, 300)
    with pytest.raises(ValueError, match="haematocrit must be in"):
        parker_aif(t, hct=1.2)


def test_signal_concentration_round_trip_and_errors():
    rng = np.random.default_rng(0)
    conc = np.concatenate([np.zeros((4, 5)), rng.uniform(0, 3, size=(4, 40))], axis=1)
    t10 = np.array([0.9, 1.2, 1.4, 1.6])
    signal = conc_to_signal(conc, m0=1000.0, t10_s=t10, r1=4.5, tr_s=0.005, flip_deg=15)
    back = signal_to_conc(signal, t10, r1=4.5, tr_s=0.005, flip_deg=15, n_baseline=5)
    np.testing.assert_allclose(back, conc, atol=1e-9)
    assert np.all(np.diff(signal[0, 5:][np.argsort(conc[0, 5:])]) >= 0)  # signal rises with C
    with pytest.raises(ValueError, match="SPGR parameters out of range"):
        signal_to_conc(signal, t10, r1=4.5, tr_s=0.0, flip_deg=15)
    with pytest.raises(ValueError, match="baseline_start < n_baseline"):
        signal_to_conc(signal, t10, r1=4.5, tr_s=0.005, flip_deg=15, n_baseline=0)


@pytest.mark.parametrize("k", [0.0, 0.3, 4.0, 60.0])
def test_exp_convolution_is_exact_for_piecewise_linear_aif(k):
    t = np.arange(0.0, 240.0, 4.0)
    ca = parker_aif(t, 8.0)
    queries = np.array([[3.0, 61.7, 133.3, 239.0]])
    expected = [_fine_convolution(t, ca, k, q) for q in queries[0]]
    kt = torch.tensor([k], dtype=torch.float64)
    got, _ = exp_convolution(torch.tensor(t / 60), torch.tensor(ca), kt, torch.tensor(queries / 60))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6, atol=1e-9)
    # a non-uniform grid takes the recursive path and must agree too
    tn = np.sort(np.concatenate([t, [1.0, 50.5, 101.1]]))
    can = np.interp(tn, t, ca)
    got_n, _ = exp_convolution(
        torch.tensor(tn / 60), torch.tensor(can), kt, torch.tensor(queries / 60)
    )
    np.testing.assert_allclose(got_n[0].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_fast_uniform_path_matches_general_path_with_delays():
    t = np.arange(0.0, 300.0, 5.0)
    ca = parker_aif(t, 10.0)
    delays = np.array([-7.3, -2.5, 0.0, 1.0, 3.7, 9.9])
    fp, ps, ve, vp = 45.0, 0.12, 0.25, 0.06
    fast = twocxm(t, ca, np.full(6, fp), ps, ve, vp, delays)  # tissue grid == AIF grid: fast path
    # an AIF grid one (held) sample longer than the tissue grid forces the general path
    ta = np.append(t, t[-1] + 5.0)
    general = twocxm(t, np.append(ca, ca[-1]), np.full(6, fp), ps, ve, vp, delays, ta=ta)
    np.testing.assert_allclose(fast, general, rtol=1e-6, atol=1e-9)
    # an AIF that is non-zero at the first frame takes the extra ca_0 term of the fast path
    ca0 = parker_aif(t, 0.0) + 0.5
    fast0 = twocxm(t, ca0, np.full(6, fp), ps, ve, vp, delays)
    general0 = twocxm(t, np.append(ca0, ca0[-1]), np.full(6, fp), ps, ve, vp, delays, ta=ta)
    np.testing.assert_allclose(fast0, general0, rtol=1e-6, atol=1e-9)
    # delay of exactly one frame is a one-frame shift of the curve
    base = twocxm(t, ca, fp, ps, ve, vp)
    one = twocxm(t, ca, fp, ps, ve, vp, 5.0)
    np.testing.assert_allclose(one[1:], base[:-1], atol=1e-12)
    assert one[0] == 0.0


def test_2cxm_limits_match_tofts_models():
    t = np.arange(0.0, 300.0, 2.0)
    ca = parker_aif(t, 10.0)
    # PS -> 0: only the plasma space fills, a Tofts curve with Ktrans = F, ve = vp
    np.testing.assert_allclose(
        twocxm(t, ca, 30.0, 0.0, 0.3, 0.05), tofts(t, ca, 0.30, 0.05), rtol=1e-9, atol=1e-12
    )
    # Fp -> infinity: extended Tofts with Ktrans = PS
    far = twocxm(t, ca, 1e6, 0.1, 0.2, 0.05)
    np.testing.assert_allclose(far, extended_tofts(t, ca, 0.1, 0.2, 0.05), atol=1e-4)
    # impulse response at t=0 equals F: the initial slope of C equals F * ca for a step AIF
    t_short = np.array([0.0, 0.1])
    early = twocxm(t_short, np.ones(2), 60.0, 0.2, 0.2, 0.05)
    assert early[1] == pytest.approx(0.6 * (0.1 / 60.0), rel=0.02)


def test_models_broadcast_parameters_and_keep_tensor_kind():
    t = torch.arange(0.0, 120.0, 2.0, dtype=torch.float64)
    ca = parker_aif(t)
    ktrans = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64, requires_grad=True)
    curves = extended_tofts(t, ca, ktrans, 0.2, 0.03)
    assert isinstance(curves, torch.Tensor) and curves.shape == (3, 60)
    curves.sum().backward()
    assert torch.all(ktrans.grad > 0)
    with pytest.raises(ValueError, match="AIF has 59 samples"):
        tofts(t, ca[:-1], 0.1, 0.2)
