"""Relabel a segmentation into the internal convention (1 necrosis/non-enhancing, 2 edema, 4 enhancing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def convert_seg(src: Path, dst: Path, mapping: Mapping[int, int]) -> Path:
    """Write ``dst`` with values remapped by ``mapping`` (unlisted values kept); skip if up to date."""
    import nibabel as nib

    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    img = nib.load(str(src))
    data = np.asarray(img.dataobj).astype(np.int16)
    out = data.copy()
    for a, b in mapping.items():
        out[data == a] = b
    dst.parent.mkdir(parents=True, exist_ok=True)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.uint8)
    tmp = dst.with_name(dst.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(out.astype(np.uint8), img.affine, hdr), str(tmp))
    tmp.replace(dst)
    return dst
