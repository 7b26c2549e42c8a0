"""Sequence recognition rules for inferred sessions (shipped defaults, a site's own file, bad files)."""

from __future__ import annotations

import pytest

from client.prepare.rules import RulesError, load_rules


@pytest.mark.parametrize(("description", "protocol", "temporal", "expected"), [
    ("t1_mprage_sag_p2_iso", "", False, "t1"),
    ("t1_mprage_sag_p2_iso_POST", "", False, "t1ce"),
    ("AX T1 POST GD", "", False, "t1ce"),
    ("3D T1 C+", "", False, "t1ce"),
    ("T1W_3D_TFE pre-contrast", "", False, "t1"),
    ("AX T2 FSE", "", False, "t2"),
    ("t2_tirm_tra_dark-fluid", "", False, "flair"),
    ("AX FLAIR", "", False, "flair"),
    ("", "t1_fl3d_dyn_tra", True, "dce"),
    ("ep2d_diff_3scan_trace", "", False, None),
    ("localizer", "", False, None),
    ("T2*_GRE", "", False, None),
    ("t1 vibe dyn", "", False, "t1"),  # a single-timepoint volume is never the DCE
])
def test_shipped_rules_name_common_series(description, protocol, temporal, expected) -> None:
    assert load_rules().classify(description, protocol, temporal) == expected


def test_a_sites_own_rules_replace_the_defaults(tmp_path) -> None:
    p = tmp_path / "rules.toml"
    p.write_text('order = ["t1ce", "t1"]\n[sequences.t1ce]\ninclude = ["kontrast"]\n'
                 '[sequences.t1]\ninclude = ["^T1"]\n')
    rules = load_rules(p)
    assert rules.classify("T1 mit Kontrast", "", False) == "t1ce"
    assert rules.classify("T1 nativ", "", False) == "t1"
    assert rules.classify("T2 tse", "", False) is None


@pytest.mark.parametrize(("text", "message"), [
    ('order = ["t3"]\n', "unknown sequence 't3'"),
    ('order = ["t1"]\n', "no [sequences.t1]"),
    ('[sequences.t1]\ninclude = ["(unclosed"]\n', "bad pattern '(unclosed'"),
    ("order = [\n", "not valid TOML"),
])
def test_bad_rules_file_is_one_line_error_naming_it(tmp_path, text, message) -> None:
    p = tmp_path / "rules.toml"
    p.write_text(text)
    with pytest.raises(RulesError, match="rules.toml") as err:
        load_rules(p)
    assert message in str(err.value) and "\n" not in str(err.value).strip()
