"""What DP-SGD trains, and in what batches: the last blocks only, and logical batches split in memory.

**Last blocks only** (run config ``dp-train-layers``). DP-SGD's noise is added to every trained
coordinate, so fewer trained coordinates keep more of the signal (Tramer & Boneh 2021; De et al. 2022);
a backbone pretrained on public data and frozen also needs no per-sample gradients, and no backward pass
through it at all when it comes first. :func:`freeze_for_dp` sets ``requires_grad = False`` on every
parameter outside the selection: opacus then hooks only the trained layers and its optimiser clips,
noises and steps only their gradients. The selection is

- ``""``: everything (the default);
- ``"last:N"``: the last N *blocks*, a block being the first two components of a parameter's name
  (``layer4.0`` and ``fc`` in a ResNet, ``levels.3`` and ``head`` in the U-Net encoder, one layer of
  ``features`` in ``small_cnn``), in the network's registration order;
- ``"NAME,NAME"``: the parameters whose names start with one of these prefixes (``layer4,fc``).

**Virtual large batches** (run config ``dp-logical-batch``). DP-SGD's noise is fixed per step, the
signal grows with the batch: a large logical batch is what keeps the signal (De et al. 2022), but it
need not fit in memory. :func:`split_logical_batches` cuts each sampled logical batch into physical
batches and tells the DP optimiser to skip its step (accumulating the clipped per-sample gradients)
until the last one, which adds the noise once and steps once: what opacus' ``BatchMemoryManager`` does.
The accountant sees one step per logical batch at sample rate logical / N.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks in order: distinct first-two-component prefixes of its parameter names."""
    out: list[str] = []
    for name, _ in model.named_parameters():
        parts = name.removeprefix("_module.").split(".")
        block = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        if block not in out:
            out.append(block)
    return out


def trained_names(model: nn.Module, selection: str) -> list[str]:
    """Names of the parameters ``selection`` (see the module docstring) trains; a ValueError when it
    names nothing or more blocks than there are."""
    names = [n for n, _ in model.named_parameters()]
    sel = selection.strip()
    if not sel:
        return names
    if sel.startswith("last:"):
        try:
            n = int(sel.removeprefix("last:"))
        except ValueError:
            raise ValueError(f"dp-train-layers={selection!r}: 'last:N' needs a whole number") from None
        all_blocks = blocks(model)
        if not 1 <= n <= len(all_blocks):
            raise ValueError(f"dp-train-layers={selection!r}: the network has {len(all_blocks)} "
                             f"blocks ({', '.join(all_blocks[-4:])} last); choose 1..{len(all_blocks)}")
        prefixes = all_blocks[-n:]
    else:
        prefixes = [p.strip() for p in sel.split(",") if p.strip()]
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched or not chosen:
        raise ValueError(f"dp-train-layers={selection!r}: no parameter of the network starts with "
                         f"{unmatched or prefixes}; its blocks are {', '.join(blocks(model))}")
    return chosen


def freeze_for_dp(model: nn.Module, selection: str) -> list[str]:
    """Freeze every parameter outside ``selection`` (``requires_grad = False``); returns the trained
    names. With ``selection == ""`` nothing changes."""
    keep = set(trained_names(model, selection))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return [n for n, _ in model.named_parameters() if n in keep]


def _slice(value: Any, start: int, stop: int) -> Any:
    if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
        return value[start:stop]
    if isinstance(value, (list, tuple)):
        return value[start:stop]
    return value


def split_logical_batches(loader: Any, physical: int, optimizer: Any) -> Iterator[Any]:
    """Each dict batch of ``loader`` cut into chunks of at most ``physical`` samples; before every
    chunk but the last, ``optimizer.signal_skip_step(True)`` (opacus accumulates, adds no noise and
    takes no step), before the last ``signal_skip_step(False)``: one DP step per logical batch. A batch
    that fits (or an empty Poisson draw, on which the training loop takes no step) passes unsignalled."""
    for batch in loader:
        n = len(batch["y"])
        if n <= physical:
            yield batch
            continue
        starts = list(range(0, n, physical))
        for i, s in enumerate(starts):
            optimizer.signal_skip_step(do_skip=i < len(starts) - 1)
            yield {k: _slice(v, s, s + physical) for k, v in batch.items()}


def logical_loader(loader: Any, logical: int) -> Any:
    """A loader like ``loader`` (same dataset, collate, generator) drawing ``logical`` samples per
    batch: opacus turns it into Poisson sampling at rate logical / N."""
    from torch.utils.data import DataLoader

    n = len(loader.dataset)
    return DataLoader(loader.dataset, batch_size=max(1, min(int(logical), n)), shuffle=True,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      generator=loader.generator, drop_last=False)


class LogicalBatches:
    """An iterable over a DP loader's logical batches as physical chunks (:func:`split_logical_batches`);
    ``len`` is the loader's (logical steps), so progress counts DP steps."""

    def __init__(self, loader: Any, physical: int, optimizer: Any) -> None:
        self.loader, self.physical, self.optimizer = loader, max(int(physical), 1), optimizer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return split_logical_batches(self.loader, self.physical, self.optimizer)


def ws_conv_grad_sample(layer: Any, activations: list, backprops: Any) -> dict:
    """Opacus per-sample gradients of a :class:`shared.models_gn.WSConv3d` with respect to its raw
    weights: the convolution's per-sample kernel gradient (unfolded input x output gradient, as
    opacus does for ``nn.Conv3d``), then the standardisation's Jacobian per output channel,
    ``dL/dw = (g - mean(g) - w_hat * mean(g * w_hat)) / sigma``, shared by every sample."""
    import torch
    from opacus.utils.tensor_utils import unfold3d

    x = activations[0].to(backprops.dtype)
    n, out_ch = x.shape[0], layer.out_channels
    ret = {}
    if layer.weight.requires_grad:
        cols = unfold3d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                        dilation=layer.dilation)
        b = backprops.reshape(n, out_ch, cols.shape[-1])
        g = torch.einsum("noq,npq->nop", b, cols)
        g = g.view(n, layer.groups, -1, layer.groups, layer.in_channels // layer.groups, cols.shape[1]
                   // layer.in_channels)
        g = torch.einsum("ngrg...->ngr...", g).reshape(n, out_ch, -1)
        w = layer.weight.detach().reshape(out_ch, -1)
        mu = w.mean(1, keepdim=True)
        sigma = torch.sqrt(w.var(1, unbiased=False, keepdim=True) + layer.eps)
        w_hat = (w - mu) / sigma
        g = (g - g.mean(2, keepdim=True) - w_hat * (g * w_hat).mean(2, keepdim=True)) / sigma
        ret[layer.weight] = g.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, out_ch, -1).sum(2)
    return ret


def register_ws_grad_sampler() -> None:
    """Teach opacus :func:`ws_conv_grad_sample` (else it falls back to functorch: correct, slower)."""
    from opacus.grad_sample import GradSampleModule

    from shared.models_gn import WSConv3d

    GradSampleModule.GRAD_SAMPLERS.setdefault(WSConv3d, ws_conv_grad_sample)


def prepare_for_dp(model: nn.Module, selection: str) -> list[str]:
    """Before opacus wraps ``model``: its per-sample-gradient rules, and the selection frozen out
    (:func:`freeze_for_dp`); returns the trained parameter names."""
    register_ws_grad_sampler()
    return freeze_for_dp(model, selection)
