"""Batched, bounded Levenberg-Marquardt fitting of 2CXM, extended Tofts and Tofts for whole volumes.

All voxels of a chunk are fitted at once in torch (CPU or GPU). The 2CXM Jacobian is semi-analytic
(exact delay derivative, convolution differences for the rates, chain rule to Fp/PS/ve/vp); the
Tofts models use forward differences of the exact forward models (``shared.dce.models``). The damped
normal equations are solved as a batch of PxP systems, steps are projected onto the parameter box,
the Jacobian is reused after rejected steps, and voxels leave the active set as they converge.
Multi-start: every voxel starts from the best linear-least-squares (LLS, ``shared.dce.lls``) estimate
over a grid of candidate delays; voxels whose LLS estimate was unphysical, that did not converge, or
whose RSS is above 3x the chunk median are refitted from the OSIPI default start, keeping the
lower-RSS fit.

Units as in ``shared.dce.models``: t and delay in seconds, Fp ml/100ml/min, PS and Ktrans 1/min.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from shared.dce._tensor import as_tensor
from shared.dce.lls import cumtrapz, lls_2cxm, lls_etofts, shift_aif
from shared.dce.models import Grid, ktrans_from_2cxm, twocxm_rates
from shared.device import pick_device

ModelFn = Callable[[torch.Tensor], torch.Tensor]

# name -> (lower, upper, OSIPI start); bounds follow the OSIPI test-suite table.
BOUNDS_2CXM: dict[str, tuple[float, float, float]] = {
    "fp": (1e-3, 200.0, 20.0),
    "ps": (0.0, 5.0, 0.6),
    "ve": (1e-4, 1.0, 0.2),
    "vp": (1e-4, 1.0, 0.01),
    "delay": (-10.0, 10.0, 0.0),
}
BOUNDS_ETOFTS: dict[str, tuple[float, float, float]] = {
    "ktrans": (0.0, 5.0, 0.6),
    "ve": (1e-4, 1.0, 0.2),
    "vp": (0.0, 1.0, 0.01),
    "delay": (-10.0, 10.0, 0.0),
}



def _fd_jacobian(
    model: ModelFn, p: torch.Tensor, f: torch.Tensor, upper: torch.Tensor, fd_step: torch.Tensor
) -> torch.Tensor:
    """Forward-difference Jacobian [M, T, P]; steps go inwards at the upper bound."""
    n_par = p.shape[1]
    jac = torch.empty(*f.shape, n_par, dtype=p.dtype, device=p.device)
    for j in range(n_par):
        step = torch.where(p[:, j] + fd_step[j] > upper[j], -fd_step[j], fd_step[j])
        shifted = p.clone()
        shifted[:, j] += step
        jac[..., j] = (model(shifted) - f) / step.unsqueeze(-1)
    return jac


def levenberg_marquardt(
    model: ModelFn,
    y: torch.Tensor,
    p0: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    max_iter: int = 100,
    rtol: float = 1e-8,
    xtol: float = 1e-6,
    jacobian: ModelFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``model(p [M, P]) -> [M, T]`` to ``y [M, T]`` inside the box [lower, upper].

    Marquardt damping (lambda * diag(J^T J)), projected steps, Jacobian recomputed only where a
    step was accepted. A voxel converges when an accepted step reduces the RSS by less than
    ``rtol`` (relative) or moves every parameter by less than ``xtol`` of its scale.
    ``jacobian(p) -> [M, T, P]`` replaces the forward-difference Jacobian when given.
    Returns (parameters [M, P], residual sum of squares [M], converged [M] bool).
    """
    p = torch.minimum(torch.maximum(p0.clone(), lower), upper)
    fitted = model(p)
    rss = ((fitted - y) ** 2).sum(-1)
    n_vox, n_par = p.shape
    lam = torch.full_like(rss, 1e-2)
    converged = torch.zeros_like(rss, dtype=torch.bool)
    active = torch.arange(n_vox, device=p.device)
    scale = 1e-3 * (upper - lower).clamp_min(1e-3)
    fd_step = 1e-4 * scale
    jtj = torch.zeros(n_vox, n_par, n_par, dtype=p.dtype, device=p.device)
    grad = torch.zeros(n_vox, n_par, dtype=p.dtype, device=p.device)
    need_jac = torch.ones(n_vox, dtype=torch.bool, device=p.device)
    eye = torch.eye(n_par, dtype=p.dtype, device=p.device)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        refresh = active[need_jac[active]]
        if refresh.numel():
            jac = (
                jacobian(p[refresh])
                if jacobian is not None
                else _fd_jacobian(model, p[refresh], fitted[refresh], upper, fd_step)
            )
            jt = jac.transpose(1, 2)
            jtj[refresh] = jt @ jac
            grad[refresh] = (jt @ (fitted[refresh] - y[refresh]).unsqueeze(-1)).squeeze(-1)
            need_jac[refresh] = False
        pa, ya, la, a_jtj = p[active], y[active], lam[active], jtj[active]
        diag = torch.diagonal(a_jtj, dim1=1, dim2=2).clamp_min(1e-12)
        system = a_jtj + la[:, None, None] * torch.diag_embed(diag) + 1e-12 * eye
        delta, _ = torch.linalg.solve_ex(system, -grad[active])
        trial = torch.minimum(torch.maximum(pa + delta, lower), upper)
        f_trial = model(trial)
        rss_trial = ((f_trial - ya) ** 2).sum(-1)
        rss_old = rss[active]
        better = torch.isfinite(rss_trial) & (rss_trial < rss_old)
        moved = ((trial - pa).abs() / scale).amax(-1)
        p[active] = torch.where(better.unsqueeze(-1), trial, pa)
        fitted[active] = torch.where(better.unsqueeze(-1), f_trial, fitted[active])
        rss[active] = torch.where(better, rss_trial, rss_old)
        lam[active] = torch.where(better, la * 0.3, la * 10.0).clamp(1e-9, 1e12)
        need_jac[active] = better
        small = better & (((rss_old - rss_trial) <= rtol * rss_old + 1e-30) | (moved < xtol * 1e3))
        stuck = (~better) & ((lam[active] >= 1e12) | (moved < xtol))
        done = small | stuck | (rss[active] <= 1e-30)
        converged[active] = converged[active] | small | stuck | (rss[active] <= 1e-30)
        active = active[~done]
    return p, rss, converged


def _fit_chunk(
    model: ModelFn,
    jacobian: ModelFn | None,
    ct: torch.Tensor,
    first: torch.Tensor,
    fallback: torch.Tensor,
    retry_always: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM from ``first``; voxels that did not converge, had no valid LLS start
    (``retry_always``) or ended with an RSS above 3x the chunk median are refitted from
    ``fallback``, keeping the lower-RSS result."""
    p, rss, ok = levenberg_marquardt(model, ct, first, lower, upper, max_iter, jacobian=jacobian)
    finite = torch.isfinite(rss)
    median = rss[finite].median() if bool(finite.any()) else torch.zeros((), dtype=rss.dtype)
    retry = retry_always | ~ok | ~finite | (rss > 3 * median)
    idx = torch.nonzero(retry).squeeze(-1)
    if idx.numel():
        p2, rss2, ok2 = levenberg_marquardt(
            model, ct[idx], fallback[idx], lower, upper, max_iter, jacobian=jacobian
        )
        better = torch.isfinite(rss2) & (~torch.isfinite(rss[idx]) | (rss2 < rss[idx]))
        keep = idx[better]
        p[keep], rss[keep], ok[keep] = p2[better], rss2[better], ok2[better]
    return p, rss, ok


def jacobian_2cxm(grid: Grid, p: torch.Tensor, fit_delay: bool) -> torch.Tensor:
    """Semi-analytic 2CXM Jacobian [N, T, P] for p = (fp, ps, ve, vp[, delay]).

    C = sum_r A_r E_r with E_r = ca(.-d) ⊛ exp(-k_r t). dC/dA_r = E_r; dE/dk by a difference of
    the convolution alone; dE/dd = -(ca(t-d) - k E)/60 exactly (E' = ca - kE); the map
    (fp, ps, ve, vp) -> (k_-, k_+, A_-, A_+) is differentiated by forward differences on [N].
    """
    theta = p[:, :4]
    delay = p[:, 4] if fit_delay else torch.zeros_like(p[:, 0])
    rates = torch.stack(twocxm_rates(*theta.unbind(-1)), dim=-1)  # [N, 4]: k-, k+, A-, A+
    steps = 1e-7 * theta.abs().clamp_min(1e-4)
    d_rates = torch.empty(theta.shape[0], 4, 4, dtype=p.dtype, device=p.device)  # [N, rate, theta]
    for j in range(4):
        moved = theta.clone()
        moved[:, j] += steps[:, j]
        d_rates[:, :, j] = (torch.stack(twocxm_rates(*moved.unbind(-1)), -1) - rates) / steps[
            :, j : j + 1
        ]
    convs, weighted_dk, dd = [], [], []
    for r in range(2):
        k, amp = rates[:, r], rates[:, r + 2]
        dk = 1e-6 * k.abs().clamp_min(1e-3)
        conv, ca_q = grid.convolve(k, delay, with_ca=fit_delay)
        conv_dk, _ = grid.convolve(k + dk, delay, with_ca=False)
        convs.append(conv)
        weighted_dk.append(amp.unsqueeze(-1) * (conv_dk - conv) / dk.unsqueeze(-1))
        if fit_delay:
            dd.append(-amp.unsqueeze(-1) * (ca_q - k.unsqueeze(-1) * conv) / 60.0)
    jac = torch.bmm(torch.stack(convs, -1), d_rates[:, 2:4, :])  # through the amplitudes
    jac = jac + torch.bmm(torch.stack(weighted_dk, -1), d_rates[:, 0:2, :])  # through the rates
    if fit_delay:
        jac = torch.cat([jac, (dd[0] + dd[1]).unsqueeze(-1)], dim=-1)
    return jac


def _fit_volume(
    kind: str,
    ct: Any,
    t: Any,
    ca: Any,
    ta: Any,
    fit_delay: bool,
    bounds: dict[str, tuple[float, float, float]],
    delay_grid: Sequence[float],
    max_iter: int,
    chunk_size: int,
    device: str,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None,
) -> dict[str, torch.Tensor]:
    dev = pick_device(device)
    like = torch.empty(0, dtype=dtype, device=dev)
    y_all = as_tensor(ct, like)
    if y_all.ndim != 2:
        raise ValueError(f"fit_{kind}: concentration must be [N, T], got {tuple(y_all.shape)}")
    t_min = as_tensor(t, like) / 60.0
    ca_t = as_tensor(ca, like)
    ta_min = t_min if ta is None else as_tensor(ta, like) / 60.0
    if y_all.shape[1] != t_min.shape[0]:
        raise ValueError(
            f"fit_{kind}: curves have {y_all.shape[1]} frames but t has {t_min.shape[0]}"
        )
    if ca_t.ndim != 1 or ca_t.shape[0] != ta_min.shape[0]:
        raise ValueError(f"fit_{kind}: AIF must be 1-D with one value per AIF time")
    grid = Grid(t_min, ca_t, ta_min)
    names = list(bounds) if fit_delay else [n for n in bounds if n != "delay"]
    lower = torch.tensor([bounds[n][0] for n in names], dtype=dtype, device=dev)
    upper = torch.tensor([bounds[n][1] for n in names], dtype=dtype, device=dev)
    default = torch.tensor([bounds[n][2] for n in names], dtype=dtype, device=dev)

    def model(p: torch.Tensor) -> torch.Tensor:
        delay = p[:, -1] if fit_delay else torch.zeros_like(p[:, 0])
        if kind == "2cxm":
            sig_m, sig_p, amp_m, amp_p = twocxm_rates(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
            conv_m, _ = grid.convolve(sig_m, delay, with_ca=False)
            conv_p, _ = grid.convolve(sig_p, delay, with_ca=False)
            return amp_m.unsqueeze(-1) * conv_m + amp_p.unsqueeze(-1) * conv_p
        ktrans, ve = p[:, 0], p[:, 1]
        vp = p[:, 2] if "vp" in names else torch.zeros_like(ktrans)
        conv, ca_q = grid.convolve(ktrans / ve.clamp_min(1e-12), delay)
        return vp.unsqueeze(-1) * ca_q + ktrans.unsqueeze(-1) * conv

    def jacobian_fn(p: torch.Tensor) -> torch.Tensor:
        return jacobian_2cxm(grid, p, fit_delay)

    jacobian = jacobian_fn if kind == "2cxm" else None
    lls = lls_2cxm if kind == "2cxm" else lls_etofts
    n_lls = {"2cxm": 4, "etofts": 3, "tofts": 2}[kind]
    delays = list(delay_grid) if fit_delay else [0.0]
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for begin in range(0, y_all.shape[0], chunk_size):
        y = y_all[begin : begin + chunk_size]
        n = y.shape[0]
        best_start = default.expand(n, -1).clone()
        best_rss = torch.full((n,), float("inf"), dtype=dtype, device=dev)
        lls_valid = torch.zeros(n, dtype=torch.bool, device=dev)
        i1 = cumtrapz(y, t_min)
        integrals = (i1, cumtrapz(i1, t_min))
        for delay in delays:
            est = lls(y, t_min, shift_aif(ca_t, ta_min, t_min, delay), integrals)[:, :n_lls]
            cand = default.expand(n, -1).clone()
            cand[:, : est.shape[1]] = torch.where(torch.isnan(est), cand[:, : est.shape[1]], est)
            if fit_delay:
                cand[:, -1] = delay
            cand = torch.minimum(torch.maximum(cand, lower), upper)
            rss = ((model(cand) - y) ** 2).sum(-1)
            take = rss < best_rss
            best_start[take], best_rss[take] = cand[take], rss[take]
            lls_valid[take] = ~torch.isnan(est[take]).any(-1)
        other = default.expand(n, -1).clone()
        if fit_delay:
            other[:, -1] = best_start[:, -1]
        results.append(
            _fit_chunk(model, jacobian, y, best_start, other, ~lls_valid, lower, upper, max_iter)
        )
        if progress is not None:
            progress(n)
    p = torch.cat([r[0] for r in results]).cpu()
    out = {name: p[:, i] for i, name in enumerate(names)}
    if not fit_delay:
        out["delay"] = torch.zeros_like(p[:, 0])
    if kind == "tofts":
        out["vp"] = torch.zeros_like(p[:, 0])
    out["rss"] = torch.cat([r[1] for r in results]).cpu()
    out["success"] = torch.cat([r[2] for r in results]).cpu() & torch.isfinite(out["rss"])
    if kind == "2cxm":
        out["ktrans"] = ktrans_from_2cxm(out["fp"], out["ps"])
    return out


def fit_2cxm(
    ct: Any,
    t: Any,
    ca: Any,
    ta: Any = None,
    fit_delay: bool = True,
    bounds: dict[str, tuple[float, float, float]] | None = None,
    delay_grid: Sequence[float] = (-4.0, 0.0, 2.5, 5.0, 7.5),
    max_iter: int = 100,
    chunk_size: int = 20000,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit the 2CXM to tissue curves ``ct`` [N, T] (mM) at times ``t`` [T] (s) with plasma AIF ``ca``.

    Returns CPU tensors [N]: fp, ps, ve, vp, delay (s; 0 when not fitted), ktrans (derived,
    1/min), rss, success. ``progress`` is called with the number of voxels finished per chunk.
    """
    return _fit_volume(
        "2cxm",
        ct,
        t,
        ca,
        ta,
        fit_delay,
        bounds or BOUNDS_2CXM,
        delay_grid,
        max_iter,
        chunk_size,
        device,
        dtype,
        progress,
    )


def fit_extended_tofts(
    ct: Any,
    t: Any,
    ca: Any,
    ta: Any = None,
    fit_delay: bool = False,
    bounds: dict[str, tuple[float, float, float]] | None = None,
    delay_grid: Sequence[float] = (-4.0, 0.0, 2.5, 5.0, 7.5),
    max_iter: int = 100,
    chunk_size: int = 20000,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit the extended Tofts model; returns CPU tensors [N]: ktrans, ve, vp, delay, rss, success."""
    return _fit_volume(
        "etofts",
        ct,
        t,
        ca,
        ta,
        fit_delay,
        bounds or BOUNDS_ETOFTS,
        delay_grid,
        max_iter,
        chunk_size,
        device,
        dtype,
        progress,
    )


def fit_tofts(
    ct: Any,
    t: Any,
    ca: Any,
    ta: Any = None,
    fit_delay: bool = False,
    max_iter: int = 100,
    chunk_size: int = 20000,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Fit the standard Tofts model (vp = 0); returns ktrans, ve, vp (=0), delay, rss, success."""
    bounds = {k: v for k, v in BOUNDS_ETOFTS.items() if k != "vp"}
    return _fit_volume(
        "tofts",
        ct,
        t,
        ca,
        ta,
        fit_delay,
        bounds,
        (-4.0, 0.0, 2.5, 5.0, 7.5),
        max_iter,
        chunk_size,
        device,
        dtype,
        None,
    )
