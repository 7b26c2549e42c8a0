"""Linear-least-squares (LLS) starting values for the kinetic fits.

Integrating the model ODEs turns Tofts/extended Tofts (Murase, MRM 2004) and the 2CXM (Flouri et
al., MRM 2016) into linear regressions on running integrals of the tissue curve and the AIF. The
estimates are biased by the trapezoid integrals and noise, which is why they only seed the
Levenberg-Marquardt fit in ``shared.dce.fit``. Times in minutes here; arrays are torch tensors.
"""

from __future__ import annotations

import torch


def cumtrapz(values: torch.Tensor, t_min: torch.Tensor) -> torch.Tensor:
    """Cumulative trapezoid integral along the last axis, starting at 0."""
    dt = torch.diff(t_min)
    pieces = 0.5 * (values[..., 1:] + values[..., :-1]) * dt
    return torch.cat([torch.zeros_like(values[..., :1]), torch.cumsum(pieces, dim=-1)], dim=-1)


def shift_aif(ca: torch.Tensor, ta_min: torch.Tensor, t_min: torch.Tensor, delay_s: float):
    """ca(t - delay) by linear interpolation (0 before the first AIF sample, held after the last)."""
    q = t_min - delay_s / 60.0
    idx = torch.searchsorted(ta_min.contiguous(), q.contiguous(), right=True) - 1
    before = idx < 0
    idx = idx.clamp(0, ta_min.shape[0] - 2)
    frac = ((q - ta_min[idx]) / (ta_min[idx + 1] - ta_min[idx])).clamp(max=1.0)
    value = ca[idx] + frac * (ca[idx + 1] - ca[idx])
    return torch.where(before, torch.zeros_like(value), value)


def _lls_solve(design: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched least squares via ridge-stabilised normal equations; design [N, T, K]."""
    xtx = design.transpose(1, 2) @ design
    scale = torch.diagonal(xtx, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    eye = torch.eye(design.shape[-1], dtype=y.dtype, device=y.device)
    xty = (design.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    sol, _ = torch.linalg.solve_ex(xtx + 1e-10 * scale[:, None, None] * eye, xty)
    return sol


def lls_2cxm(
    ct: torch.Tensor,
    t_min: torch.Tensor,
    ca_t: torch.Tensor,
    ct_integrals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """LLS 2CXM estimate [N, 4] = (fp, ps, ve, vp); NaN where the solution is not physical.

    C = -a1 ∫C - a0 ∫∫C + b1 ∫ca + b0 ∫∫ca, with b1 = F, a0 = σ+σ-, a1 = σ+ + σ-,
    b0/a0 = vp + ve (Flouri et al., MRM 2016).
    """
    if ct_integrals is None:
        i1 = cumtrapz(ct, t_min)
        ct_integrals = (i1, cumtrapz(i1, t_min))
    i1, i2 = ct_integrals
    j1 = cumtrapz(ca_t, t_min)
    j2 = cumtrapz(j1, t_min)
    j1, j2 = j1.expand_as(ct), j2.expand_as(ct)
    a1n, a0n, b1, b0 = _lls_solve(torch.stack([-i1, -i2, j1, j2], dim=-1), ct).unbind(-1)
    f = b1
    volume = b0 / a0n
    t_total = volume / f
    t_e = a1n / a0n - t_total
    t_c = 1.0 / (a0n * t_e)
    vp = f * t_c
    ve = volume - vp
    ps = ve / t_e
    out = torch.stack([f * 100.0, ps, ve, vp], dim=-1)
    ok = (f > 0) & (a0n > 0) & (t_e > 0) & (vp > 0) & (ve > 0) & torch.isfinite(out).all(-1)
    return torch.where(ok.unsqueeze(-1), out, torch.full_like(out, float("nan")))


def lls_etofts(
    ct: torch.Tensor,
    t_min: torch.Tensor,
    ca_t: torch.Tensor,
    ct_integrals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """LLS extended Tofts estimate [N, 3] = (ktrans, ve, vp) (Murase 2004); NaN if not physical."""
    i1 = cumtrapz(ct, t_min) if ct_integrals is None else ct_integrals[0]
    j1 = cumtrapz(ca_t, t_min).expand_as(ct)
    vp, b, kep = _lls_solve(torch.stack([ca_t.expand_as(ct), j1, -i1], dim=-1), ct).unbind(-1)
    ktrans = b - kep * vp
    ve = ktrans / kep
    out = torch.stack([ktrans, ve, vp], dim=-1)
    ok = (kep > 0) & (ktrans >= 0) & torch.isfinite(out).all(-1)
    return torch.where(ok.unsqueeze(-1), out, torch.full_like(out, float("nan")))
