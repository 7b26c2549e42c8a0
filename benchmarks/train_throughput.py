"""Samples/s of the real training loop (data loading from the disk cache included) vs the same
network's pure forward/backward on resident tensors, plus MONAI's default ResNet10 (stride-1 stem,
fp32) as the reference, all in one run.

CPU:  python benchmarks/train_throughput.py --size 32 --batch 4 --cases 40
H100: python benchmarks/train_throughput.py --size 128 --batch 16 --cases 64 --device cuda --amp --channels-last
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def pure_step_rate(model, x, y, steps: int, amp: bool, channels_last: bool) -> float:
    dev = x.device
    model.to(dev).train()
    if channels_last and dev.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ce = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
        ce(out.float(), y).backward()
        opt.step()

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--network", default="resnet10")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ref-steps", type=int, default=20,
                    help="steps timed for the slow MONAI-default reference (at most --steps); it runs "
                         "~0.5 s a step at 4x128^3 b16 on an H100, so long --steps windows must not use it")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cohort", type=Path, default=None)
    ap.add_argument("--cohort-shape", type=int, default=0,
                    help="side of the generated volumes (default: --size); inputs are cropped/padded")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from monai.networks.nets import resnet10

    from shared.cohort import read_cohort
    from shared.device import pick_device as resolve_device
    from shared.tasks import TASKS, select_samples
    from shared.training import TrainConfig, build_task_model, train_epochs
    from simulations.synth import generate_cohort

    dev = resolve_device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="gliofed-bench-"))
    cohort = a.cohort or generate_cohort(tmp / "site", cases=a.cases, sites=2, shape=a.cohort_shape or max(a.size, 32),
                                         tasks=("grading",), seed=0, progress=False)
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(cohort))
    cfg = TrainConfig(task="grading", network=a.network, input_size=(a.size,) * 3,
                      batch_size=a.batch, device=str(dev), amp=a.amp, channels_last=a.channels_last,
                      cache_dir=str(tmp / "cache"), augment=True)
    model = build_task_model(spec, cfg)
    train_epochs(model, samples, spec, cfg, epochs=1)  # warm the disk cache (first read of NIfTI)
    n_batches = max(1, a.steps * a.batch // len(samples))
    model = build_task_model(spec, cfg)
    t = time.perf_counter()
    res = train_epochs(model, samples, spec, replace(cfg, seed=1), epochs=n_batches)
    loop_rate = res.num_examples * n_batches / (time.perf_counter() - t)

    x = torch.randn(a.batch, 4, a.size, a.size, a.size, device=dev)
    y = torch.randint(0, 2, (a.batch,), device=dev)
    ceiling = pure_step_rate(build_task_model(spec, cfg), x, y, a.steps, a.amp, a.channels_last)
    monai_ref = pure_step_rate(resnet10(spatial_dims=3, n_input_channels=4, num_classes=2), x, y,
                               min(a.steps, a.ref_steps), False, False)
    out = {"device": str(dev), "torch_threads": torch.get_num_threads(), "network": a.network,
           "input": f"4x{a.size}^3", "batch": a.batch, "amp": a.amp, "channels_last": a.channels_last,
           "loop_samples_per_s": round(loop_rate, 2), "ceiling_samples_per_s": round(ceiling, 2),
           "loop_over_ceiling": round(loop_rate / ceiling, 3),
           "monai_default_resnet10_fp32_samples_per_s": round(monai_ref, 2),
           "ceiling_over_monai_default": round(ceiling / monai_ref, 2)}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
