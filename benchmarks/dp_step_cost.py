"""DP-SGD step time / plain step time for each task's network (DP-compatible build), side by side.

CPU: python benchmarks/dp_step_cost.py --size 32 --batch 4 --steps 5
GPU: python benchmarks/dp_step_cost.py --size 64 --batch 8 --steps 20 --device cuda --modes hooks,functorch,ew,ghost
Recipe (DP on the last blocks only, ``dp-train-layers``): python benchmarks/dp_step_cost.py --size 32
    --batch 8 --steps 7 --recipe 'small_cnn_gnws:last:3;resnet10_gnws:layer4,fc;resnet10:layer4,fc'

``--modes`` compares opacus's per-sample-gradient engines: ``hooks`` (what gliofed trains with),
``functorch`` (vmap), ``ew`` (expanded weights) and ``ghost`` (fast gradient clipping: per-sample
norms without materialised per-sample gradients where opacus can, two backward passes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_step(model, opt, x, y, criterion=None):
    """A timed SGD step; ``criterion`` defaults to cross-entropy (ghost clipping passes its own)."""
    ce = criterion or torch.nn.CrossEntropyLoss()

    def one() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        ce((out[0] if isinstance(out, tuple) else out).float(), y).backward()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return one


def dp_step(mode: str, model, x, y, batch: int):
    """One DP-SGD step (clip 1.0, noise 1.0) with opacus's ``mode`` engine, timed like make_step."""
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    if mode != "ghost":
        gsm = wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1e-3), noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=batch)
        return make_step(gsm, opt, x, y)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=1e-3),
                                          noise_multiplier=1.0, max_grad_norm=1.0,
                                          expected_batch_size=batch, loss_reduction="mean")
    crit = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"), "mean")
    return make_step(gsm, opt, x, y, crit)


def interleaved_medians(a, b, steps: int) -> tuple[float, float]:
    """Warm both, then alternate single steps so machine noise hits both alike; medians."""
    ta, tb = interleaved([a, b], steps)
    return ta, tb


def interleaved(fns, steps: int) -> list[float]:
    """Warm each, then take one step of each in turn ``steps`` times; the median time of each."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for f, t in zip(fns, times, strict=True):
            t.append(f())
    return [statistics.median(t) for t in times]


def recipe_row(net: str, task: str, selection: str, x, y, batch: int, steps: int, dev) -> dict:
    """The DP fine-tuning recipe's step (``dp-train-layers = selection``: the rest frozen) against a
    plain step of the same trained layers and a plain step of the whole network, interleaved."""
    from shared.models import build_model
    from shared.tasks import TASKS
    from shared.training.dp_layers import freeze_for_dp, register_ws_grad_sampler

    register_ws_grad_sampler()
    spec = TASKS[task]
    models = []
    for frozen in (False, True, True):
        torch.manual_seed(0)
        m = build_model(net, spec.in_channels, spec.num_classes, dp_compatible=True).to(dev)
        if frozen:
            freeze_for_dp(m, selection)
        models.append(m)
    full, part, dp = models
    trained = sum(p.numel() for p in part.parameters() if p.requires_grad)
    fns = [make_step(full, torch.optim.SGD(full.parameters(), lr=1e-3), x, y),
           make_step(part, torch.optim.SGD([p for p in part.parameters() if p.requires_grad], lr=1e-3),
                     x, y),
           dp_step("hooks", dp, x, y, batch)]
    t_full, t_part, t_dp = interleaved(fns, steps)
    return {"task": task, "network": net, "dp_train_layers": selection,
            "trained_params": trained, "all_params": sum(p.numel() for p in full.parameters()),
            "plain_full_ms": round(t_full * 1e3, 1), "plain_trained_ms": round(t_part * 1e3, 1),
            "dp_trained_ms": round(t_dp * 1e3, 1),
            "dp_vs_plain_trained": round(t_dp / t_part, 2), "dp_vs_plain_full": round(t_dp / t_full, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="hooks")
    ap.add_argument("--recipe", default="",
                    help="NETWORK:SELECTION[;...], e.g. 'small_cnn_gnws:last:3;resnet10_gnws:layer4,fc': "
                         "the DP fine-tuning step (dp-train-layers) instead of the per-task table")
    a = ap.parse_args()
    if a.recipe:
        dev = torch.device(a.device)
        for item in a.recipe.split(";"):
            net, _, selection = item.partition(":")
            x = torch.randn(a.batch, 4, a.size, a.size, a.size, device=dev)
            y = torch.randint(0, 2, (a.batch,), device=dev)
            print(json.dumps(recipe_row(net, "grading", selection, x, y, a.batch, a.steps, dev)),
                  flush=True)
        print(json.dumps({"device": str(dev), "input": f"{a.size}^3", "batch": a.batch,
                          "threads": torch.get_num_threads()}))
        return

    from shared.models import build_model
    from shared.tasks import TASKS
    from shared.training import TrainConfig

    dev = torch.device(a.device)
    rows = []
    for task in ("grading", "typing", "rano", "recurrence"):
        spec = TASKS[task]
        net = TrainConfig(task=task).resolved().network
        x = torch.randn(a.batch, spec.in_channels, a.size, a.size, a.size, device=dev)
        y = torch.randint(0, spec.num_classes, (a.batch,), device=dev)
        torch.manual_seed(0)
        plain = build_model(net, spec.in_channels, spec.num_classes, dp_compatible=True).to(dev)
        step_plain = make_step(plain, torch.optim.SGD(plain.parameters(), lr=1e-3), x, y)
        for mode in a.modes.split(","):
            torch.manual_seed(0)
            m = build_model(net, spec.in_channels, spec.num_classes, dp_compatible=True).to(dev)
            try:
                step_dp = dp_step(mode, m, x, y, a.batch)
                t_plain, t_dp = interleaved_medians(step_plain, step_dp, a.steps)
            except Exception as err:  # noqa: BLE001  (an engine that cannot handle a layer: say so, go on)
                print(json.dumps({"task": task, "mode": mode, "error": f"{type(err).__name__}: {err}"[:200]}))
                continue
            rows.append({"task": task, "network": net, "mode": mode, "plain_ms": round(t_plain * 1e3, 1),
                         "dp_ms": round(t_dp * 1e3, 1), "ratio": round(t_dp / t_plain, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": str(dev), "input": f"{a.size}^3", "batch": a.batch,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
