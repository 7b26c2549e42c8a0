"""OSIPI DCE-MRI task-force reference cases (read in place; skipped when the folder is absent).

Folder: $GLIOFED_OSIPI_DIR, else ../shared/reference/osipi-dce next to the project root.
Pass rule and tolerances: shared.dce.osipi.TOLERANCES (numpy assert_allclose semantics).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.dce import osipi


def _osipi_dir() -> Path:
    env = os.environ.get("GLIOFED_OSIPI_DIR")
    return (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / "shared" / "reference" / "osipi-dce"
    )


OSIPI_DIR = _osipi_dir()
requires_osipi = pytest.mark.skipif(
    not (OSIPI_DIR / "2cxm_sd_0.001_delay_0.csv").is_file(),
    reason=f"OSIPI reference data not found at {OSIPI_DIR} (set GLIOFED_OSIPI_DIR)",
)


def _assert_all_pass(report: osipi.FileReport) -> None:
    print(f"OSIPI {report.file} [{report.setting}]: {report.n_pass}/{len(report.cases)} pass")
    detail = "; ".join(f"{c.label}: {c.values}" for c in report.failures)
    assert report.n_pass == len(report.cases), f"{report.file}: failing cases {detail}"


@requires_osipi
def test_2cxm_delay_0_every_case():
    _assert_all_pass(osipi.check_2cxm(OSIPI_DIR, 0, fit_delay=False))


@requires_osipi
def test_2cxm_delay_5_every_case_with_fitted_delay():
    _assert_all_pass(osipi.check_2cxm(OSIPI_DIR, 5, fit_delay=True))


@requires_osipi
def test_2cxm_delay_0_with_free_delay_is_noise_limited():
    """With the delay free as well, case_14 lands outside the PS tolerance; record it honestly:
    at least 23/24 pass, and any failing fit has a lower RSS than the true parameters."""
    import numpy as np

    from shared.dce import twocxm

    report = osipi.check_2cxm(OSIPI_DIR, 0, fit_delay=True)
    print(f"OSIPI {report.file} [{report.setting}]: {report.n_pass}/{len(report.cases)} pass")
    assert report.n_pass >= 23
    rows = {r["label"]: r for r in osipi.read_osipi_csv(OSIPI_DIR / report.file)}
    for case in report.failures:
        r = rows[case.label]
        fit = {k: v[0] for k, v in case.values.items()}
        args = (r["t"], r["cp_aif"])
        rss_fit = np.sum(
            (twocxm(*args, fit["fp"], fit["ps"], fit["ve"], fit["vp"], fit["delay"]) - r["C_t"])
            ** 2
        )
        rss_true = np.sum((twocxm(*args, r["fp"], r["ps"], r["ve"], r["vp"]) - r["C_t"]) ** 2)
        assert rss_fit < rss_true, case.label


@requires_osipi
def test_extended_tofts_every_case():
    _assert_all_pass(osipi.check_tofts(OSIPI_DIR, extended=True))


@requires_osipi
def test_tofts_every_case():
    _assert_all_pass(osipi.check_tofts(OSIPI_DIR, extended=False))


@requires_osipi
@pytest.mark.parametrize("with_delay", [False, True])
def test_parker_aif_reference(with_delay):
    _assert_all_pass(osipi.check_parker(OSIPI_DIR, with_delay))


@requires_osipi
def test_signal_to_concentration_reference():
    _assert_all_pass(osipi.check_signal_to_conc(OSIPI_DIR))


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="OSIPI reference file not found"):
        osipi.read_osipi_csv(tmp_path / "nope.csv")
