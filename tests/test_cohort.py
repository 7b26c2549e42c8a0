"""The cohort contract: parsing, validation problems, patient-level splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cohort import CohortError, derive_splits, read_cohort, write_cohort
from shared.tasks import TASKS, class_counts, select_samples


def _site(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cohort.csv").write_text(text)
    return tmp_path


def test_missing_cohort_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="cohort.csv: missing"):
        read_cohort(tmp_path)


def test_missing_required_column(tmp_path: Path) -> None:
    _site(tmp_path, "case_id,t1\nA,a.nii.gz\n")
    with pytest.raises(CohortError, match="lacks required column.*patient_id"):
        read_cohort(tmp_path)


def test_row_problems_are_all_reported_with_line_numbers(tmp_path: Path) -> None:
    _site(
        tmp_path,
        "case_id,patient_id,grade,split,extra_col\n"
        "A,p1,HGG,train,x\n"
        "A,p2,LGG,train,y\n"  # duplicate case id
        "B,p3,GBM,test,z\n"  # bad label
        "C,p4,LGG,train\n"  # wrong field count
        "D,p1,HGG,test,w\n",  # p1 already in train
    )
    cohort = read_cohort(tmp_path)
    msgs = [str(p) for p in cohort.problems]
    assert any(":3: duplicate case_id A (first on line 2)" in m for m in msgs)
    assert any(":4: case B: grade 'GBM' is not one of LGG|HGG" in m for m in msgs)
    assert any(":5: row has 4 fields, header has 5" in m for m in msgs)
    assert any("patient p1 is in more than one split: test (line 6), train (line 2)" in m for m in msgs)
    ids = {c.case_id for c in cohort.cases}
    assert ids == {"B"}  # p1 excluded, dup and short rows skipped
    assert cohort.cases[0].extra == {"extra_col": "z"}
    assert cohort.cases[0].labels == {}


def test_derived_split_is_patient_level_and_deterministic(tmp_path: Path) -> None:
    rows = []
    for i in range(40):
        for tp in range(2):
            rows.append(
                {"case_id": f"c{i}_{tp}", "patient_id": f"p{i}", "timepoint": tp,
                 "grade": "HGG" if i % 3 else "LGG"}
            )
    write_cohort(tmp_path, rows)
    a = read_cohort(tmp_path, seed=1)
    b = read_cohort(tmp_path, seed=1)
    c = read_cohort(tmp_path, seed=2)
    assert [x.split for x in a.cases] == [x.split for x in b.cases]
    assert [x.split for x in a.cases] != [x.split for x in c.cases]
    per_patient: dict[str, set[str]] = {}
    for x in a.cases:
        per_patient.setdefault(x.patient_id, set()).add(x.split)
    assert all(len(s) == 1 for s in per_patient.values())
    assert {x.split for x in a.cases} == {"train", "val", "test"}
    # stratified: each grade appears in test
    assert {x.labels["grade"] for x in a.in_split("test")} == {"LGG", "HGG"}


def test_derive_splits_fractions() -> None:
    out = derive_splits({f"p{i}": "s" for i in range(100)}, seed=0)
    counts = {s: list(out.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 15, "test": 15}


def test_task_selection_and_rano_pairs(tmp_path: Path) -> None:
    write_cohort(
        tmp_path,
        [
            {"case_id": "a0", "patient_id": "p", "t1": "a0_t1.nii.gz", "t2": "a0_t2.nii.gz",
             "flair": "a0_f.nii.gz"},
            {"case_id": "a1", "patient_id": "p", "t1": "a1_t1.nii.gz", "t2": "a1_t2.nii.gz",
             "flair": "a1_f.nii.gz", "rano": "PD", "baseline_case_id": "a0"},
            {"case_id": "b1", "patient_id": "q", "t1": "b1_t1.nii.gz", "t2": "b1_t2.nii.gz",
             "rano": "SD", "baseline_case_id": "a0"},
        ],
    )
    cohort = read_cohort(tmp_path)
    ok, skipped = select_samples("rano", cohort)
    assert [s.case_id for s in ok] == ["a1"]
    assert ok[0].baseline is not None and ok[0].baseline.case_id == "a0"
    reasons = dict(skipped)
    assert reasons["a0"] == "no rano label"
    assert reasons["b1"] == "missing input(s) flair"
    assert any("baseline a0 belongs to patient p, not q" in str(p) for p in cohort.problems)
    assert class_counts(TASKS["rano"], ok) == {"CR": 0, "PR": 0, "SD": 0, "PD": 1}
