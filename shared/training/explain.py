"""Grad-CAM and saliency maps overlaid on the input slice through the tumour (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _last_conv(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            last = m
    if last is None:
        raise ValueError("model has no Conv3d layer for Grad-CAM")
    return last


def grad_cam(model: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM of class ``target`` at the last 3D conv, upsampled to the input (D, H, W), in [0, 1]."""
    layer = _last_conv(model)
    acts: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    h1 = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    try:
        model.eval()
        x = x.clone().requires_grad_(True)
        logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        model.zero_grad()
        logits[0, target].backward()
    finally:
        h1.remove()
        h2.remove()
    a, g = acts[-1].detach(), grads[-1].detach()
    cam = F.relu((g.mean(dim=(2, 3, 4), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]
    cam = cam.numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def saliency(model: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """|d logit_target / d input|, max over channels, normalised to [0, 1]."""
    model.eval()
    x = x.clone().requires_grad_(True)
    logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits[0, target].backward()
    s = x.grad.detach().abs().amax(1)[0].numpy()
    return s / s.max() if s.max() > 0 else s


def plot_explanations(image: np.ndarray, cam: np.ndarray, sal: np.ndarray, seg: np.ndarray | None,
                      title: str, path: Path, channel_names: Sequence[str]) -> Path:
    """One axial slice (through the tumour if ``seg`` is given, else the CAM peak): image, CAM, saliency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if seg is not None and (seg > 0).any():
        z = int(np.argmax((seg > 0).sum(axis=(0, 1))))
    else:
        z = int(np.argmax(cam.sum(axis=(0, 1))))
    base = image[0][:, :, z].T
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, over) in zip(axes, (("input: " + channel_names[0], None), ("Grad-CAM", cam),
                                       ("saliency", sal)), strict=True):
        ax.imshow(base, cmap="gray", origin="lower")
        if over is not None:
            ax.imshow(over[:, :, z].T, cmap="jet", alpha=0.45, origin="lower", vmin=0, vmax=1)
        if seg is not None and (seg > 0).any():
            ax.contour((seg[:, :, z] > 0).T, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
