"""Training and evaluating QTMnet on simulated cases or on cohort rows with ground-truth maps.

A cohort row for the ``qtm`` task has a ``dce`` series whose JSON sidecar names ground-truth maps
(``"GroundTruth": {"fp": "case_gt_fp.nii.gz", ...}``, relative to the sidecar), as ``gliofed qtm
simulate`` writes them; the ``seg`` column (optional) marks the tumour, whose voxels weigh more.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.qtm.net import OUTPUTS, decode_maps, encode_maps, pad_to, resample_curves

TUMOUR_WEIGHT = 10.0
EVAL_MAPS = ("fp", "vp", "ve", "ps", "ktrans", "umag")


@dataclass
class QtmExample:
    curves: np.ndarray  # [frames, X, Y, Z] on the fixed time axis
    targets: np.ndarray  # [len(OUTPUTS), X, Y, Z] encoded ground truth
    weight: np.ndarray  # [X, Y, Z] loss weight (tumour voxels weigh more)
    maps: dict[str, np.ndarray]  # decoded ground truth, for errors in physical units
    tumour: np.ndarray  # [X, Y, Z] bool


def example_from_case(case) -> QtmExample:
    """From a :class:`shared.qtm.phantom.SimulatedCase` (noisy concentration, as a scanner sees it)."""
    tumour = case.seg > 0
    return QtmExample(resample_curves(case.noisy_concentration(), case.times_s),
                      encode_maps(case.maps), np.where(tumour, TUMOUR_WEIGHT, 1.0).astype(np.float32),
                      case.maps, tumour)


def read_ground_truth(dce_path: Path) -> dict[str, np.ndarray]:
    """Ground-truth maps named in the DCE sidecar; a clear error when a row has none."""
    import nibabel as nib

    from shared.dce.io import sidecar_path

    side = sidecar_path(dce_path)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    names = meta.get("GroundTruth")
    if not names:
        raise ValueError(f"{side}: no GroundTruth maps; QTMnet trains on simulated cases "
                         "(gliofed qtm simulate) or cases with reference maps")
    return {k: np.asarray(nib.load(str(side.parent / v)).dataobj, dtype=np.float32)
            for k, v in names.items()}


def example_from_files(dce_path: Path, seg_path: Path | None = None) -> QtmExample:
    import nibabel as nib

    from shared.dce.io import read_dce

    series = read_dce(dce_path)
    maps = read_ground_truth(Path(dce_path))
    shape = series.data.shape[:3]
    tumour = (np.asarray(nib.load(str(seg_path)).dataobj) > 0 if seg_path is not None
              else np.zeros(shape, bool))
    return QtmExample(resample_curves(series.concentration(), series.times_s), encode_maps(maps),
                      np.where(tumour, TUMOUR_WEIGHT, 1.0).astype(np.float32), maps, tumour)


_EXAMPLES: dict[str, QtmExample] = {}


def examples_from_samples(samples: Sequence) -> list[QtmExample]:
    """Cohort samples (``shared.tasks.TaskSample`` of the qtm task) -> examples, cached per file."""
    out = []
    for s in samples:
        key = str(s.case.images["dce"])
        if key not in _EXAMPLES:
            _EXAMPLES[key] = example_from_files(s.case.images["dce"], s.case.images.get("seg"))
        out.append(_EXAMPLES[key])
    return out


def simulate_examples(n: int, seed: int, protocols: Sequence, shape=(32, 32, 16), workers: int = 1,
                      progress: Callable[[int], None] | None = None) -> list[QtmExample]:
    """``n`` simulated training cases (half LGG, half HGG), protocols cycled, in ``workers`` processes."""
    from shared.qtm.phantom import simulate_cases

    jobs = [("HGG" if i % 2 else "LGG", seed * 100003 + i, protocols[i % len(protocols)], tuple(shape))
            for i in range(n)]
    out = []
    for case in simulate_cases(jobs, workers):
        out.append(example_from_case(case))
        if progress:
            progress(1)
    return out


def _batch(examples: Sequence[QtmExample], rng: np.random.Generator | None, device):
    xs, ys, ws = [], [], []
    for ex in examples:
        x, y, w = ex.curves, ex.targets, ex.weight
        if rng is not None:  # flips along x and y (|u|, Fp, vp, ve, PS are direction-free)
            for ax in (1, 2):
                if rng.random() < 0.5:
                    x, y, w = np.flip(x, ax), np.flip(y, ax), np.flip(w, ax - 1)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
        ws.append(np.ascontiguousarray(w))
    to = lambda a: torch.from_numpy(np.stack(a)).to(device)
    return to(xs), to(ys), to(ws)


def qtm_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted L1 on the normalised maps."""
    err = (pred - target).abs().mean(1)
    return (err * weight).sum() / weight.sum()


def train_qtmnet(model: torch.nn.Module, examples: Sequence[QtmExample], epochs: int, lr: float = 2e-3,
                 batch_size: int = 4, device: str = "cpu", seed: int = 0,
                 proximal_mu: float = 0.0, global_state: dict | None = None,
                 progress: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Adam with cosine decay over ``epochs``; returns the last epoch's mean loss and the seconds."""
    if not examples:
        raise ValueError("no QTMnet training examples")
    dev = torch.device(device)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    steps_per_epoch = max(len(examples) // batch_size, 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1))
    rng = np.random.default_rng(seed)
    anchor = None
    if proximal_mu > 0 and global_state is not None:
        anchor = {k: v.detach().to(dev) for k, v in global_state.items()}
    t0 = time.perf_counter()
    loss_mean = float("nan")
    for epoch in range(epochs):
        order = rng.permutation(len(examples))
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x, y, w = _batch([examples[i] for i in idx], rng, dev)
            x, _ = pad_to(x)
            pred = model(x)[..., : y.shape[-3], : y.shape[-2], : y.shape[-1]]
            loss = qtm_loss(pred, y, w)
            if anchor is not None:
                prox = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
                loss = loss + proximal_mu / 2 * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        loss_mean = total / steps_per_epoch
        if progress:
            progress(epoch + 1, loss_mean)
    return {"loss": loss_mean, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def predict_example(model: torch.nn.Module, ex: QtmExample, device: str = "cpu") -> dict[str, np.ndarray]:
    from shared.qtm.net import predict_volume

    return predict_volume(model, ex.curves, device)


def map_errors(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], where: np.ndarray,
               names: Sequence[str] = EVAL_MAPS) -> dict[str, float]:
    """Median absolute relative error (%) per map over ``where`` (relative to the true value)."""
    out = {}
    for name in names:
        if name not in pred or name not in truth or not where.any():
            continue
        t = truth[name][where].astype(np.float64)
        p = pred[name][where].astype(np.float64)
        floor = max(float(np.percentile(np.abs(t), 5)), 1e-6)
        out[name] = float(np.median(np.abs(p - t) / np.maximum(np.abs(t), floor)) * 100)
    return out


def evaluate_qtmnet(model: torch.nn.Module, examples: Sequence[QtmExample], device: str = "cpu") -> dict[str, float]:
    """Normalised L1 (``param_mae``, lower is better) and per-map median relative errors (%)."""
    if not examples:
        return {}
    model.to(torch.device(device)).eval()
    l1, tum, allv = [], [], []
    for ex in examples:
        pred_maps = predict_example(model, ex, device)
        enc = encode_maps({k: pred_maps[k] for k in OUTPUTS})
        l1.append(float(np.abs(enc - ex.targets).mean()))
        tum.append(map_errors(pred_maps, ex.maps, ex.tumour))
        allv.append(map_errors(pred_maps, ex.maps, np.ones_like(ex.tumour)))
    metrics = {"param_mae": float(np.mean(l1))}
    for tag, rows in (("tumour", tum), ("all", allv)):
        for name in EVAL_MAPS:
            vals = [r[name] for r in rows if name in r]
            if vals:
                metrics[f"{name}-mre-{tag}"] = float(np.mean(vals))
    return metrics


__all__ = ["QtmExample", "decode_maps", "evaluate_qtmnet", "example_from_case", "train_qtmnet"]
