"""Parker population arterial input function (Parker et al., MRM 2006;56:993).

The published formula is in minutes; these functions take time in **seconds** (like DCE data and
sidecars) and convert. ``parker_blood`` is whole-blood concentration C_b (the OSIPI reference);
``parker_aif`` is plasma concentration C_p = C_b / (1 - Hct), which the kinetic models expect.
Both are zero before ``delay_s`` (the bolus arrival / injection start).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shared.dce._tensor import any_tensor, as_tensor, back_to_input_kind

# Parker 2006 population parameters (time in minutes, concentration in mM).
A1, A2 = 0.809, 0.330  # mM*min
T1, T2 = 0.17046, 0.365  # min
SIGMA1, SIGMA2 = 0.0563, 0.132  # min
ALPHA, BETA = 1.050, 0.1685  # mM, 1/min
S_SIG, TAU = 38.078, 0.483  # 1/min, min
DEFAULT_HCT = 0.42


def _parker_blood_minutes(t_min: torch.Tensor) -> torch.Tensor:
    """C_b(t) of the Parker formula for t in minutes (no delay, no clipping)."""
    g1 = A1 / (SIGMA1 * math.sqrt(2 * math.pi)) * torch.exp(-((t_min - T1) ** 2) / (2 * SIGMA1**2))
    g2 = A2 / (SIGMA2 * math.sqrt(2 * math.pi)) * torch.exp(-((t_min - T2) ** 2) / (2 * SIGMA2**2))
    sigmoid = ALPHA * torch.exp(-BETA * t_min) / (1 + torch.exp(-S_SIG * (t_min - TAU)))
    return g1 + g2 + sigmoid


def parker_blood(t_s: Any, delay_s: Any = 0.0) -> Any:
    """Whole-blood Parker AIF C_b (mM) at times ``t_s`` (seconds), shifted by ``delay_s`` seconds.

    ``delay_s`` may be a scalar or a tensor of shape [N] (one delay per curve), giving [N, T].
    Values before the delay are 0.
    """
    like = any_tensor(t_s, delay_s)
    t = as_tensor(t_s, like)
    d = as_tensor(delay_s, t)
    if d.ndim > 0:
        d = d.reshape(*d.shape, *([1] * t.ndim))
    shifted = (t - d) / 60.0
    cb = torch.where(
        shifted >= 0, _parker_blood_minutes(shifted.clamp_min(0)), torch.zeros_like(shifted)
    )
    return back_to_input_kind(cb, t_s, delay_s)


def parker_aif(t_s: Any, delay_s: Any = 0.0, hct: float = DEFAULT_HCT) -> Any:
    """Plasma Parker AIF C_p = C_b / (1 - hct) in mM; time and delay in seconds."""
    if not 0.0 <= hct < 1.0:
        raise ValueError(f"parker_aif: haematocrit must be in [0, 1), got {hct}")
    cb = parker_blood(t_s, delay_s)
    return cb / (1.0 - hct)
