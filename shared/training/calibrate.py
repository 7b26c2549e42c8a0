"""Class-balanced logit calibration on the validation split, folded into the network's output layer.

A classifier trained with class-balanced weights can still lean towards one class on cases it has not
seen (typing: faint low-grade gliomas called healthy). Bias-corrected temperature scaling (Guo et al.
2017; Alexandari et al. 2020) fits one temperature ``T`` and one offset per class ``b`` so that
``softmax(log p / T + b)`` minimises the *class-balanced* cross-entropy of the held-out validation
split (every class weighs the same, whatever its count there). The problem is smooth and convex in
``b``; it moves the decision lines between classes without retraining and never sees the test data.

The fitted map is folded into the weights of the linear layers that write the logits (``W / T``,
``c / T + b``), so the exported network, ``gliofed predict`` and the MONAI bundle all carry it with no
extra step; :func:`fold_into_logits` checks the folded network against the map before returning.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def fit_logit_calibration(probs: np.ndarray, labels: np.ndarray, *, l2: float = 1e-3,
                          steps: int = 200) -> tuple[float, np.ndarray]:
    """``(T, b)`` minimising the class-balanced NLL of ``softmax(log probs / T + b)`` on ``labels``.

    Classes absent from ``labels`` keep ``b = 0``; ``b`` is centred on the present classes (softmax is
    unchanged by a common shift). ``l2`` is a small ridge on ``b`` and ``log T`` (a class seen a few
    times cannot push its offset to infinity).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"calibration needs probabilities (n, k) and n labels; got {probs.shape} "
                         f"and {labels.shape}")
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    if (counts > 0).sum() < 2:
        raise ValueError("calibration needs at least two classes in the validation split")
    present = torch.tensor(counts > 0)
    w = torch.tensor(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)[labels] / (counts > 0).sum())
    z = torch.log(torch.tensor(probs).clamp_min(1e-12))
    y = torch.tensor(labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z / log_t.exp() + torch.where(present, b, torch.zeros_like(b))
        nll = -(w * torch.log_softmax(logits, 1)[torch.arange(len(y)), y]).sum()
        loss = nll + l2 * ((b * present) ** 2).sum() + l2 * log_t**2
        loss.backward()
        return loss

    opt.step(closure)
    bias = torch.where(present, b, torch.zeros_like(b)).detach().numpy()
    bias = np.where(counts > 0, bias - bias[counts > 0].mean(), 0.0)
    return float(log_t.detach().exp()), bias


def apply_logit_calibration(probs: np.ndarray, temperature: float, bias: np.ndarray) -> np.ndarray:
    """``softmax(log probs / T + b)``: the fitted map on probabilities already computed (what the
    folded network outputs, without running it again)."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / temperature + bias
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _logit_layers(model: nn.Module, num_classes: int) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


@torch.no_grad()
def fold_into_logits(model: nn.Module, temperature: float, bias: np.ndarray, example: torch.Tensor,
                     *, atol: float = 1e-3) -> nn.Module:
    """Make ``model``'s logits ``z / T + b`` by rescaling the linear layers that write them.

    ``example`` (a batch of network inputs) checks the result: the folded network's softmax must equal
    ``softmax(z / T + b)`` of the original within ``atol``; a network whose logits are not a sum of
    such linear layers is refused rather than silently miscalibrated.
    """
    k = len(bias)
    layers = _logit_layers(model, k)
    if not layers or temperature <= 0:
        raise ValueError(f"cannot fold a calibration into this network (linear output layers with "
                         f"{k} outputs: {len(layers)}, temperature {temperature})")
    if layers[0].bias is None:
        raise ValueError("cannot fold a calibration: the output layer has no bias")
    saved = [(lin.weight.clone(), None if lin.bias is None else lin.bias.clone()) for lin in layers]
    was_training = model.training
    model.eval()

    def logits(x):
        out = model(x)
        return (out[0] if isinstance(out, tuple) else out).double()

    want = torch.softmax(logits(example) / temperature + torch.tensor(bias), 1)
    for i, lin in enumerate(layers):
        lin.weight.div_(temperature)
        if lin.bias is not None:
            lin.bias.div_(temperature)
        if i == 0:
            lin.bias.add_(torch.tensor(bias, dtype=lin.bias.dtype, device=lin.bias.device))
    got = torch.softmax(logits(example), 1)
    model.train(was_training)
    err = float((got - want).abs().max())
    if err > atol:
        for lin, (w, c) in zip(layers, saved, strict=True):  # leave the network as it was
            lin.weight.copy_(w)
            if c is not None:
                lin.bias.copy_(c)
        raise ValueError(f"calibration did not fold into this network's logits (max probability "
                         f"error {err:.2e}); its output is not a sum of linear layers")
    return model
