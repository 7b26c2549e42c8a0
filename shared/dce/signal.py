"""Spoiled gradient echo (SPGR/FLASH) signal <-> contrast concentration (science.md 3.1).

Fast water exchange, R1(t) = R10 + r1*C(t). M0 is estimated from the pre-contrast baseline, as in the
OSIPI LEK (Edinburgh) reference implementation. Units: TR and T10 in seconds, r1 in 1/(mM*s),
flip angle in degrees, concentration in mM. The time axis is the last axis.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shared.dce._tensor import any_tensor, as_tensor, back_to_input_kind


def _check_sequence(t10_s: Any, r1: float, tr_s: float, flip_deg: float) -> None:
    if tr_s <= 0 or r1 <= 0 or not 0 < flip_deg < 180:
        raise ValueError(
            f"SPGR parameters out of range: TR={tr_s} s, r1={r1} /mM/s, flip={flip_deg} deg "
            "(need TR>0, r1>0, 0<flip<180)"
        )


def spgr_signal(m0: Any, r1_total: torch.Tensor, tr_s: float, flip_deg: float) -> torch.Tensor:
    """S = M0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR R1)."""
    a = math.radians(flip_deg)
    e1 = torch.exp(-tr_s * r1_total)
    return m0 * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1)


def conc_to_signal(conc: Any, m0: Any, t10_s: Any, r1: float, tr_s: float, flip_deg: float) -> Any:
    """SPGR signal for concentration ``conc`` [..., T]; ``m0`` and ``t10_s`` broadcast as [..., 1]."""
    _check_sequence(t10_s, r1, tr_s, flip_deg)
    like = any_tensor(conc, m0, t10_s)
    c = as_tensor(conc, like)
    m0_t = as_tensor(m0, c)
    t10 = as_tensor(t10_s, c)
    if m0_t.ndim and m0_t.shape != c.shape:
        m0_t = m0_t.unsqueeze(-1)
    if t10.ndim and t10.shape != c.shape:
        t10 = t10.unsqueeze(-1)
    signal = spgr_signal(m0_t, 1.0 / t10 + r1 * c, tr_s, flip_deg)
    return back_to_input_kind(signal, conc, m0, t10_s)


def m0_from_baseline(
    baseline: torch.Tensor, t10: torch.Tensor, tr_s: float, flip_deg: float
) -> torch.Tensor:
    """M0 = S_base (1 - cos a E10) / (sin a (1 - E10)), E10 = exp(-TR/T10)."""
    a = math.radians(flip_deg)
    e10 = torch.exp(-tr_s / t10)
    return baseline * (1 - math.cos(a) * e10) / (math.sin(a) * (1 - e10))


def signal_to_conc(
    signal: Any,
    t10_s: Any,
    r1: float,
    tr_s: float,
    flip_deg: float,
    n_baseline: int = 1,
    baseline: Any = None,
    baseline_start: int = 0,
) -> Any:
    """Concentration (mM) from SPGR signal [..., T].

    The baseline signal is the mean of frames ``baseline_start .. n_baseline-1`` unless
    ``baseline`` ([...]) is given. The OSIPI reference (LEK, Edinburgh) skips the first frame, which
    is not yet at steady state: ``baseline_start=1``. Frames whose signal exceeds the M0 sin(a)
    ceiling give NaN (no physical R1).
    """
    _check_sequence(t10_s, r1, tr_s, flip_deg)
    if not 0 <= baseline_start < n_baseline:
        raise ValueError(
            f"signal_to_conc: need 0 <= baseline_start < n_baseline, got {baseline_start}, {n_baseline}"
        )
    like = any_tensor(signal, t10_s, baseline)
    s = as_tensor(signal, like)
    if s.shape[-1] < n_baseline:
        raise ValueError(f"signal_to_conc: {s.shape[-1]} frames but n_baseline={n_baseline}")
    t10 = as_tensor(t10_s, s)
    if t10.ndim:
        t10 = t10.unsqueeze(-1)
    base = (
        s[..., baseline_start:n_baseline].mean(dim=-1, keepdim=True)
        if baseline is None
        else as_tensor(baseline, s).unsqueeze(-1)
    )
    a = math.radians(flip_deg)
    m0 = m0_from_baseline(base, t10, tr_s, flip_deg)
    num = m0 * math.sin(a) - s
    den = m0 * math.sin(a) - s * math.cos(a)
    r1_t = -torch.log(num / den) / tr_s
    conc = (r1_t - 1.0 / t10) / r1
    return back_to_input_kind(conc, signal, t10_s, baseline)
