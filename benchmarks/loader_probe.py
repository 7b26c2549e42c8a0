"""Where the training loop's time goes on a GPU: loader alone vs loader + copy vs + augmentation.

    python benchmarks/loader_probe.py --size 128 --batch 16 --cases 32 --cohort-shape 64 --device cuda
Prints samples/s for: iterating the DataLoader (0 and N workers), plus the host-to-device copy, plus
the batched augmentation; the last stage is what `train_epochs` feeds the network with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--cohort-shape", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    from torch.utils.data import DataLoader

    from shared.cohort import read_cohort
    from shared.data import augment_batch
    from shared.tasks import TASKS, select_samples
    from shared.training import TrainConfig
    from shared.training.loop import _dataset
    from simulations.synth import generate_cohort

    tmp = Path(tempfile.mkdtemp(prefix="gliofed-probe-"))
    cohort = generate_cohort(tmp / "site", cases=a.cases, sites=2, shape=a.cohort_shape,
                             tasks=("grading",), seed=0, progress=False)
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(cohort))
    cfg = TrainConfig(task="grading", network="resnet10", input_size=(a.size,) * 3, batch_size=a.batch,
                      device=a.device, cache_dir=str(tmp / "cache")).resolved()
    dev = torch.device(a.device)
    print(json.dumps({"torch_threads": torch.get_num_threads()}))
    for workers in (0, 4, 8):
        for pin in (False, True):
            ds = _dataset(samples, spec, cfg, train=True, in_channels=4)
            dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=workers, pin_memory=pin,
                            persistent_workers=workers > 0)
            for _ in dl:  # warm: disk cache and the workers' memory caches
                pass
            stages = {}
            for stage in ("iterate", "copy", "augment"):
                gen = torch.Generator().manual_seed(0)
                t = time.perf_counter()
                n = 0
                for _ in range(a.epochs):
                    for b in dl:
                        n += len(b["y"])
                        if stage != "iterate":
                            x = b["x"].to(dev, non_blocking=True)
                            if stage == "augment":
                                x, _ = augment_batch(x, None, gen)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                stages[stage] = round(n / (time.perf_counter() - t), 1)
            print(json.dumps({"workers": workers, "pin_memory": pin, "samples_per_s": stages}), flush=True)


if __name__ == "__main__":
    main()
