"""`gliofed synth` from the command line: writes a readable cohort, a gallery, and clear errors."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from gliofed.cli import app
from shared.cohort import read_cohort


def test_synth_cli_writes_cohort_and_gallery(tmp_path: Path) -> None:
    out, png = tmp_path / "site", tmp_path / "gallery.png"
    res = CliRunner().invoke(app, ["synth", "--out", str(out), "--cases", "16", "--sites", "2",
                                   "--shape", "24", "--seed", "2", "--gallery", str(png), "--quiet"])
    assert res.exit_code == 0, res.output
    cohort = read_cohort(out)
    assert len(cohort.cases) == 16 and not cohort.errors
    assert {c.site for c in cohort.cases} == {"site-1", "site-2"}
    assert "rano:" in res.output and "eligible" in res.output
    assert png.stat().st_size > 10_000


def test_synth_cli_rejects_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "a"), "--tasks", "grading,qtm"])
    assert res.exit_code == 2
    assert "unknown task(s) ['qtm']" in res.output
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "b"), "--shape", "32", "--spacing", "2"])
    assert res.exit_code == 2
    assert "not both" in res.output
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--held-out-test", "-1"])
    assert res.exit_code == 2
    assert "--held-out-test -1 is negative" in res.output
    assert not (tmp_path / "a").exists()
