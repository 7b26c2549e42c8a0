"""Importers on tiny fake trees with the exact file names of each public layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from gliofed.cli import app
from shared.cohort import read_cohort
from shared.importers import ImportErrorForUser, run_importer
from tests.nifti_helpers import seg_array, write_nii


def _brats_case(folder: Path, cid: str, seqs, sep="_", ext=".nii.gz", seg_name=None, labels=(1, 2, 4)):
    for s in seqs:
        write_nii(folder / f"{cid}{sep}{s}{ext}")
    write_nii(folder / (seg_name or f"{cid}{sep}seg{ext}"), seg_array(labels=labels))


def test_brats2020_grades_nii_and_case355(tmp_path: Path) -> None:
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    _brats_case(root / "BraTS20_Training_001", "BraTS20_Training_001", ("flair", "t1", "t1ce", "t2"))
    _brats_case(root / "BraTS20_Training_002", "BraTS20_Training_002", ("flair", "t1", "t1ce", "t2"),
                ext=".nii")
    _brats_case(root / "BraTS20_Training_355", "BraTS20_Training_355", ("flair", "t1", "t1ce", "t2"),
                ext=".nii", seg_name="W39_1998.09.19_Segm.nii")
    (root / "name_mapping.csv").write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,"
        "BraTS_2019_subject_ID,BraTS_2020_subject_ID\n"
        "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
        "LGG,a,b,NA,c,BraTS20_Training_002\nLGG,a,b,NA,c,BraTS20_Training_355\n")
    out = tmp_path / "site"
    res = run_importer("brats2020", root, out)
    assert res.n_cases == 3 and res.label_counts["grade"] == {"HGG": 1, "LGG": 2}
    c = read_cohort(out).by_id()
    assert c["BraTS20_Training_355"].images["seg"].name == "W39_1998.09.19_Segm.nii"
    assert c["BraTS20_Training_002"].images["t1ce"].name == "BraTS20_Training_002_t1ce.nii"
    assert c["BraTS20_Training_001"].images["flair"].is_file()
    assert not list(out.glob("**/*.nii*"))  # nothing copied


def test_brats2020_without_name_mapping_is_a_clear_error(tmp_path: Path) -> None:
    _brats_case(tmp_path / "BraTS20_Training_001", "BraTS20_Training_001", ("flair", "t1", "t1ce", "t2"))
    with pytest.raises(ImportErrorForUser, match="name_mapping.csv not found"):
        run_importer("brats2020", tmp_path, tmp_path / "site")


def test_brats2021_and_missing_sequence_skipped(tmp_path: Path) -> None:
    _brats_case(tmp_path / "BraTS2021_00000", "BraTS2021_00000", ("flair", "t1", "t1ce", "t2"))
    _brats_case(tmp_path / "BraTS2021_00002", "BraTS2021_00002", ("flair", "t1", "t2"))
    _brats_case(tmp_path / "copy" / "BraTS2021_00000", "BraTS2021_00000", ("flair", "t1", "t1ce", "t2"))
    res = run_importer("brats2021", tmp_path, tmp_path / "site")
    assert res.n_cases == 1
    assert res.skipped == [("BraTS2021_00002", f"missing t1ce in {tmp_path}/BraTS2021_00002")]
    dup = f"duplicate folder {tmp_path}/copy/BraTS2021_00000 ignored (kept {tmp_path}/BraTS2021_00000)"
    assert res.notes == [("BraTS2021_00000", dup)]


def test_brats2023_names_and_label_3_to_4(tmp_path: Path) -> None:
    cid = "BraTS-GLI-00005-001"
    _brats_case(tmp_path / cid, cid, ("t1c", "t1n", "t2f", "t2w"), sep="-", labels=(1, 2, 3))
    out = tmp_path / "site"
    run_importer("brats2023", tmp_path, out)
    case = read_cohort(out).cases[0]
    assert case.patient_id == "BraTS-GLI-00005" and case.timepoint == "001"
    assert case.images["t1ce"].name == f"{cid}-t1c.nii.gz" and case.images["flair"].name.endswith("t2f.nii.gz")
    seg = np.asarray(nib.load(case.images["seg"]).dataobj)
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    assert case.images["seg"].parent == (out / "converted").resolve()


def test_fets_partitions_to_sites(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        cid = f"FeTS2022_{i:03d}"
        _brats_case(tmp_path / "data" / cid, cid, ("flair", "t1", "t1ce", "t2"))
    part = tmp_path / "partitioning_1.csv"
    part.write_text("Subject_ID,Partition_ID\nFeTS2022_001,01\nFeTS2022_002,02\n")
    res = run_importer("fets", tmp_path / "data", tmp_path / "site", partitions=part)
    sites = {c.case_id: c.site for c in read_cohort(tmp_path / "site").cases}
    assert sites == {"FeTS2022_001": "fets-01", "FeTS2022_002": "fets-02"}
    assert res.skipped == [("FeTS2022_003", "not in partitioning_1.csv")]


def test_lumiere_sessions_pairs_and_ratings(tmp_path: Path) -> None:
    img = tmp_path / "Imaging" / "Patient-001"
    for week in ("week-000-1", "week-000-2", "week-012", "week-044"):
        for s in ("CT1", "T1", "T2", "FLAIR"):
            write_nii(img / week / f"{s}.nii.gz")
    atlas = img / "week-044" / "DeepBraTumIA-segmentation" / "atlas"
    for s in ("ct1", "t1", "t2", "flair"):
        write_nii(atlas / "skull_strip" / f"{s}_skull_strip.nii.gz")
    write_nii(atlas / "segmentation" / "seg_mask.nii.gz", seg_array(labels=(1, 2, 3)))
    for s in ("CT1", "T1", "T2", "FLAIR"):  # week-012: HD-GLIO-AUTO's co-registered set, no DeepBraTumIA
        write_nii(img / "week-012" / "HD-GLIO-AUTO-segmentation" / "registered" / f"{s}_r2s_bet_reg.nii.gz")
    long = ("Rating (according to RANO, PD: Progressive disease, SD: Stable disease, PR: Partial "
            "response, CR: Complete response, Pre-Op: Pre-Operative, Post-Op: Post-Operative)")
    (tmp_path / "LUMIERE-ExpertRating-v202211.csv").write_text(
        f'Patient,Date,LessThan3Months,NonMeasurableLesions,"{long}",Rating rationale\n'
        "Patient-001,week-000-1,,,Pre-Op,\nPatient-001,week-000-2,,,Post-Op,\n"
        "Patient-001,week-012,x,,Post-Op/PD,\nPatient-001,week-044,,,SD ,L\n")
    out = tmp_path / "site"
    res = run_importer("lumiere", tmp_path, out)
    c = read_cohort(out).by_id()
    assert res.n_cases == 4
    assert c["Patient-001_week-012"].labels["rano"] == "PD"
    assert c["Patient-001_week-012"].baseline_case_id == "Patient-001_week-000-2"
    assert c["Patient-001_week-044"].labels["rano"] == "SD"
    assert c["Patient-001_week-044"].baseline_case_id == "Patient-001_week-012"
    assert "rano" not in c["Patient-001_week-000-2"].labels  # Post-Op dropped
    assert ("Patient-001_week-000-1", "rating 'Pre-Op' is not a response class (session kept)") in res.notes
    assert res.skipped == []
    assert c["Patient-001_week-044"].images["t1ce"].name == "ct1_skull_strip.nii.gz"
    assert c["Patient-001_week-012"].images["flair"].name == "FLAIR_r2s_bet_reg.nii.gz"
    assert "seg" not in c["Patient-001_week-012"].images
    assert c["Patient-001_week-000-1"].images["t2"].name == "T2.nii.gz"  # native only
    seg = np.asarray(nib.load(c["Patient-001_week-044"].images["seg"]).dataobj)
    assert set(np.unique(seg)) == {0, 1, 2, 4}  # 1 enh -> 4, 2 nec -> 1, 3 edema -> 2
    assert seg[2, 3, 3] == 4 and seg[3, 3, 3] == 1 and seg[4, 3, 3] == 2


def test_ucsf_pdgm_zero_padding_and_who_grade(tmp_path: Path) -> None:
    root = tmp_path / "UCSF-PDGM-v5"
    for pid, fu in (("0004", ""), ("0005", ""), ("0429", "_FU003d")):
        stem = f"UCSF-PDGM-{pid}{fu}"
        for s in ("T1", "T1c", "T2", "FLAIR", "tumor_segmentation", "T1c_bias"):
            write_nii(root / f"{stem}_nifti" / f"{stem}_{s}.nii.gz")
    (tmp_path / "UCSF-PDGM-metadata_v5.csv").write_text(
        "ID,Sex,Age at MRI,WHO CNS Grade\nUCSF-PDGM-004,M,50,2\nUCSF-PDGM-005,F,60,4\n"
        "UCSF-PDGM-429,F,61,3\n")
    out = tmp_path / "site"
    run_importer("ucsf-pdgm", tmp_path, out)
    c = read_cohort(out).by_id()
    assert c["UCSF-PDGM-0004"].labels["grade"] == "LGG"
    assert c["UCSF-PDGM-0005"].labels["grade"] == "HGG"
    assert c["UCSF-PDGM-0429_FU003d"].patient_id == "UCSF-PDGM-0429"
    assert c["UCSF-PDGM-0429_FU003d"].labels["grade"] == "LGG"
    assert c["UCSF-PDGM-0004"].images["t1ce"].name == "UCSF-PDGM-0004_T1c.nii.gz"


def test_cli_import_reports_and_errors(tmp_path: Path) -> None:
    _brats_case(tmp_path / "BraTS2021_00000", "BraTS2021_00000", ("flair", "t1", "t1ce", "t2"))
    r = CliRunner().invoke(app, ["import", "brats2021", str(tmp_path), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0 and "1 session(s) written" in r.output
    r = CliRunner().invoke(app, ["import", "ucsf-pdgm", str(tmp_path), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "UCSF-PDGM-metadata_v*.csv not found" in r.output


def test_lumiere_rating_values_and_column_by_position(tmp_path: Path) -> None:
    from shared.importers.lumiere import rano_label, read_ratings

    assert [rano_label(v) for v in ("PD", " SD ", "Post-Op/PD", "Post-Op / CR", "Pre-Op", "Post-Op", "")] == [
        "PD", "SD", "PD", "CR", None, None, None]
    f = tmp_path / "ratings.csv"  # a header renamed by hand: the 5th column is still the rating
    f.write_text("Patient,Timepoint,a,b,RANO,why\nPatient-002,week-010,,,PR,\n")
    assert read_ratings(f) == {("Patient-002", "week-010"): "PR"}


def test_cli_lumiere_summary_lists_notes_and_counts(tmp_path: Path) -> None:
    img = tmp_path / "Imaging" / "Patient-007"
    for week in ("week-000", "week-020"):
        for s in ("CT1", "T1", "T2", "FLAIR"):
            write_nii(img / week / f"{s}.nii.gz")
    (tmp_path / "LUMIERE-ExpertRating-v202211.csv").write_text(
        "Patient,Date,LessThan3Months,NonMeasurableLesions,Rating (according to RANO),Rationale\n"
        "Patient-007,week-000,,,Post-Op,\nPatient-007,week-020,,,PD,\n")
    r = CliRunner().invoke(app, ["import", "lumiere", str(tmp_path), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "note Patient-007_week-000: rating 'Post-Op' is not a response class (session kept)" in r.output
    assert "lumiere: 2 session(s) written" in r.output and "; 0 skipped" in r.output
    assert "rano: PD 1" in r.output


def test_layout_csv_problems_are_one_line_errors(tmp_path: Path) -> None:
    _brats_case(tmp_path / "BraTS20_Training_001", "BraTS20_Training_001", ("flair", "t1", "t1ce", "t2"))
    (tmp_path / "name_mapping.csv").write_text("Grade,ID\nHGG,BraTS20_Training_001\n")
    with pytest.raises(ImportErrorForUser, match=r"name_mapping.csv: header lacks Grade and BraTS_2020_subject_ID"):
        run_importer("brats2020", tmp_path, tmp_path / "site")
    _brats_case(tmp_path / "FeTS2022_001", "FeTS2022_001", ("flair", "t1", "t1ce", "t2"))
    part = tmp_path / "partitioning_1.csv"
    part.write_text("Subject_ID,Partition_ID\nFeTS2022_001,01\nFeTS2022_002,x\n")
    with pytest.raises(ImportErrorForUser, match=r"partitioning_1.csv:3: Partition_ID 'x' is not a number"):
        run_importer("fets", tmp_path, tmp_path / "site", partitions=part)
    (tmp_path / "UCSF-PDGM-metadata_v5.csv").write_text("Patient,Grade\n")
    with pytest.raises(ImportErrorForUser, match=r"metadata_v5.csv: header lacks ID and WHO CNS Grade"):
        run_importer("ucsf-pdgm", tmp_path, tmp_path / "site")
    with pytest.raises(ImportErrorForUser, match=r"unknown layout 'brats2019'"):
        run_importer("brats2019", tmp_path, tmp_path / "site")
