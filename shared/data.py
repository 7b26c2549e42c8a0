"""Load, preprocess and cache task inputs with the bundle's MONAI chain (whole brain, no tumour crop).

The chain itself (:mod:`shared.bundle_scripts.transforms`) is the one definition that MODEL_DIR's
``configs/inference.json`` carries too. ``seg`` is never used to place or size an input: it only
follows the image as an optional training target. Preprocessed arrays are cached on disk (float16
``.npz``) keyed by the files' content fingerprint and the preprocessing parameters, so a second epoch
(or a second run) never re-reads NIfTI.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from shared.bundle_scripts.transforms import PREPROCESS_VERSION, SEG_LABELS, build_preprocessing
from shared.mr_augment import check_level, scanner_like, zoom_factors
from shared.tasks import TaskSample, TaskSpec

SEG_CLASSES = SEG_LABELS  # stored as indices 0..3 when a segmentation target is requested

nifti_loads = 0  # counts NIfTI reads (tests use it to prove the cache works)


def default_cache_dir() -> Path:
    """``$GLIOFED_CACHE`` or ``~/.cache/gliofed/preprocessed``."""
    env = os.environ.get("GLIOFED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gliofed" / "preprocessed"


def file_fingerprint(path: Path) -> str:
    """Cheap content key: size, mtime and SHA-1 of the first and last MiB."""
    st = path.stat()
    h = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()


@dataclass(frozen=True)
class PreprocessConfig:
    """How one session's images become a network input: the whole brain resized to ``size``."""

    size: tuple[int, int, int]
    with_seg: bool = False

    def key(self) -> str:
        return json.dumps([PREPROCESS_VERSION, list(self.size)])


_chains: dict[tuple, object] = {}


def _chain(keys: tuple[str, ...], size: tuple[int, ...], seg: bool):
    k = (keys, tuple(size), seg)
    if k not in _chains:
        _chains[k] = build_preprocessing(keys, size, seg=seg)
    return _chains[k]


def preprocess_session(
    paths: Sequence[Path], seg: Path | None, cfg: PreprocessConfig,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Channels (C, *size) float16 from the images alone and, when ``seg`` is given and asked for, a
    label map (*size) of SEG_CLASSES indices cropped with the images' box."""
    global nifti_loads
    names = tuple(names) if names else tuple(f"image{i}" for i in range(len(paths)))
    if "seg" in names:
        raise ValueError("'seg' is a training target, never a network input")
    use_seg = seg is not None and cfg.with_seg
    data = {n: str(p) for n, p in zip(names, paths, strict=True)}
    if use_seg:
        data["seg"] = str(seg)
    nifti_loads += len(data)
    try:
        out = _chain(names, tuple(cfg.size), use_seg)(data)
    except RuntimeError as exc:  # MONAI hides the reader's own error: read each file to surface it
        import nibabel as nib

        for f in data.values():
            np.asarray(nib.load(f).dataobj)  # raises e.g. ImageFileError "... is not a gzip file"
        raise ValueError(f"cannot preprocess {', '.join(map(str, paths))}: {exc}") from exc
    x = out["image"].numpy()
    y = out["seg"].numpy()[0].astype(np.int64) if use_seg else None
    return x, y


class SessionCache:
    """Disk cache of preprocessed sessions (float16 arrays), plus an optional in-memory layer."""

    def __init__(self, cache_dir: str | Path | None, memory: bool = True) -> None:
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory = memory
        self._ram: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._keys: dict[tuple, str] = {}

    def key(self, paths: Sequence[Path], seg: Path | None, cfg: PreprocessConfig) -> str:
        """Content key of the inputs; re-hashed only when a file's size or mtime changes."""
        files = [*paths, *([seg] if seg is not None else [])]
        stats = []
        for p in files:
            st = Path(p).stat()
            stats.append((str(p), st.st_size, st.st_mtime_ns))
        memo = (cfg.key(), tuple(stats))
        if memo not in self._keys:
            h = hashlib.sha1(cfg.key().encode())
            for p in files:
                h.update(file_fingerprint(p).encode())
            self._keys[memo] = h.hexdigest()
        return self._keys[memo]

    def get(
        self, paths: Sequence[Path], seg: Path | None, cfg: PreprocessConfig,
        names: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        k = self.key(paths, seg, cfg)
        if k in self._ram:
            return self._ram[k]
        f = self.dir / f"{k}.npz"
        if f.exists():
            with np.load(f) as z:
                x = z["x"]
                y = z["y"] if "y" in z.files else None
        else:
            x, y = preprocess_session(paths, seg, PreprocessConfig(size=cfg.size, with_seg=True), names)
            x = x.astype(np.float16)
            tmp = f.with_name(f"{k}.{os.getpid()}.tmp.npz")
            if y is not None:
                np.savez(tmp, x=x, y=y.astype(np.uint8))
            else:
                np.savez(tmp, x=x)
            tmp.replace(f)
        out = (x, y)
        if self.memory:
            self._ram[k] = out
        return out


def input_columns(spec: TaskSpec, use_optional: bool) -> list[str]:
    """Image columns of one session, in channel order."""
    return list(spec.inputs) + (list(spec.optional_inputs) if use_optional else [])


def session_inputs(sample: TaskSample, spec: TaskSpec, use_optional: bool) -> list[list[Path]]:
    """Image paths per timepoint (baseline first for two-timepoint tasks)."""
    cols = input_columns(spec, use_optional)
    sessions = [sample.baseline, sample.case] if spec.timepoints == 2 else [sample.case]
    return [[s.images[c] for c in cols] for s in sessions if s is not None]


def optional_inputs_available(samples: Sequence[TaskSample], spec: TaskSpec) -> bool:
    """Optional inputs are used only when every sample (and baseline) has them."""
    if not spec.optional_inputs or not samples:
        return False
    for s in samples:
        for sess in (s.case, s.baseline):
            if sess is not None and not sess.has_images(spec.optional_inputs):
                return False
    return True


def input_channels(spec: TaskSpec, use_optional: bool, subtraction: bool = False) -> int:
    n = len(spec.inputs) + (len(spec.optional_inputs) if use_optional else 0)
    if spec.timepoints == 2:
        return n * (3 if subtraction else 2)
    return n


class TaskDataset(Dataset):
    """(image tensor C x D x H x W, class index[, seg index map]) for a task's samples."""

    def __init__(
        self,
        samples: Sequence[TaskSample],
        spec: TaskSpec,
        size: tuple[int, int, int],
        cache: SessionCache,
        *,
        augment: bool = False,
        use_optional: bool = False,
        subtraction: bool = False,
        with_seg: bool = False,
        clinical: Sequence[str] = (),
        seed: int = 0,
        half: bool = False,
        flip_axes: Sequence[int] = (0,),
        augment_level: str = "basic",
    ) -> None:
        self.samples = list(samples)
        self.flip_axes = tuple(flip_axes)
        self.augment_level = check_level(augment_level)
        self.spec = spec
        self.cfg = PreprocessConfig(size=tuple(size))
        self.cache = cache
        self.augment = augment
        self.use_optional = use_optional
        self.subtraction = subtraction
        self.with_seg = with_seg
        self.clinical = tuple(clinical)
        self.gen = torch.Generator().manual_seed(seed)
        self.half = half and not augment  # float16 items (the GPU path converts on the device)
        self.class_index = {c: i for i, c in enumerate(spec.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> list[int]:
        return [self.class_index[s.label] for s in self.samples if s.label is not None]

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.samples[i]
        xs, seg = [], None
        for tp, paths in enumerate(session_inputs(s, self.spec, self.use_optional)):
            sess = (s.baseline if tp == 0 and self.spec.timepoints == 2 else s.case)
            segp = sess.images.get("seg") if sess is not None else None
            x, y = self.cache.get(paths, segp, self.cfg, input_columns(self.spec, self.use_optional))
            xs.append(torch.from_numpy(x.astype(np.float16 if self.half else np.float32)))
            if sess is s.case and y is not None:
                seg = torch.from_numpy(y.astype(np.int64))
        if self.spec.timepoints == 2 and self.subtraction:
            xs.append(xs[1] - xs[0])
        return torch.cat(xs, dim=0), seg

    def clinical_values(self, i: int) -> torch.Tensor:
        """The follow-up session's clinical columns as floats (NaN when missing or not a number)."""
        extra = self.samples[i].case.extra
        vals = []
        for col in self.clinical:
            try:
                vals.append(float(extra.get(col, "") or "nan"))
            except ValueError:
                vals.append(float("nan"))
        return torch.tensor(vals, dtype=torch.float32)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        """A dict batch item: ``x``, ``y`` and, when configured, ``seg`` and ``clinical``."""
        x, seg = self.load(i)
        if self.augment:
            x, seg = augment(x, seg, self.gen, self.flip_axes, self.augment_level)
        y = self.class_index[self.samples[i].label] if self.samples[i].label is not None else -1
        item: dict[str, torch.Tensor | int] = {"x": x, "y": y}
        if self.with_seg:
            # a missing mask is all -100: ignored by the segmentation loss
            item["seg"] = seg if seg is not None else torch.full(x.shape[1:], -100, dtype=torch.int64)
        if self.clinical:
            item["clinical"] = self.clinical_values(i)
        return item


FLIP_AXES = (0,)  # spatial axes flipped at random: left-right only (inputs are RAS)


def augment_batch(
    x: torch.Tensor, seg: torch.Tensor | None, gen: torch.Generator, flip_axes: Sequence[int] = FLIP_AXES,
    level: str = "basic",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`augment` for a whole batch [B, C, D, H, W] on its own device (the GPU path).

    Random numbers come from the CPU generator ``gen`` (reproducible); the resampling runs where
    ``x`` is, in one batched ``grid_sample``, so the GPU is not left waiting for CPU augmentation.
    """
    b = x.shape[0]
    flips = torch.rand(b, 3, generator=gen) < 0.5
    angles = (torch.rand(b, generator=gen) - 0.5) * 2 * float(np.deg2rad(10))
    scale = 1 + 0.1 * (torch.rand(b, x.shape[1], 1, 1, 1, generator=gen) - 0.5) * 2
    shift = 0.1 * (torch.rand(b, x.shape[1], 1, 1, 1, generator=gen) - 0.5) * 2
    c, s = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(b, 3, 4)
    theta[:, 0, 0] = 1
    theta[:, 1, 1], theta[:, 1, 2], theta[:, 2, 1], theta[:, 2, 2] = c, -s, s, c
    if check_level(level) == "mr":
        theta[:, :, :3] *= zoom_factors(b, gen)[:, None, None]
    # a flip is a sign change of the matching sampling axis (grid order is x=W, y=H, z=D)
    for axis in flip_axes:
        theta[:, 2 - axis, :3] *= torch.where(flips[:, axis], -1.0, 1.0)[:, None]
    # on CUDA the resampling runs in the items' float16 (half the memory traffic); on the CPU in float32
    work = x.dtype if x.is_cuda and x.dtype == torch.float16 else torch.float32
    theta = theta.to(x.device, work)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(work), grid, mode="bilinear", align_corners=False).float()
    if seg is not None:
        seg = F.grid_sample(seg[:, None].float(), grid.float(), mode="nearest",
                            align_corners=False)[:, 0].round().long()
    if level == "mr":
        out = scanner_like(out, gen)
    return out * scale.to(x.device) + shift.to(x.device), seg


def augment(
    x: torch.Tensor, seg: torch.Tensor | None, gen: torch.Generator, flip_axes: Sequence[int] = FLIP_AXES,
    level: str = "basic",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random flips, a small rotation in the axial plane, and per-channel intensity jitter.

    Only the left-right axis is flipped by default: an up-down or front-back flip would move the sella
    to the vertex and the cerebellopontine angle to the frontal lobe, destroying the location that tells
    tumour types apart (benchmarks/README.md, typing ablation). ``flip_axes=(0, 1, 2)`` flips all three.
    ``level="mr"`` adds an isotropic zoom and scanner-like contrast, bias field and noise
    (``shared/mr_augment.py``).
    """
    for axis in (1, 2, 3):
        if torch.rand(1, generator=gen).item() < 0.5 and axis - 1 in flip_axes:
            x = x.flip(axis)
            seg = seg.flip(axis - 1) if seg is not None else None
    angle = float((torch.rand(1, generator=gen).item() - 0.5) * 2 * np.deg2rad(10))
    zoom = float(zoom_factors(1, gen)[0]) if check_level(level) == "mr" else 1.0
    if abs(angle) > 1e-3 or zoom != 1.0:
        c, s = np.cos(angle) * zoom, np.sin(angle) * zoom
        theta = torch.tensor([[[zoom, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0]]], dtype=torch.float32)
        grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
        x = F.grid_sample(x[None], grid, mode="bilinear", align_corners=False)[0]
        if seg is not None:
            seg = (
                F.grid_sample(seg[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
                .round()
                .long()
            )
    if level == "mr":
        x = scanner_like(x[None], gen)[0]
    scale = 1 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5) * 2
    shift = 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5) * 2
    return x * scale + shift, seg


class ResidentBatches:
    """A whole (small) training set held on the GPU; shuffled batches by indexing, no CPU per step.

    Medical cohorts at a site are small (hundreds of cases): at 4x128^3 float16 that is 16 MiB a
    case, so even 1000 cases fit in a fraction of an H100. Measured (benchmarks/README.md), feeding
    the GPU from host memory tops out near 130 samples/s at 4x128^3 however many loader workers run,
    because every batch is 268 MB to collate and copy; from device memory the loop runs at the
    network's own speed. Items come from ``ds`` un-augmented; the loop augments on the device.
    """

    def __init__(self, ds: TaskDataset, batch_size: int, device: torch.device, seed: int = 0,
                 drop_lone: bool = False) -> None:
        items = [ds[i] for i in range(len(ds))]
        self.drop_lone = drop_lone  # skip a last batch of one case (BatchNorm cannot train on it)
        self.device = device
        self.batch_size = max(1, batch_size)
        self.x = torch.stack([it["x"] for it in items]).to(device)
        self.y = torch.tensor([int(it["y"]) for it in items], device=device)
        self.extra = {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(device)
                      for k in ("seg", "clinical") if k in items[0]}
        self.gen = torch.Generator().manual_seed(seed)

    @staticmethod
    def fits(ds: TaskDataset, device: torch.device, fraction: float = 0.3) -> bool:
        """True when the set (measured from its first item) takes under ``fraction`` of free memory."""
        if device.type != "cuda" or len(ds) == 0:
            return False
        item = ds[0]
        per_item = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
        free, _ = torch.cuda.mem_get_info(device)
        return per_item * len(ds) <= fraction * free

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.gen).to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_lone and len(idx) == 1 and len(order) > 1:
                break
            batch = {"x": self.x.index_select(0, idx), "y": self.y.index_select(0, idx)}
            batch.update({k: v.index_select(0, idx) for k, v in self.extra.items()})
            yield batch
