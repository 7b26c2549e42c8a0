"""Reader for the OSIPI DCE-DSC code-collection test CSVs and their pass rule.

The CSVs are public reference data kept *outside* this project; callers pass the folder (tests and
benchmarks resolve it from ``GLIOFED_OSIPI_DIR`` or ``../shared/reference/osipi-dce``). Nothing here
knows where they live. Array-valued cells are space-separated numbers; files may carry a UTF-8 BOM.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# OSIPI tolerances: |fitted - reference| <= atol + rtol * |reference|
TOLERANCES: dict[str, tuple[float, float]] = {
    "ve": (0.05, 0.0),
    "ktrans": (0.005, 0.1),
    "ps": (0.005, 0.1),
    "vp": (0.025, 0.0),
    "fp": (5.0, 0.1),
    "delay": (1.0, 0.0),
    "aif": (1e-4, 0.01),
    "aif_delay": (0.1, 0.1),
    "conc": (1e-5, 1e-5),
}


def within_tolerance(value: np.ndarray | float, reference: np.ndarray | float, key: str) -> bool:
    """OSIPI's pass rule (numpy.testing.assert_allclose semantics) for parameter ``key``."""
    atol, rtol = TOLERANCES[key]
    value_a, ref_a = np.asarray(value, dtype=float), np.asarray(reference, dtype=float)
    return bool(np.all(np.abs(value_a - ref_a) <= atol + rtol * np.abs(ref_a)))


def _cell(text: str) -> float | np.ndarray | str:
    parts = text.split()
    try:
        values = np.array([float(p) for p in parts])
    except ValueError:
        return text
    return values[0] if len(values) == 1 and " " not in text.strip() else values


def read_osipi_csv(path: str | Path) -> list[dict[str, float | np.ndarray | str]]:
    """Rows of one OSIPI CSV as dicts; numeric cells become floats, arrays become numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: OSIPI reference file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [{key: _cell(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
