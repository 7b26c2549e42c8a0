"""Small helpers that let the DCE functions accept numpy arrays or torch tensors alike."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_tensor(x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """Convert ``x`` to a float tensor; float64 unless ``like`` (or ``x``) says otherwise."""
    if isinstance(x, torch.Tensor):
        if like is not None:
            return x.to(device=like.device, dtype=like.dtype)
        return x if x.is_floating_point() else x.to(torch.float64)
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None else torch.float64
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)


def any_tensor(*xs: Any) -> torch.Tensor | None:
    """The first argument that is a floating torch tensor (sets device and dtype), else None."""
    for x in xs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x
    return None


def back_to_input_kind(result: torch.Tensor, *inputs: Any) -> Any:
    """Return numpy when no input was a torch tensor, so numpy callers get numpy back."""
    if any(isinstance(x, torch.Tensor) for x in inputs):
        return result
    return result.detach().cpu().numpy()
