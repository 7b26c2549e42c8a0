"""Safe NIfTI reading: a file, not a folder; a header within limits before any voxel is read; slabs.

A 2 MB ``.nii.gz`` can inflate to gigabytes, so every reader in gliofed opens images through
:func:`open_image`: it refuses a missing path or a folder, reads the header only, and refuses an image
whose header promises more than the per-image limit (voxels x max(bytes per voxel, 4), what reading it
as float32 takes) *before* decompressing anything. :func:`iter_slabs` then streams the voxels in slabs
along the last axis, so whole-volume statistics (NaN count, min/max, label values) never need the
volume in memory. Errors are :class:`ImageError` with a short reason that never quotes file bytes.

The limit is node config ``max-image-mb`` (default in :class:`shared.config.NodeConfig`), or
``--max-image-mb`` on the command line; :func:`set_max_image_mb` sets it for this process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import NodeConfig

SLAB_BYTES = 64 << 20  # voxels decompressed per slab when streaming

_max_image_mb: float = float(NodeConfig().max_image_mb)


class ImageError(ValueError):
    """An image gliofed will not read: missing, a folder, unreadable, too large, wrong dimensions."""

    def __init__(self, reason: str, path: str | Path = "", cause: str = "") -> None:
        super().__init__(reason)
        self.reason, self.path, self.cause = reason, str(path), cause


class ImageTooLarge(ImageError):
    """The header promises more voxels than the per-image limit allows."""


def set_max_image_mb(mb: float) -> None:
    """The per-image limit for this process (MiB, > 0)."""
    global _max_image_mb
    if not mb > 0:
        raise ValueError(f"max-image-mb must be > 0, got {mb}")
    _max_image_mb = float(mb)


def max_image_mb() -> float:
    return _max_image_mb


def image_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """What reading an image of ``shape`` takes in memory (as float32 at least)."""
    return int(np.prod([int(s) for s in shape], dtype=np.float64)) * max(np.dtype(dtype).itemsize, 4)


def open_image(path: str | Path, limit_mb: float | None = None) -> Any:
    """The nibabel image (header read, voxels not) after the file and size checks; ImageError else."""
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise ImageError("missing file", p)
    if not p.is_file():
        raise ImageError("not a file (a folder or device where an image is expected)", p)
    try:
        img = nib.load(str(p), keep_file_open=True)
        shape = tuple(int(s) for s in img.shape)
        dtype = img.header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - any reader failure means: not an image we can use
        name = type(exc).__name__
        raise ImageError(f"not a readable NIfTI ({name})", p, cause=name) from None
    limit = float(limit_mb if limit_mb is not None else _max_image_mb)
    size = image_bytes(shape, dtype)
    if size > limit * (1 << 20):
        raise ImageTooLarge(
            f"header claims {'x'.join(map(str, shape))} voxels of {dtype}: {size / (1 << 30):.2f} GiB "
            f"to read, over the {limit:g} MiB per-image limit (node config max-image-mb, "
            "--max-image-mb)", p)
    return img


def iter_slabs(img: Any, slab_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The (scaled) voxels of ``img`` in slabs along its last axis, ``slab_bytes`` at most each
    (default :data:`SLAB_BYTES`)."""
    slab_bytes = slab_bytes or SLAB_BYTES
    shape = img.shape
    if len(shape) == 0:
        return
    per_index = max(1, int(np.prod(shape[:-1], dtype=np.float64)) * 8)
    step = max(1, slab_bytes // per_index)
    for start in range(0, shape[-1], step):
        yield np.asarray(img.dataobj[..., start:start + step])


def read_array(path: str | Path, dtype: Any = np.float32) -> tuple[np.ndarray, Any]:
    """(voxels as ``dtype``, image) after :func:`open_image`; a short or corrupt file is ImageError."""
    img = open_image(path)
    try:
        return np.asarray(img.dataobj, dtype=dtype), img
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, ...
        raise ImageError(f"truncated or corrupt image data ({type(exc).__name__})", path) from None


def require_3d(img: Any, path: str | Path) -> Any:
    """``img`` when its header describes a 3D volume (a trailing singleton axis allowed); ImageError else."""
    if len([s for s in img.shape if s > 1]) < 3 or len(img.shape) < 3:
        raise ImageError(f"not a 3D image (shape {tuple(img.shape)})", path)
    return img


def qform_sform_gap_mm(img: Any) -> float:
    """Largest distance (mm) between where qform and sform put the volume's corners (0: agree/unset)."""
    hdr = img.header
    try:
        q, qcode = hdr.get_qform(coded=True)
        s, scode = hdr.get_sform(coded=True)
    except Exception:  # noqa: BLE001 - NIfTI-1/2 only; other formats have one affine
        return 0.0
    if not qcode or not scode or q is None or s is None:
        return 0.0
    dims = [max(int(n) - 1, 0) for n in img.shape[:3]]
    corners = np.array([[i, j, k, 1] for i in (0, dims[0]) for j in (0, dims[1]) for k in (0, dims[2])],
                       dtype=np.float64)
    return float(np.linalg.norm((corners @ q.T - corners @ s.T)[:, :3], axis=1).max())
