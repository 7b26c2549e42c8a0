"""QTMnet inference time on a whole volume (target: 128x128x32 voxels x 60 frames in <= 1 s on an H100).

End to end as `gliofed qtm predict` does it after reading the file: resample the 60-frame series to
the network's time axis, copy to the device, run the network (bf16 autocast on CUDA), decode the maps,
copy back. Median of --repeats timed runs after --warmup runs (CUDA synchronised), plus peak memory.

CPU (dev box):  .venv/bin/python benchmarks/qtm_inference.py --device cpu --repeats 3
H100:           python benchmarks/qtm_inference.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="128,128,32")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--frame-s", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", type=Path, default=None, help="QTMnet MODEL_DIR (default: random weights)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    from shared.qtm.net import build_qtmnet, predict_volume, resample_curves

    shape = tuple(int(s) for s in a.shape.split(","))
    dev = torch.device(a.device)
    if a.model is not None:
        from shared.qtm.bundle import load_qtmnet

        model, _ = load_qtmnet(a.model, a.device)
    else:
        torch.manual_seed(0)
        model = build_qtmnet().to(dev)
    rng = np.random.default_rng(0)
    times = np.arange(a.frames) * a.frame_s
    conc = (rng.random((*shape, a.frames)) * 0.3).astype(np.float32)

    def once() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        maps = predict_volume(model, resample_curves(conc, times), dev, amp=not a.no_amp)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert maps["vp"].shape == shape
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        once()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times_s = [once() for _ in range(a.repeats)]
    out = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "shape": list(shape), "frames": a.frames, "amp": bool(not a.no_amp and dev.type == "cuda"),
        "median_s": round(statistics.median(times_s), 4), "min_s": round(min(times_s), 4),
        "repeats": a.repeats, "torch_threads": torch.get_num_threads(),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
        "target_s": 1.0,
    }
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
