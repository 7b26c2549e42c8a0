"""The one preprocessing definition: images of one session -> whole-brain network input (MONAI transforms).

load -> channel-first -> RAS -> concatenate the sequences -> crop to the images' non-zero support (the
brain in skull-stripped scans; never the tumour mask) -> z-score each channel over its non-zero
voxels -> resize to the network's input size -> float16 (the precision of gliofed's disk cache).

A ``seg`` key, when asked for, only follows the image: it is cropped with the box found on the images
and resized with nearest-neighbour interpolation, and it is a training target, never an input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PREPROCESS_VERSION = 2  # 1: tumour-centred crop from seg (removed); 2: whole-brain MONAI chain
SEG_LABELS = (0, 1, 2, 4)  # BraTS labels, mapped to class indices 0..3 for the auxiliary head


def preprocessing_config(keys: Sequence[str], size: Sequence[int], *, seg: bool = False,
                         margin: int = 2) -> dict[str, Any]:
    """MONAI bundle config (``_target_`` form) of the chain for image columns ``keys``."""
    keys = list(keys)
    allk = keys + (["seg"] if seg else [])
    cropped = ["image"] + (["seg"] if seg else [])
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": allk, "image_only": True, "reader": "NibabelReader"},
        {"_target_": "EnsureChannelFirstd", "keys": allk},
        {"_target_": "Orientationd", "keys": allk, "axcodes": "RAS",
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "ConcatItemsd", "keys": keys, "name": "image", "dim": 0},
        {"_target_": "CropForegroundd", "keys": cropped, "source_key": "image", "margin": margin,
         "allow_smaller": True},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
    ]
    if seg:
        transforms.append({"_target_": "MapLabelValued", "keys": "seg", "orig_labels": list(SEG_LABELS),
                           "target_labels": list(range(len(SEG_LABELS)))})
    transforms += [
        {"_target_": "Resized", "keys": cropped, "spatial_size": [int(s) for s in size],
         "mode": ["trilinear"] + (["nearest"] if seg else [])},
        {"_target_": "EnsureTyped", "keys": "image", "data_type": "tensor", "dtype": "$torch.float16",
         "track_meta": False},
    ]
    if seg:
        transforms.append({"_target_": "EnsureTyped", "keys": "seg", "data_type": "tensor",
                           "dtype": "$torch.uint8", "track_meta": False})
    return {"_target_": "Compose", "transforms": transforms}


def build_preprocessing(keys: Sequence[str], size: Sequence[int], *, seg: bool = False):
    """Instantiate :func:`preprocessing_config` with MONAI's config parser (as the bundle runner does)."""
    import logging
    import warnings

    from monai.bundle import ConfigParser

    parser = ConfigParser({"preprocessing": preprocessing_config(keys, size, seg=seg)})
    # MONAI's LoadImage builds every default reader, NibabelReader named or not, and its DICOM reader
    # warns (once per build) that NVIDIA's GPU DICOM decoder is absent; NIfTI input never uses it.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        return parser.get_parsed_content("preprocessing")
