"""GroupNorm + weight-standardised variants of the task networks, trainable under DP-SGD (opacus).

A network named ``<base>_gnws`` (``small_cnn_gnws``, ``resnet10_gnws``, ``unet_encoder_gnws``, ...) is
the DP-compatible build of ``<base>`` (GroupNorm instead of BatchNorm, no in-place operations, the
residual added out of place) with every 3D convolution replaced by :class:`WSConv3d`: the kernel is
standardised (zero mean, unit variance per output channel) in the forward pass. Weight standardisation
with GroupNorm recovers most of BatchNorm's accuracy without batch statistics (Qiao et al. 2019), which
DP-SGD cannot use (a batch statistic mixes patients; opacus refuses BatchNorm).

The variant is the same network with and without DP (no BatchNorm to swap), so a model pretrained with
``gliofed train --network resnet10_gnws`` starts a DP federation of the same network (``init-model``).
Its state dict has the base network's keys and shapes (``weight``, ``bias`` per convolution).

Opacus keys its per-sample-gradient rules by exact type, so it does not treat :class:`WSConv3d` as an
``nn.Conv3d``: ``shared.training.dp_layers.register_ws_grad_sampler`` (called before every DP wrap)
gives it a rule for the gradients with respect to the raw weights, through the standardisation
(without it opacus falls back to functorch: also correct, much slower).
"""

from __future__ import annotations

import torch
from torch import nn

SUFFIX = "_gnws"


class WSConv3d(nn.Conv3d):
    """A 3D convolution whose kernel is standardised per output channel in each forward pass.

    A subclass of ``nn.Conv3d`` (same parameters, attributes and keys), but not one opacus knows:
    its per-sample-gradient table is keyed by exact type, so this layer goes through functorch.
    """

    eps = 1e-5

    @classmethod
    def from_conv(cls, conv: nn.Conv3d) -> WSConv3d:
        """The same layer (geometry, weights, bias) with a standardised kernel."""
        ws = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                 conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        with torch.no_grad():
            ws.weight.copy_(conv.weight)
            if conv.bias is not None:
                ws.bias.copy_(conv.bias)
        return ws

    def standardised(self) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(1).reshape(-1, 1, 1, 1, 1)
        var = flat.var(1, unbiased=False).reshape(-1, 1, 1, 1, 1)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardised(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", standardised"


def standardise_convolutions(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv3d`` in ``model`` (in place) with a :class:`WSConv3d` of its weights.

    A 1x1x1 convolution with one input channel per group has a one-element kernel per output channel,
    whose standardisation is undefined: those (and only those) stay plain.
    """
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Conv3d and child.weight[0].numel() > 1:
                setattr(mod, name, WSConv3d.from_conv(child))
    return model


def is_gnws(name: str) -> bool:
    return name.endswith(SUFFIX)


def base_network(name: str) -> str:
    """``resnet10_gnws`` -> ``resnet10``."""
    return name[: -len(SUFFIX)] if is_gnws(name) else name


def assert_dp_trainable(model: nn.Module) -> None:
    """Raise when ``model`` holds a layer opacus cannot train (BatchNorm, an in-place activation)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"{name}: BatchNorm mixes patients in a batch; DP-SGD cannot train it")
        if getattr(mod, "inplace", False):
            raise TypeError(f"{name}: in-place {type(mod).__name__}; opacus' hooks cannot train it")
