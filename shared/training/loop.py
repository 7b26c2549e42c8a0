"""Local training and evaluation of a task model (no Flower here): the learning core every site runs."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from shared.config import BALANCES, LR_SCHEDULES, cosine_lr
from shared.data import (
    ResidentBatches,
    SessionCache,
    TaskDataset,
    augment_batch,
    input_channels,
    optional_inputs_available,
)
from shared.device import pick_device
from shared.models import MirrorInput, build_model, seg_classes_for
from shared.tasks import TaskSample, TaskSpec, get_task
from shared.training.kinds import kind_adapter
from shared.training.metrics import BINS, classification_metrics, score_histograms

Privatize = Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple]


@dataclass(frozen=True)
class TrainConfig:
    """How a task is trained locally; every field has a default so run configs stay small."""

    task: str
    network: str | None = None  # None -> the task's default network
    input_size: tuple[int, int, int] | None = None  # None -> the task's input size
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # channels_last_3d, CUDA only
    cache_dir: str | None = None
    dp_compatible: bool = False
    augment: bool = True
    flip_axes: tuple[int, ...] = (0,)  # augmentation flips: left-right only (RAS); (0, 1, 2) for all
    augment_level: str = "basic"  # basic | mr (+ zoom, scanner-like contrast, bias field, noise)
    balance: str = "weighted_loss"  # weighted_loss | sampler (class-balanced batches) | none |
    #   logit_adjust (loss on logits + log of this training set's class prior; label-skewed sites)
    patience: int = 5
    subtraction: bool | None = None  # add the follow-up minus baseline image; None -> the task's default
    seg_weight: float = 0.5  # unet_encoder: weight of the joint segmentation loss
    lr_schedule: str = "constant"  # fit(): constant | cosine (lr decays to 0 over ``epochs``)
    ema_decay: float = 0.0  # fit(): > 0 validates and keeps an exponential moving average of the
    #   weights (and BatchNorm statistics), updated every step with this decay; 0 = the raw weights
    calibrate: bool = False  # fit(): fold a class-balanced temperature + per-class offsets, fitted on
    #   the validation split, into the output layer (shared/training/calibrate.py)
    stem_stride: int = 2
    clinical: tuple[str, ...] = ()  # numeric cohort columns fused with the image features (rano)

    def resolved(self) -> TrainConfig:
        if self.balance not in BALANCES:
            raise ValueError(f"balance {self.balance!r}: choose one of {', '.join(BALANCES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: choose constant or cosine")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay {self.ema_decay}: choose 0 (off) or a decay in (0, 1)")
        spec = get_task(self.task)
        sub = spec.subtraction if self.subtraction is None else self.subtraction
        return replace(self, network=self.network or spec.default_network,
                       input_size=tuple(self.input_size or spec.input_size), subtraction=sub)


@dataclass
class TrainResult:
    num_examples: int  # training examples per epoch (len(samples)), never batches
    loss: float
    metrics: dict[str, float]
    seconds: float


@dataclass
class EvalResult:
    num_examples: int
    metrics: dict[str, float]
    confusion: np.ndarray | None  # None for regression (qtm)
    score_hist: np.ndarray | None
    probs: np.ndarray
    labels: np.ndarray
    case_ids: list[str] = field(default_factory=list)


def model_inputs(spec: TaskSpec, cfg: TrainConfig, samples: Sequence[TaskSample] = ()) -> dict:
    cfg = cfg.resolved()
    use_opt = optional_inputs_available(samples, spec)
    return {"use_optional": use_opt,
            "in_channels": input_channels(spec, use_opt, cfg.subtraction)}


def build_task_model(spec: TaskSpec, cfg: TrainConfig, in_channels: int | None = None) -> nn.Module:
    """The task's network; ``in_channels`` defaults to the required inputs (optional ones excluded)."""
    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)
    adapter = kind_adapter(spec)
    if adapter is not None:
        return adapter.build(spec, cfg)
    ch = in_channels or input_channels(spec, False, cfg.subtraction)
    seg = seg_classes_for(cfg.network)
    return build_model(cfg.network, ch, spec.num_classes, dp_compatible=cfg.dp_compatible,
                       stem_stride=cfg.stem_stride, seg_classes=seg, clinical=len(cfg.clinical))


def _device_augment(cfg: TrainConfig) -> bool:
    """Augment whole batches on the GPU (CPU augmentation starves a GPU); per sample on the CPU."""
    return cfg.augment and pick_device(cfg.device).type == "cuda"


def _dataset(samples, spec, cfg, *, train: bool, in_channels: int, with_seg: bool = False) -> TaskDataset:
    use_opt = input_channels(spec, True, cfg.subtraction) == in_channels and bool(spec.optional_inputs)
    return TaskDataset(samples, spec, cfg.input_size, SessionCache(cfg.cache_dir),
                       augment=train and cfg.augment and not _device_augment(cfg), use_optional=use_opt,
                       half=pick_device(cfg.device).type == "cuda",
                       subtraction=cfg.subtraction, with_seg=with_seg or seg_classes_for(cfg.network) > 0,
                       clinical=cfg.clinical, seed=cfg.seed, flip_axes=cfg.flip_axes,
                       augment_level=cfg.augment_level)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _first_conv_in_channels(model: nn.Module) -> int:
    """Image channels the model reads (a MirrorInput network's first layer sees each one twice)."""
    factor = 2 if any(isinstance(m, MirrorInput) for m in model.modules()) else 1
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            return m.in_channels // factor
    raise ValueError("model has no Conv3d layer")


def _class_weights(labels: list[int], k: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _log_prior(labels: list[int], k: int) -> torch.Tensor:
    """log of the class prior of ``labels``, Laplace-smoothed so that an absent class stays finite.

    Logit adjustment (Menon et al. 2021; FedLC, Zhang et al. 2022): training on ``logits + log prior``
    lets the network's own logits estimate the class-balanced score, so sites whose label mixes differ
    no longer pull the shared output bias towards their own majority class.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k).astype(np.float64)
    return torch.tensor(np.log((counts + 1.0) / (counts.sum() + k)), dtype=torch.float32)


def train_epochs(
    model: nn.Module,
    samples: Sequence[TaskSample],
    spec: TaskSpec,
    cfg: TrainConfig,
    *,
    epochs: int = 1,
    proximal_mu: float = 0.0,
    global_state: dict[str, torch.Tensor] | None = None,
    privatize: Privatize | None = None,
    progress: bool = False,
    after_step: Callable[[nn.Module], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` over ``samples``; FedProx term when ``proximal_mu > 0``;
    ``after_step(model)`` runs after every optimiser step (SCAFFOLD's correction,
    ``shared/training/scaffold.py``). ``optimizer`` (over ``model``'s parameters) carries its state
    from call to call (``fit``: one AdamW for the whole run); without one, a fresh AdamW is made, as a
    federated site does each round."""
    if not samples:
        raise ValueError(f"no eligible {spec.name} training samples")
    cfg = cfg.resolved()
    adapter = kind_adapter(spec)
    if adapter is not None:
        if after_step is not None:
            raise ValueError(f"task {spec.name!r} ({spec.kind}): a per-step hook (SCAFFOLD) runs "
                             "in the classification loop only")
        return adapter.train(model, samples, spec, cfg, epochs=epochs, proximal_mu=proximal_mu,
                             global_state=global_state, privatize=privatize)
    t0 = time.perf_counter()
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ds = _dataset(samples, spec, cfg, train=True, in_channels=_first_conv_in_channels(model))
    batch = min(cfg.batch_size, len(ds))
    batchnorm = _has_batchnorm(model)  # BatchNorm cannot train on a batch of one case
    if privatize is None and not ds.augment and ResidentBatches.fits(ds, dev):
        loader = ResidentBatches(ds, batch, dev, cfg.seed,  # GPU: the whole set on the device
                                 drop_lone=batchnorm)
    else:  # loader workers measured slower than none for 3D volumes (IPC of large tensors)
        sampler = None
        if cfg.balance == "sampler" and privatize is None:  # every class equally often per epoch
            w = _class_weights(ds.labels(), spec.num_classes)[torch.tensor(ds.labels())]
            sampler = torch.utils.data.WeightedRandomSampler(
                w.double(), len(ds), replacement=True, generator=torch.Generator().manual_seed(cfg.seed))
        # a last batch of one case cannot train BatchNorm (one value per channel): it is dropped
        # (that case is drawn into a full batch in the other epochs' shuffles)
        lone = batchnorm and len(ds) % batch == 1 and len(ds) > batch
        loader = DataLoader(ds, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                            num_workers=cfg.num_workers,
                            drop_last=lone, pin_memory=dev.type == "cuda",
                            persistent_workers=cfg.num_workers > 0,
                            generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.clinical and hasattr(model, "fit_clinical_stats"):
        model.fit_clinical_stats(torch.stack([ds.clinical_values(i) for i in range(len(ds))]))
    model.to(dev)
    if dev.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if optimizer is not None and privatize is not None:
        raise ValueError("a carried-over optimizer cannot be privatised (opacus wraps a fresh one)")
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if privatize is not None:
        model, opt, loader = privatize(model, opt, loader)
    weight = _class_weights(ds.labels(), spec.num_classes) if cfg.balance == "weighted_loss" else None
    ce = nn.CrossEntropyLoss(weight=weight.to(dev) if weight is not None else None)
    shift = _log_prior(ds.labels(), spec.num_classes).to(dev) if cfg.balance == "logit_adjust" else None
    seg_ce = nn.CrossEntropyLoss(ignore_index=-100)
    anchor = None
    if proximal_mu > 0:
        ref = global_state or {k: v.detach().clone() for k, v in model.state_dict().items()}
        anchor = [(p, ref[n].to(dev)) for n, p in _named_params(model) if n in ref]
    core = getattr(model, "_module", model)
    if hasattr(core, "return_seg"):
        core.return_seg = True
    model.train()
    if batchnorm and len(ds) == 1:  # a one-case site: BatchNorm cannot use batch statistics
        for m in model.modules():  # of a single case, so it normalises with its running statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    device_aug = _device_augment(cfg)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses, correct, seen = [], 0, 0
    total_steps = epochs * len(loader)
    bar = _progress(progress, total_steps, f"train {spec.name}")
    for _ in range(epochs):
        for batch in loader:
            if not isinstance(batch, dict) or len(batch["y"]) == 0:
                continue  # an empty Poisson-sampled batch (opacus): nothing to learn from
            x, y = batch["x"].to(dev, non_blocking=True), batch["y"].to(dev)
            if device_aug:
                seg_b = batch["seg"].to(dev) if "seg" in batch else None
                x, seg_b = augment_batch(x, seg_b, aug_gen, cfg.flip_axes, cfg.augment_level)
                if seg_b is not None:
                    batch["seg"] = seg_b
            x = x.float()
            if dev.type == "cuda" and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda"):
                out = model(x, batch["clinical"].to(dev)) if "clinical" in batch else model(x)
                if isinstance(out, tuple):
                    logits, seg_logits = out
                    loss = ce(_shifted(logits, shift), y) + cfg.seg_weight * seg_ce(
                        seg_logits.float(), batch["seg"].to(dev))
                else:
                    logits = out
                    loss = ce(_shifted(logits, shift), y)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum(((p - g) ** 2).sum() for p, g in anchor)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            # kept on the device: no host sync per step, so the CPU queues the next step's kernels
            losses.append(loss.detach())
            correct = correct + (logits.argmax(1) == y).sum()
            seen += len(y)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if hasattr(core, "return_seg"):
        core.return_seg = False
    loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    correct = int(correct)
    return TrainResult(num_examples=len(samples), loss=loss,
                       metrics={"train_loss": loss, "train_accuracy": correct / max(seen, 1)},
                       seconds=time.perf_counter() - t0)


def _shifted(logits: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    return logits.float() if shift is None else logits.float() + shift


def _named_params(model: nn.Module):
    for n, p in model.named_parameters():
        yield n.removeprefix("_module."), p


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


@torch.no_grad()
def predict_probs(model: nn.Module, samples: Sequence[TaskSample], spec: TaskSpec,
                  cfg: TrainConfig) -> np.ndarray:
    cfg = cfg.resolved()
    dev = pick_device(cfg.device)
    ds = _dataset(samples, spec, cfg, train=False, in_channels=_first_conv_in_channels(model))
    loader = DataLoader(ds, batch_size=max(cfg.batch_size, 1), shuffle=False,
                        num_workers=cfg.num_workers)
    model.to(dev).eval()
    out = []
    for batch in loader:
        x = batch["x"].to(dev).float()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda"):
            logits = model(x, batch["clinical"].to(dev)) if "clinical" in batch else model(x)
        if isinstance(logits, tuple):
            logits = logits[0]
        out.append(torch.softmax(logits.float(), 1).cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros((0, spec.num_classes))


def evaluate_model(model: nn.Module, samples: Sequence[TaskSample], spec: TaskSpec,
                   cfg: TrainConfig) -> EvalResult:
    """Metrics, confusion matrix and score histograms of ``model`` on labelled ``samples``."""
    adapter = kind_adapter(spec)
    if adapter is not None:
        return adapter.evaluate(model, samples, spec, cfg)
    probs = predict_probs(model, samples, spec, cfg)
    idx = {c: i for i, c in enumerate(spec.classes)}
    labels = np.array([idx[s.label] for s in samples], dtype=np.int64)
    if len(labels) == 0:
        k = spec.num_classes
        return EvalResult(0, {}, np.zeros((k, k), np.int64), np.zeros((k, 2, BINS), np.int64),
                          probs, labels, [])
    metrics = classification_metrics(labels, probs, spec.classes)
    metrics["cross_entropy"] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels],
                                                     1e-7, 1.0)).mean())
    conf = np.asarray(metrics.pop("confusion"), dtype=np.int64)
    return EvalResult(len(samples), metrics, conf,
                      score_histograms(probs, labels, spec.num_classes), probs, labels,
                      [s.case_id for s in samples])


def fit(
    spec: TaskSpec, cfg: TrainConfig, train: Sequence[TaskSample], val: Sequence[TaskSample],
    *, progress: bool = True, log: Callable[[str], None] = print, deadline: float | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Centralised training with validation each epoch, early stopping and the best model kept.

    Best: the highest validation headline metric; between equal metrics, the lower validation
    cross-entropy (``cross_entropy`` of :func:`evaluate_model`).

    One AdamW runs through all epochs (its moments are not reset each epoch); ``cfg.lr_schedule =
    "cosine"`` lowers its learning rate each epoch from ``cfg.lr`` towards 0 at ``cfg.epochs``.
    ``cfg.ema_decay > 0``: what is validated, kept and returned is the exponential moving average of
    the weights (updated after every step), not the last step's weights.
    ``deadline`` (a ``time.time()`` value): no epoch is started that the previous epoch's duration
    says would end after it (the best model so far is returned).
    """
    cfg = cfg.resolved()
    model = build_task_model(spec, cfg, model_inputs(spec, cfg, [*train, *val])["in_channels"])
    opt = (torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
           if kind_adapter(spec) is None else None)  # other kinds keep their own optimiser
    metric = spec.headline_metric
    best, best_state, history, bad = (-np.inf, -np.inf), copy.deepcopy(model.state_dict()), [], 0
    ema = _WeightAverage(cfg.ema_decay) if cfg.ema_decay > 0 and opt is not None else None
    if cfg.ema_decay > 0 and ema is None:
        log(f"ema_decay {cfg.ema_decay} ignored: task {spec.name!r} ({spec.kind}) trains with its own loop")
    for epoch in range(1, cfg.epochs + 1):
        started = time.time()
        if deadline is not None and history and started + history[-1]["epoch_seconds"] > deadline:
            log(f"time budget reached: stopping before epoch {epoch}")
            break
        if opt is not None and cfg.lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        tr = train_epochs(model, train, spec, replace(cfg, seed=cfg.seed + epoch), epochs=1,
                          progress=progress, optimizer=opt, after_step=ema)
        scored = model if ema is None else ema.model()
        row = {"epoch": epoch, "train_loss": tr.loss, "seconds": tr.seconds}
        if val:
            ev = evaluate_model(scored, val, spec, cfg)
            row.update({f"val_{k}": v for k, v in ev.metrics.items()})
            score = ev.metrics.get(metric, np.nan)
            nll = float(ev.metrics.get("cross_entropy", np.nan))  # none for regression kinds
            row["val_loss"] = nll
            # a small validation split saturates (AUC 1.0 from epoch 3 of 30 on 24 grading cases):
            # equal metrics are told apart by the validation cross-entropy, not by which came first
            score = (-np.inf if np.isnan(score) else score, -np.inf if np.isnan(nll) else -nll)
        else:
            score = (-tr.loss, 0.0)
        row["epoch_seconds"] = time.time() - started
        history.append(row)
        log(f"epoch {epoch}/{cfg.epochs}: loss {tr.loss:.4f}"
            + (f", val {metric} {row.get('val_' + metric, float('nan')):.4f}, val loss "
               f"{row.get('val_loss', float('nan')):.4f}" if val else ""))
        if score > best:
            best, best_state, bad = score, copy.deepcopy(scored.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                log(f"early stopping after epoch {epoch} (no improvement for {cfg.patience})")
                break
    model.load_state_dict(best_state)
    if cfg.calibrate:
        _calibrate(model, val, spec, cfg, log, classification=opt is not None)
    return model, history


def _calibrate(model: nn.Module, val: Sequence[TaskSample], spec: TaskSpec, cfg: TrainConfig,
               log: Callable[[str], None], *, classification: bool) -> None:
    """Fold the validation split's class-balanced calibration into ``model`` (in place)."""
    from shared.training.calibrate import fit_logit_calibration, fold_into_logits

    if not classification:
        log(f"calibrate ignored: task {spec.name!r} ({spec.kind}) is not a classifier")
        return
    ev = evaluate_model(model, val, spec, cfg)
    classes = len(np.unique(ev.labels))
    if classes < 2:
        log(f"calibrate skipped: the validation split has {len(ev.labels)} cases of "
            f"{classes} class(es); two are needed")
        return
    t, b = fit_logit_calibration(ev.probs, ev.labels)
    ds = _dataset(val[:4], spec, cfg, train=False, in_channels=_first_conv_in_channels(model))
    dev = next(model.parameters()).device
    example = torch.stack([ds[i]["x"] for i in range(len(ds))]).float().to(dev)
    fold_into_logits(model, t, b, example)
    log(f"calibrated on {len(ev.labels)} validation cases: temperature {t:.3f}, class offsets "
        + ", ".join(f"{c} {v:+.3f}" for c, v in zip(spec.classes, b, strict=True)))


class _WeightAverage:
    """Exponential moving average of a model's weights and buffers, as an ``after_step`` hook.

    The average starts as a copy of the model after its first step (on the model's device); after
    step n it moves ``1 - d`` of the way to the model's weights, ``d = min(decay, (1 + n) / (10 + n))``
    (the usual warm-up, so the first, untrained steps fade quickly); integer buffers (BatchNorm's step
    counters) are copied. :meth:`model` is the averaged network, in evaluation-ready form."""

    def __init__(self, decay: float):
        self.decay = decay
        self.steps = 0
        self.avg: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        if self.avg is None:
            self.avg = copy.deepcopy(model)
            for p in self.avg.parameters():
                p.requires_grad_(False)
            return
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for a, m in zip(self.avg.state_dict().values(), model.state_dict().values(), strict=True):
            if a.is_floating_point():
                a.lerp_(m, 1.0 - d)
            else:
                a.copy_(m)

    def model(self) -> nn.Module:
        if self.avg is None:
            raise RuntimeError("no training step has run: nothing to average")
        core = getattr(self.avg, "_module", self.avg)
        if hasattr(core, "return_seg"):
            core.return_seg = False
        return self.avg


def write_history(history: list[dict], path: Path) -> None:
    import json

    path.write_text("\n".join(json.dumps(r) for r in history) + "\n")
