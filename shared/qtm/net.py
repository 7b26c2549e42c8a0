"""QTMnet: a 3D U-Net from a 4D concentration block to perfusion maps, with no arterial input function.

Input: concentration curves resampled to a fixed time axis (``TIME_AXIS_S``: 0-300 s every 5 s, held at
the last value past the end of shorter acquisitions), one channel per time point. A per-voxel
temporal encoder (1x1x1 convolutions) compresses each curve, then a two-level 3D U-Net lets every
voxel see its neighbourhood: the up-stream curves that play the part of a local input function.
Output: one channel per map in ``OUTPUTS`` on a normalised scale (see ``encode_maps``/``decode_maps``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TIME_AXIS_S = np.arange(0.0, 300.0 + 1e-9, 5.0)
OUTPUTS = ("fp", "vp", "ve", "ps", "umag")
CONC_SCALE = 4.0  # mM -> network units


def resample_curves(conc: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """[X, Y, Z, T] at ``times_s`` -> [len(TIME_AXIS_S), X, Y, Z] on the fixed axis (float32)."""
    flat = conc.reshape(-1, conc.shape[-1])
    idx = np.searchsorted(times_s, TIME_AXIS_S, side="right") - 1
    idx = np.clip(idx, 0, len(times_s) - 2)
    t0, t1 = times_s[idx], times_s[idx + 1]
    w = np.clip((TIME_AXIS_S - t0) / (t1 - t0), 0.0, 1.0)
    out = flat[:, idx] * (1 - w) + flat[:, idx + 1] * w
    return (out.T.reshape(len(TIME_AXIS_S), *conc.shape[:3]) * CONC_SCALE).astype(np.float32)


def encode_maps(maps: dict[str, np.ndarray]) -> np.ndarray:
    """Ground-truth maps -> [len(OUTPUTS), X, Y, Z] targets of order 1 (log scale for Fp and PS)."""
    return np.stack([
        np.log10(np.maximum(maps["fp"], 0.5)) / 2.5,
        maps["vp"] / 0.1,
        maps["ve"] / 0.5,
        (np.log10(maps["ps"] + 1e-4) + 4.0) / 3.5,
        maps["umag"] / 0.03,
    ]).astype(np.float32)


def decode_maps(pred: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_maps`, plus Ktrans = PS Fp / (PS + Fp) (2CXM relation)."""
    from shared.dce.models import ktrans_from_2cxm

    fp = 10 ** (pred[0] * 2.5)
    ps = np.maximum(10 ** (pred[3] * 3.5 - 4.0) - 1e-4, 0.0)
    maps = {"fp": fp, "vp": np.clip(pred[1] * 0.1, 0, 1), "ve": np.clip(pred[2] * 0.5, 0, 1),
            "ps": ps, "umag": np.maximum(pred[4] * 0.03, 0.0)}
    maps["ktrans"] = ktrans_from_2cxm(fp, ps)
    return {k: v.astype(np.float32) for k, v in maps.items()}


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.GELU(),
        nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.GELU(),
    )


class QTMNet(nn.Module):
    """Temporal encoder + 2-level 3D U-Net. Input sides must be multiples of 4 (see ``pad_to``)."""

    def __init__(self, in_frames: int = len(TIME_AXIS_S), outputs: int = len(OUTPUTS),
                 base: int = 16, temporal: int = 32) -> None:
        super().__init__()
        self.temporal = nn.Sequential(nn.Conv3d(in_frames, 2 * temporal, 1), nn.GELU(),
                                      nn.Conv3d(2 * temporal, temporal, 1), nn.GELU())
        self.enc1 = _block(temporal, base)
        self.enc2 = _block(base, 2 * base)
        self.mid = _block(2 * base, 4 * base)
        self.up2 = nn.ConvTranspose3d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = _block(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose3d(2 * base, base, 2, stride=2)
        self.dec1 = _block(2 * base + temporal, base)
        self.head = nn.Conv3d(base, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temporal(x)
        e1 = self.enc1(t)
        e2 = self.enc2(nn.functional.max_pool3d(e1, 2))
        m = self.mid(nn.functional.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1, t], 1))
        return self.head(d1)


def build_qtmnet(base: int = 16) -> QTMNet:
    return QTMNet(base=base)


def pad_to(x: torch.Tensor, multiple: int = 4) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad the last three dims up to a multiple; returns the padded tensor and the original size."""
    size = tuple(x.shape[-3:])
    pads = []
    for s in reversed(size):
        pads += [0, (-s) % multiple]
    return nn.functional.pad(x, pads), size


@torch.no_grad()
def predict_volume(model: nn.Module, curves: np.ndarray, device: str | torch.device = "cpu",
                   amp: bool = True) -> dict[str, np.ndarray]:
    """Maps for a whole volume ([frames, X, Y, Z] from :func:`resample_curves`), fully convolutional."""
    model.eval()
    dev = torch.device(device)
    x = torch.from_numpy(curves)[None].to(dev)
    x, size = pad_to(x)
    use_amp = amp and dev.type == "cuda"
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
        y = model(x)
    y = y[0, :, : size[0], : size[1], : size[2]].float().cpu().numpy()
    return decode_maps(y)
