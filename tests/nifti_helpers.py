"""Tiny NIfTI writers for tests."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np


def write_nii(path: Path, data: np.ndarray | None = None, shape=(8, 8, 8), affine=None,
              descrip: str = "", aux_file: str = "") -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(zlib.crc32(path.name.encode())).random(shape).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if descrip:
        img.header["descrip"] = descrip
    if aux_file:
        img.header["aux_file"] = aux_file
    nib.save(img, str(path))
    return path


def seg_array(shape=(8, 8, 8), labels=(1, 2, 4)) -> np.ndarray:
    s = np.zeros(shape, dtype=np.uint8)
    for i, v in enumerate(labels):
        s[2 + i, 2:5, 2:5] = v
    return s
