"""Scanner-like intensity augmentation for z-scored MR inputs (``augment_level = "mr"``).

Sites differ by scanner: contrast curve, coil sensitivity (a smooth multiplicative bias field) and
noise. These draw such differences per case and channel on an input that is already z-scored over
the brain (background 0), so a model sees more scanners than its training sites own. The bias field
acts on the raw intensity, ``raw * field``; in z-score units that is ``z * field + k * (field - 1)``
with ``k = mean / std`` of the raw brain intensity (drawn in ``K_RANGE``), z-scored over the brain
again as the preprocessing would. Works on a batch
[B, C, D, H, W] on any device; random numbers come from a CPU generator (reproducible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_LEVELS = ("basic", "mr")  # basic: flips, small rotation, scale/shift jitter; mr: + scanner-like
GAMMA_LOG_RANGE = 0.3  # contrast curve: gamma = exp(U(-0.3, 0.3)) on the brain's min-max range
BIAS_STD = 0.15  # log bias field: N(0, 0.15) on a 4^3 grid, trilinear to the input size
K_RANGE = (2.0, 5.0)  # raw brain mean / std of MR intensities (z-score units of the bias field)
NOISE_MAX = 0.1  # Gaussian noise, std U(0, 0.1) z-score units, on brain voxels
ZOOM = 0.1  # isotropic scaling U(0.9, 1.1) of the spatial transform


def check_level(level: str) -> str:
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment level {level!r}: choose one of {', '.join(AUGMENT_LEVELS)}")
    return level


def zoom_factors(n: int, gen: torch.Generator) -> torch.Tensor:
    """Per-case isotropic sampling-grid factors (a factor below 1 enlarges the anatomy)."""
    return 1 + ZOOM * (torch.rand(n, generator=gen) - 0.5) * 2


def _zscore(y: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    n = brain.flatten(2).sum(2).clamp(min=1)[..., None, None, None]
    mean = torch.where(brain, y, 0).flatten(2).sum(2)[..., None, None, None] / n
    var = torch.where(brain, (y - mean) ** 2, 0).flatten(2).sum(2)[..., None, None, None] / n
    return (y - mean) / var.sqrt().clamp(min=1e-6)


def scanner_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gamma, a smooth bias field and noise per case and channel, on brain voxels only."""
    b, c = x.shape[:2]
    dev, work = x.device, torch.float32
    x = x.to(work)
    brain = x != 0
    flat = x.flatten(2)
    big = torch.finfo(work).max
    lo = torch.where(brain.flatten(2), flat, torch.full_like(flat, big)).amin(2)[..., None, None, None]
    hi = torch.where(brain.flatten(2), flat, torch.full_like(flat, -big)).amax(2)[..., None, None, None]
    lo, hi = torch.where(lo > hi, torch.zeros_like(lo), lo), torch.where(lo > hi, torch.ones_like(hi), hi)
    span = (hi - lo).clamp(min=1e-6)
    gamma = torch.exp((torch.rand(b, c, 1, 1, 1, generator=gen) - 0.5) * 2 * GAMMA_LOG_RANGE).to(dev)
    y = lo + span * ((x - lo) / span).clamp(0, 1) ** gamma
    coarse = torch.randn(b, c, 4, 4, 4, generator=gen) * BIAS_STD
    field = torch.exp(F.interpolate(coarse.to(dev), size=x.shape[2:], mode="trilinear", align_corners=False))
    k = (K_RANGE[0] + (K_RANGE[1] - K_RANGE[0]) * torch.rand(b, c, 1, 1, 1, generator=gen)).to(dev)
    y = _zscore(y * field + k * (field - 1), brain)  # the preprocessing z-scores what the scanner gave
    sigma = (NOISE_MAX * torch.rand(b, c, 1, 1, 1, generator=gen)).to(dev)
    y = y + sigma * torch.randn(x.shape, generator=gen).to(dev)
    return torch.where(brain, y, x)
