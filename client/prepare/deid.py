"""De-identification: pseudonyms from a site-held salt, PHI-free NIfTI headers, a check of every output
string against the patient fields found in the DICOM.

Nothing from a DICOM header is ever copied into an output: images are written by :func:`save_nifti`
with a fresh header whose text fields hold a constant, ids come from ``sessions.csv`` or are salted
hashes (:func:`pseudonym`), and :func:`phi_in` rejects an id or cell that contains a patient's name,
ID, birth date, study date, accession number or institution seen in that session's DICOM.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import numpy as np

# Fields that identify a patient, a visit or a place (DICOM PS3.15 basic profile, the ones we read).
PHI_FIELDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "StudyDate",
              "SeriesDate", "AcquisitionDate", "AccessionNumber", "InstitutionName",
              "ReferringPhysicianName", "StudyID")
HEADER_DESCRIP = b"gliofed site prepare"


def phi_values(ds) -> dict[str, str]:
    """The non-trivial PHI values of a dataset (names split into their components)."""
    out: dict[str, str] = {}
    for name in PHI_FIELDS:
        v = ds.get(name)
        if v is None:
            continue
        text = str(v).strip()
        if len(text) < 3:
            continue
        out[name] = text
        if "Name" in name:
            for i, part in enumerate(p for p in text.replace("^", " ").split() if len(p) >= 3):
                out[f"{name}.{i}"] = part
    return out


def phi_in(text: str, phi: dict[str, set[str]]) -> str | None:
    """Name of the DICOM field whose value appears in ``text`` (case-insensitive), else None."""
    low = text.lower()
    for field, values in phi.items():
        for v in values:
            if v and v.lower() in low:
                return field.split(".")[0]
    return None


def load_salt(path: Path) -> bytes:
    """The site's secret salt (created on first use, mode 600). It never leaves the site."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex() + "\n")
    os.replace(tmp, path)
    return salt


def pseudonym(prefix: str, value: str, salt: bytes, n: int = 12) -> str:
    """``prefix-<hex>``: HMAC-SHA256 of ``value`` under the site's salt (stable, not reversible)."""
    return f"{prefix}-{hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:n]}"


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` with a fresh NIfTI-1 header: no text from any source header, sform = qform."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), affine)
    hdr = img.header
    hdr["descrip"] = HEADER_DESCRIP
    for name in ("aux_file", "db_name", "intent_name"):
        hdr[name] = b""
    img.set_sform(affine, code=1)  # scanner-anchored: template (MNI) space
    img.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def header_text(path: Path) -> dict[str, str]:
    """The text fields of a written header (what the site check inspects)."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    return {k: hdr[k].item().decode("latin-1").strip("\x00 ")
            for k in ("descrip", "aux_file", "db_name", "intent_name")}
