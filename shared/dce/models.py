"""Tracer-kinetic forward models with exact convolution: Tofts, extended Tofts and 2CXM.

Every model here is a sum of terms ``A * (ca ⊛ exp(-k t))`` (plus ``vp * ca`` for the vascular
term). The AIF ``ca`` is taken as piecewise linear between its samples, and the convolution of a
piecewise-linear function with an exponential has a closed form, so the curves are exact for that
AIF at any sampling (no up-sampling, no Riemann sums). On a uniform AIF grid the interval sums are
one causal FFT convolution per rate; on a non-uniform grid a short recursion is used.

Conventions (science.md 3.3-3.4): ``t``/``ta``/``delay`` in seconds; ``ktrans``/``ps`` in 1/min;
``fp`` in ml/100ml/min; ``ve``/``vp`` fractions; ``ca`` is **plasma** concentration in mM.
Parameters of shape [N] broadcast against times [T] to curves [N, T]; scalar parameters give [T].
Numpy in, numpy out; torch in, torch out (differentiable, on the tensors' device).
``delay`` shifts the AIF later: C(t) = model(ca(t - delay)). The AIF is 0 before its first sample.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.dce._tensor import any_tensor, as_tensor, back_to_input_kind


def _series_cut(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float64 else 3e-2


def _interval_weights(k: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = ∫_0^h e^{-k(h-u)} du and B = ∫_0^h u e^{-k(h-u)} du, stable for k*h -> 0."""
    kh = k * h
    small = kh.abs() < _series_cut(h.dtype)
    k_safe = torch.where(small, torch.ones_like(k), k)
    a_exact = -torch.expm1(-kh) / k_safe
    b_exact = (h - a_exact) / k_safe
    a_series = h * (1 - kh / 2 + kh * kh / 6)
    b_series = h * h * (0.5 - kh / 6 + kh * kh / 24)
    return torch.where(small, a_series, a_exact), torch.where(small, b_series, b_exact)


def _is_uniform(ta: torch.Tensor) -> bool:
    dt = torch.diff(ta)
    return bool((dt.max() - dt.min()).abs() <= 1e-9 * dt.abs().max().clamp_min(1e-30))


def _toeplitz(values: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """M [rows, length] with M[i, j] = values[i-1-j] (0 where i-1-j < 0)."""
    i = torch.arange(rows, device=values.device).unsqueeze(1)
    j = torch.arange(length, device=values.device).unsqueeze(0)
    src = i - 1 - j
    return torch.where(
        src >= 0,
        values[src.clamp_min(0)],
        torch.zeros((), dtype=values.dtype, device=values.device),
    )


def exp_convolution_uniform(
    step_min: float,
    ca: torch.Tensor,
    k: torch.Tensor,
    delay_min: torch.Tensor,
    cache: dict[int, torch.Tensor] | None = None,
    with_ca: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast exact path: tissue and AIF share one uniform grid t_i = t_0 + i*step (minutes).

    ca [T] (shared AIF); k [N] 1/min; delay_min [N]. Returns (convolution [N, T], ca(t-d) [N, T]
    or None when ``with_ca`` is False).
    Grid values F_i = sum_j a^j g_{i-1-j} (a = exp(-k step), g the exact interval contributions)
    come from one GEMM of the powers of a with a shared Toeplitz matrix of AIF values. The delay
    t - d = t_{i-n} + h (0 <= h < step, n per voxel) is a per-voxel shift plus one partial interval.
    """
    n_vox = k.shape[0]
    n_shift = torch.ceil(delay_min / step_min - 1e-9)
    h = (n_shift * step_min - delay_min).clamp_min(0.0)  # [N], in [0, step)
    pad = int(max(0.0, -float(n_shift.detach().min()))) if n_vox else 0
    if pad:
        ca = torch.cat([ca, ca[-1:].expand(pad)])
    size = ca.shape[0]
    slope = torch.diff(ca) / step_min
    slope_ext = torch.cat([slope, torch.zeros_like(slope[:1])])
    length = size - 1
    kk = k.unsqueeze(-1)
    powers = torch.exp(-kk * step_min * torch.arange(size, device=k.device, dtype=k.dtype))
    basis = None if cache is None else cache.get(pad)
    if basis is None:  # [L, size]: basis[j, i] = ca[i-1-j]
        basis = _toeplitz(ca[:-1], size, length).T.contiguous()
        if cache is not None:
            cache[pad] = basis
    # S_i = sum_j a^j ca_{i-1-j} (one GEMM). With g_m = ca_m (A - B/step) + ca_{m+1} B/step,
    # F_i = (A - B/step + a B/step) S_i + (B/step) (ca_i - a^i ca_0); the value a partial
    # interval h later is exp(-k h) F_j + A(h) ca_j + B(h) slope_j. Per-voxel scalars fold in.
    sums = powers[:, :length] @ basis  # [N, size]
    a_step, b_step = _interval_weights(kk, torch.full_like(kk, step_min))
    beta = b_step / step_min
    hh = h.unsqueeze(-1)
    a_h, b_h = _interval_weights(kk, hh)
    decay_h = torch.exp(-kk * hh)
    coef_sums = decay_h * (a_step - beta + beta * powers[:, 1:2])
    coef_ca = torch.cat([decay_h * beta + a_h, b_h], dim=1)  # [N, 2] against (ca, slope)
    partial = torch.addmm(coef_sums * sums, coef_ca, torch.stack([ca, slope_ext]))
    if bool(ca[0] != 0):
        partial = partial - (decay_h * beta * ca[0]) * powers
    n_out = size - pad
    idx = torch.arange(n_out, device=k.device).unsqueeze(0) - n_shift.to(torch.long).unsqueeze(-1)
    valid = idx >= 0
    idx = idx.clamp(0, size - 1)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    conv = torch.where(valid, torch.gather(partial, 1, idx), zero)
    if not with_ca:
        return conv, None
    ca_partial = ca + hh * slope_ext
    ca_q = torch.where(valid, torch.gather(ca_partial.expand(n_vox, -1), 1, idx), zero)
    return conv, ca_q


def exp_convolution(
    ta_min: torch.Tensor, ca: torch.Tensor, k: torch.Tensor, q_min: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ∫_0^q ca(τ) exp(-k (q-τ)) dτ for piecewise-linear ``ca`` sampled at ``ta_min``.

    General path (any increasing AIF grid, any query times). ta_min [Ta] (minutes); ca [Ta] or
    [N, Ta]; k [N] (1/min, >= 0); q_min [N, T]. Returns (convolution [N, T] in mM*min, ca
    interpolated at q [N, T]). Past the last AIF sample ca is held constant; before the first it is 0.
    """
    n = k.shape[0]
    dt = torch.diff(ta_min)  # [Ta-1]
    ca2 = ca.expand(n, -1) if ca.ndim == 1 else ca
    slope = torch.diff(ca2, dim=-1) / dt  # [N, Ta-1]
    kk = k.unsqueeze(-1)
    a_w, b_w = _interval_weights(kk, dt.expand(n, -1))
    g = ca2[:, :-1] * a_w + slope * b_w  # contribution of each interval at its right end
    length = g.shape[-1]
    if length == 0:
        grid = torch.zeros_like(ca2)
    elif _is_uniform(ta_min):
        step = dt[0]
        kernel = torch.exp(-kk * step * torch.arange(length, device=k.device, dtype=k.dtype))
        nfft = 2 * length
        conv = torch.fft.irfft(torch.fft.rfft(g, nfft) * torch.fft.rfft(kernel, nfft), nfft)
        grid = torch.cat([torch.zeros_like(g[:, :1]), conv[:, :length]], dim=-1)
    else:
        decay = torch.exp(-kk * dt)
        values = [torch.zeros_like(g[:, 0])]
        for m in range(length):
            values.append(decay[:, m] * values[-1] + g[:, m])
        grid = torch.stack(values, dim=-1)
    idx = torch.searchsorted(ta_min.contiguous(), q_min.contiguous(), right=True) - 1
    before = idx < 0
    idx = idx.clamp(0, ta_min.shape[0] - 1)
    h = q_min - ta_min[idx]
    slope_ext = torch.cat([slope, torch.zeros_like(slope[:, :1])], dim=-1)
    f_m = torch.gather(grid, 1, idx)
    c_m = torch.gather(ca2, 1, idx)
    s_m = torch.gather(slope_ext, 1, idx)
    a_q, b_q = _interval_weights(kk.expand_as(h), h)
    conv_q = torch.exp(-kk * h) * f_m + c_m * a_q + s_m * b_q
    ca_q = c_m + s_m * h
    zero = torch.zeros_like(conv_q)
    return torch.where(before, zero, conv_q), torch.where(before, zero, ca_q)


class Grid:
    """Tissue and AIF sampling, with the fast path chosen once (shared uniform grid, shared AIF)."""

    def __init__(self, t_min: torch.Tensor, ca: torch.Tensor, ta_min: torch.Tensor) -> None:
        self.t_min, self.ca, self.ta_min = t_min, ca, ta_min
        self._basis_cache: dict[int, torch.Tensor] = {}
        same = t_min.shape == ta_min.shape and bool(torch.allclose(t_min, ta_min, atol=1e-9))
        self.uniform_step = (
            float(ta_min[1] - ta_min[0])
            if same and ca.ndim == 1 and ta_min.shape[0] > 1 and _is_uniform(ta_min)
            else None
        )

    def convolve(
        self, k: torch.Tensor, delay_s: torch.Tensor, with_ca: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(∫ ca(τ - d) e^{-k(t-τ)} dτ, ca(t - d)) at the tissue times, each [N, T]."""
        if self.uniform_step is not None:
            return exp_convolution_uniform(
                self.uniform_step, self.ca, k, delay_s / 60.0, self._basis_cache, with_ca
            )
        q = (self.t_min.unsqueeze(0) - (delay_s / 60.0).unsqueeze(-1)).expand(k.shape[0], -1)
        return exp_convolution(self.ta_min, self.ca, k, q)


def _prepare(t: Any, ca: Any, ta: Any, params: list[Any]):
    """Common tensors: times in minutes, AIF, params flattened to [N] and the scalar flag."""
    like = any_tensor(t, ca, ta, *params)
    t_s = as_tensor(t, like)
    ca_t = as_tensor(ca, t_s)
    ta_s = t_s if ta is None else as_tensor(ta, t_s)
    if ta_s.ndim != 1 or ca_t.shape[-1] != ta_s.shape[0]:
        raise ValueError(
            f"AIF has {ca_t.shape[-1]} samples but its time axis has {tuple(ta_s.shape)} "
            "(pass ta= when the AIF is sampled differently from the tissue curve)"
        )
    if t_s.ndim != 1:
        raise ValueError(f"tissue time axis must be 1-D, got shape {tuple(t_s.shape)}")
    p = [as_tensor(x, t_s) for x in params]
    scalar = all(x.ndim == 0 for x in p)
    p = torch.broadcast_tensors(*[x.reshape(-1) for x in p])
    return t_s / 60.0, ca_t, ta_s / 60.0, p, scalar


def _finish(curve: torch.Tensor, scalar: bool, inputs: tuple) -> Any:
    return back_to_input_kind(curve[0] if scalar else curve, *inputs)


def extended_tofts(
    t: Any, ca: Any, ktrans: Any, ve: Any, vp: Any, delay: Any = 0.0, ta: Any = None
) -> Any:
    """C(t) = vp ca(t-d) + Ktrans ∫ ca(τ-d) exp(-Ktrans/ve (t-τ)) dτ (extended Tofts)."""
    t_min, ca_t, ta_min, (kt, v_e, v_p, d), scalar = _prepare(t, ca, ta, [ktrans, ve, vp, delay])
    kep = kt / v_e.clamp_min(1e-12)
    conv, ca_q = Grid(t_min, ca_t, ta_min).convolve(kep, d)
    curve = v_p.unsqueeze(-1) * ca_q + kt.unsqueeze(-1) * conv
    return _finish(curve, scalar, (t, ca, ta, ktrans, ve, vp, delay))


def tofts(t: Any, ca: Any, ktrans: Any, ve: Any, delay: Any = 0.0, ta: Any = None) -> Any:
    """Standard Tofts model: extended Tofts with vp = 0."""
    return extended_tofts(t, ca, ktrans, ve, 0.0, delay, ta)


def twocxm_rates(
    fp: torch.Tensor, ps: torch.Tensor, ve: torch.Tensor, vp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2CXM as two exponentials: (sigma_minus, sigma_plus, amp_minus, amp_plus), rates in 1/min.

    irf(t) = amp_minus exp(-sigma_minus t) + amp_plus exp(-sigma_plus t), amp_minus + amp_plus = F.
    Written with sums/products of the rates so that PS -> 0 is finite (sigma_minus -> 0).
    """
    f = fp / 100.0
    vp_ = vp.clamp_min(1e-9)
    ve_ = ve.clamp_min(1e-9)
    total = (ps * (vp_ + ve_) + f * ve_) / (vp_ * ve_)  # sigma+ + sigma-
    prod = f * ps / (vp_ * ve_)  # sigma+ * sigma-
    root = torch.sqrt((total * total - 4 * prod).clamp_min(0.0))
    sig_p = (total + root) / 2
    sig_m = 2 * prod / (total + root).clamp_min(1e-300)
    gap = (sig_p - sig_m).clamp_min(1e-12)
    amp_m = (prod * (vp_ + ve_) - f * sig_m) / gap
    amp_p = (f * sig_p - prod * (vp_ + ve_)) / gap
    return sig_m, sig_p, amp_m, amp_p


def twocxm(
    t: Any, ca: Any, fp: Any, ps: Any, ve: Any, vp: Any, delay: Any = 0.0, ta: Any = None
) -> Any:
    """Two-compartment exchange model tissue curve C_t = irf ⊛ ca(t - delay) (science.md 3.4)."""
    t_min, ca_t, ta_min, (f_p, p_s, v_e, v_p, d), scalar = _prepare(
        t, ca, ta, [fp, ps, ve, vp, delay]
    )
    sig_m, sig_p, amp_m, amp_p = twocxm_rates(f_p, p_s, v_e, v_p)
    grid = Grid(t_min, ca_t, ta_min)
    conv_m, _ = grid.convolve(sig_m, d, with_ca=False)
    conv_p, _ = grid.convolve(sig_p, d, with_ca=False)
    curve = amp_m.unsqueeze(-1) * conv_m + amp_p.unsqueeze(-1) * conv_p
    return _finish(curve, scalar, (t, ca, ta, fp, ps, ve, vp, delay))


def ktrans_from_2cxm(fp: Any, ps: Any) -> Any:
    """Ktrans = E Fp = PS F / (PS + F) in 1/min (F = Fp/100)."""
    f = fp / 100.0
    return ps * f / (ps + f + 1e-30)
