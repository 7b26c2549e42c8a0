"""FedBN (Li et al., ICLR 2021): which weights are a model's normalisation layers.

With ``fedbn = true`` a site keeps these weights (affine parameters and running statistics of every
BatchNorm, InstanceNorm and GroupNorm layer) to itself: it never sends them, restores its own copy into
each received global model, and the server averages only the rest. GroupNorm counts too, so FedBN also
works with the DP-compatible networks (opacus replaces BatchNorm by GroupNorm).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def norm_keys(model: Any) -> list[str]:
    """State-dict keys (parameters and buffers) of ``model``'s normalisation layers, in model order."""
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d

    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (_NormBase, nn.GroupNorm)):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in module.state_dict()]
    return keys


def split_norm(weights: Mapping[str, Any], keys: list[str] | set[str]) -> tuple[dict, dict]:
    """(shared weights, normalisation weights) of a state dict, key order kept."""
    local = set(keys)
    shared = {k: v for k, v in weights.items() if k not in local}
    norm = {k: v for k, v in weights.items() if k in local}
    return shared, norm
