"""SCAFFOLD's local side (Karimireddy et al., ICML 2020): the drift correction and the site's new variate.

A SCAFFOLD site receives the server's control variate ``c`` with the global weights ``x`` and keeps its
own ``c_i`` between rounds. Each local step is corrected by ``c - c_i`` (the estimated gap between the
federation's and the site's gradient). The correction is applied to the weights after the optimiser
step, ``y <- y - lr * (c - c_i)`` (as NVFlare's SCAFFOLD does), so it works with any optimiser (AdamW
here) and with opacus, whose per-sample gradients it never touches. After ``K`` local steps the site's
variate follows the paper's option II, ``c_i+ = c_i - c + (x - y) / (K * lr)``; the site sends
``c_i+ - c_i`` and the server moves ``c`` by the mean of those deltas over all sites.

Variates cover the trainable parameters (no buffers) that the site sends; missing entries count as 0,
so the first round starts from ``c = c_i = 0``. No Flower here: plain ``{name: tensor}`` dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from shared.training.loop import _named_params


def parameter_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Names of ``model``'s trainable parameters (an opacus wrapper's ``_module.`` prefix removed)."""
    skip = set(exclude)
    return [n for n, p in _named_params(model) if p.requires_grad and n not in skip]


class ScaffoldCorrection:
    """The per-step hook of ``train_epochs(after_step=...)`` and the site's variate update.

    ``c``: the server's variate, ``c_i``: the site's (either may lack entries: zeros), ``names``: the
    parameters the variates cover, ``lr``: the local learning rate.
    """

    def __init__(self, c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor],
                 names: Iterable[str], lr: float, reference: Mapping[str, torch.Tensor]) -> None:
        if lr <= 0:
            raise ValueError(f"SCAFFOLD needs a positive local learning rate, not {lr}")
        self.lr = float(lr)
        self.names = list(names)
        self.c = {n: _entry(c, n, reference[n]) for n in self.names}
        self.c_i = {n: _entry(c_i, n, reference[n]) for n in self.names}
        self.diff = {n: self.c[n] - self.c_i[n] for n in self.names}
        self.steps = 0

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        """After one optimiser step: ``y <- y - lr * (c - c_i)``."""
        for n, p in _named_params(model):
            d = self.diff.get(n)
            if d is not None:
                p.add_(d.to(device=p.device, dtype=p.dtype), alpha=-self.lr)
        self.steps += 1

    @torch.no_grad()
    def new_variates(self, global_weights: Mapping[str, torch.Tensor], model: nn.Module
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(``c_i+``, ``c_i+ - c_i``) after training ``model`` from ``global_weights`` (option II).

        No step taken (an empty epoch): the variate is kept and the delta is zero.
        """
        trained = {n: p.detach().cpu() for n, p in _named_params(model)}
        new, delta = {}, {}
        for n in self.names:
            if self.steps == 0:
                new[n] = self.c_i[n].clone()
            else:
                drift = (global_weights[n].detach().cpu().float() - trained[n].float()) / (
                    self.steps * self.lr)
                new[n] = self.c_i[n] - self.c[n] + drift
            delta[n] = new[n] - self.c_i[n]
        return new, delta


def _entry(variate: Mapping[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    value = variate.get(name)
    if value is None:
        return torch.zeros(like.shape, dtype=torch.float32)
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"SCAFFOLD variate {name}: shape {tuple(value.shape)} does not fit the "
                         f"model's {tuple(like.shape)}")
    return value.detach().cpu().float()
