"""DP-SGD step time / plain step time for each task's network (DP-compatible build), side by side.

CPU: python benchmarks/dp_step_cost.py --size 32 --batch 4 --steps 5
GPU: python benchmarks/dp_step_cost.py --size 64 --batch 8 --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_step(model, opt, x, y):
    ce = torch.nn.CrossEntropyLoss()

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


def interleaved_medians(a, b, steps: int) -> tuple[float, float]:
    """Warm both, then alternate single steps so machine noise hits both alike; medians."""
    a(), b()
    ta, tb = [], []
    for _ in range(steps):
        ta.append(a())
        tb.append(b())
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

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
        torch.manual_seed(0)
        m = build_model(net, spec.in_channels, spec.num_classes, dp_compatible=True).to(dev)
        gsm = GradSampleModule(m, batch_first=True)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1e-3), noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=a.batch)
        t_plain, t_dp = interleaved_medians(step_plain, make_step(gsm, opt, x, y), a.steps)
        rows.append({"task": task, "network": net, "plain_ms": round(t_plain * 1e3, 1),
                     "dp_ms": round(t_dp * 1e3, 1), "ratio": round(t_dp / t_plain, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": str(dev), "input": f"{a.size}^3", "batch": a.batch,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
