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


# ---------------------------------------------------------------------------------------------
# Running the OSIPI cases through shared.dce
# ---------------------------------------------------------------------------------------------

from dataclasses import dataclass, field


@dataclass
class CaseResult:
    """One OSIPI case: its label, pass/fail, and the fitted vs reference values."""

    label: str
    passed: bool
    values: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (fit, ref)


@dataclass
class FileReport:
    """All cases of one OSIPI file under one fitting setting."""

    file: str
    setting: str
    cases: list[CaseResult]

    @property
    def n_pass(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]


def _param_case(label: str, fitted: dict[str, float], refs: dict[str, float]) -> CaseResult:
    values = {k: (fitted[k], refs[k]) for k in refs}
    return CaseResult(label, all(within_tolerance(f, r, k) for k, (f, r) in values.items()), values)


def check_2cxm(folder: Path, delay_s: int, fit_delay: bool) -> FileReport:
    """2CXM cases; OSIPI fits delay on the delayed file, and either way is reported here."""
    from shared.dce.fit import fit_2cxm

    name = f"2cxm_sd_0.001_delay_{delay_s}.csv"
    rows = read_osipi_csv(folder / name)
    t, ca = rows[0]["t"], rows[0]["cp_aif"]
    same_aif = all(np.array_equal(r["cp_aif"], ca) and np.array_equal(r["t"], t) for r in rows)
    if not same_aif:
        raise ValueError(f"{folder / name}: cases do not share one AIF and time axis")
    res = fit_2cxm(np.stack([r["C_t"] for r in rows]), t, ca, fit_delay=fit_delay)
    cases = []
    for i, r in enumerate(rows):
        fitted = {k: float(res[k][i]) for k in ("fp", "ps", "ve", "vp", "delay")}
        refs = {k: float(r[k]) for k in ("fp", "ps", "ve", "vp")}
        if fit_delay:
            refs["delay"] = float(r["arterial_delay"])
        cases.append(_param_case(str(r["label"]), fitted, refs))
    return FileReport(name, "delay fitted" if fit_delay else "delay fixed at 0", cases)


def check_tofts(folder: Path, extended: bool) -> FileReport:
    """Tofts (QIBA v11 DRO) or extended Tofts (Bosca brain DRO) cases, grouped by shared AIF."""
    from shared.dce.fit import fit_extended_tofts, fit_tofts

    name = "dce_DRO_data_extended_tofts.csv" if extended else "dce_DRO_data_tofts.csv"
    rows = read_osipi_csv(folder / name)
    keys = ("ktrans", "ve", "vp") if extended else ("ktrans", "ve")
    groups: dict[bytes, list[int]] = {}
    for i, r in enumerate(rows):
        key = np.concatenate([r["t"], r["ca"], r["ta"]]).tobytes()
        groups.setdefault(key, []).append(i)
    cases: list[CaseResult | None] = [None] * len(rows)
    for members in groups.values():
        first = rows[members[0]]
        curves = np.stack([rows[i]["C"] for i in members])
        fit = fit_extended_tofts if extended else fit_tofts
        res = fit(curves, first["t"], first["ca"], ta=first["ta"])
        for j, i in enumerate(members):
            refs = {k: float(rows[i]["Ktrans" if k == "ktrans" else k]) for k in keys}
            fitted = {k: float(res[k][j]) for k in keys}
            cases[i] = _param_case(str(rows[i]["label"]), fitted, refs)
    return FileReport(name, "delay fixed at 0", [c for c in cases if c is not None])


def check_parker(folder: Path, with_delay: bool) -> FileReport:
    """Parker AIF (blood) against the reference values, one case per label (time in minutes)."""
    from shared.dce.aif import parker_blood

    name = "ParkerAIF_ref_with_delay.csv" if with_delay else "ParkerAIF_ref.csv"
    rows = read_osipi_csv(folder / name)
    labels: dict[str, list[dict]] = {}
    for r in rows:
        labels.setdefault(str(r["label"]), []).append(r)
    key = "aif_delay" if with_delay else "aif"
    cases = []
    for label, group in labels.items():
        t_s = np.array([float(r["time"]) for r in group]) * 60.0
        ref = np.array([float(r["Cb"]) for r in group])
        delay = float(group[0]["delay"]) if group[0]["delay"] != "" else 0.0
        cb = parker_blood(t_s, delay)
        err = float(np.max(np.abs(cb - ref)))
        cases.append(CaseResult(label, within_tolerance(cb, ref, key), {"max_abs_err": (err, 0.0)}))
    return FileReport(name, "Cb(t - delay)" if with_delay else "Cb(t)", cases)


def check_signal_to_conc(folder: Path) -> FileReport:
    """SPGR signal-to-concentration voxels (baseline = mean of frames 1..numbaselinepts-1, as LEK)."""
    from shared.dce.signal import signal_to_conc

    name = "SI2Conc_data.csv"
    cases = []
    for r in read_osipi_csv(folder / name):
        conc = signal_to_conc(
            r["s"],
            float(r["T1base"]),
            float(r["r1"]),
            float(r["TR"]),
            float(r["FA"]),
            n_baseline=int(r["numbaselinepts"]),
            baseline_start=1,
        )
        err = float(np.max(np.abs(conc - r["conc"])))
        cases.append(
            CaseResult(
                str(r["label"]),
                within_tolerance(conc, r["conc"], "conc"),
                {"max_abs_err": (err, 0.0)},
            )
        )
    return FileReport(name, "baseline frames 1..n-1", cases)


def check_all(folder: str | Path) -> list[FileReport]:
    """Every OSIPI check this project makes, in report order."""
    folder = Path(folder)
    return [
        check_2cxm(folder, 0, fit_delay=False),
        check_2cxm(folder, 0, fit_delay=True),
        check_2cxm(folder, 5, fit_delay=True),
        check_tofts(folder, extended=True),
        check_tofts(folder, extended=False),
        check_parker(folder, with_delay=False),
        check_parker(folder, with_delay=True),
        check_signal_to_conc(folder),
    ]
