"""Partitions: patient-level, disjoint, covering, deterministic, and the scheme-specific shapes."""

from __future__ import annotations

from collections import Counter

import pytest

from shared.cohort import read_cohort, write_cohort
from shared.tasks import get_task
from simulations.partition import class_table, partition_cohort, write_partition


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """120 patients (every 3rd has two sessions), grade skewed 2:1, three scanner sites; no images."""
    root = tmp_path_factory.mktemp("cohort")
    rows = []
    for p in range(120):
        for t in range(2 if p % 3 == 0 else 1):
            rows.append({"case_id": f"c{p:03d}-{t}", "patient_id": f"p{p:03d}",
                         "grade": "HGG" if p % 3 else "LGG", "site": f"scanner{p % 3}",
                         **{s: f"img/{p}_{t}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")}})
    write_cohort(root, rows)
    return read_cohort(root)


SPEC = get_task("grading")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "quantity:1.0", "site"])
def test_partitions_are_disjoint_cover_all_patients_and_are_deterministic(cohort, scheme):
    part = partition_cohort(cohort, SPEC, 5, scheme, seed=3)
    flat = [p for site in part.sites for p in site]
    assert len(flat) == len(set(flat)) == 120
    assert part == partition_cohort(cohort, SPEC, 5, scheme, seed=3)
    assert all(len(site) >= 2 for site in part.sites)


def test_seed_changes_the_split_and_iid_keeps_class_ratios(cohort):
    assert partition_cohort(cohort, SPEC, 4, "iid", 0) != partition_cohort(cohort, SPEC, 4, "iid", 1)
    for site in partition_cohort(cohort, SPEC, 4, "iid", 0).sites:
        hgg = sum(1 for p in site if int(p[1:]) % 3)
        assert abs(hgg / len(site) - 2 / 3) < 0.1


def test_dirichlet_small_alpha_skews_labels_more_than_iid(cohort):
    def spread(part):
        fr = [sum(1 for p in s if int(p[1:]) % 3) / len(s) for s in part.sites]
        return max(fr) - min(fr)

    assert spread(partition_cohort(cohort, SPEC, 5, "dirichlet:0.3", 0)) > spread(
        partition_cohort(cohort, SPEC, 5, "iid", 0)) + 0.2


def test_written_site_folders_keep_patients_whole_and_splits_unchanged(cohort, tmp_path):
    part = partition_cohort(cohort, SPEC, 3, "dirichlet:0.5", 0)
    folders = write_partition(cohort, part, tmp_path / "sites")
    source = {c.case_id: c for c in cohort.cases}
    seen = Counter()
    for i, folder in enumerate(folders):
        site = read_cohort(folder)
        assert not site.errors
        assert {c.patient_id for c in site.cases} == set(part.sites[i])
        for c in site.cases:
            seen[c.case_id] += 1
            assert c.split == source[c.case_id].split
            assert c.images["t1"] == source[c.case_id].images["t1"]  # points at the source image
    assert sum(seen.values()) == len(cohort.cases) and max(seen.values()) == 1
    table = class_table(cohort, SPEC, part)
    assert sum(r["HGG"] + r["LGG"] for r in table) == len(cohort.cases)


def test_site_and_fets_schemes_follow_the_given_grouping(cohort, tmp_path):
    part = partition_cohort(cohort, SPEC, 0, "site", 0)
    assert part.names == ("scanner0", "scanner1", "scanner2")
    assert all(int(p[1:]) % 3 == 0 for p in part.sites[0])
    csv = tmp_path / "partitioning_1.csv"
    csv.write_text("Partition_ID,Subject_ID\n" + "".join(
        f"{1 + (p % 2)},p{p:03d}\n" for p in range(100)))
    fets = partition_cohort(cohort, SPEC, 0, f"fets:{csv}", 0)
    assert fets.names == ("fets-1", "fets-2") and len(fets.sites[0]) == 50


def test_bad_schemes_give_one_line_errors(cohort, tmp_path):
    with pytest.raises(ValueError, match="unknown partition 'zipf'"):
        partition_cohort(cohort, SPEC, 3, "zipf", 0)
    with pytest.raises(ValueError, match="dirichlet:x: ALPHA must be a number"):
        partition_cohort(cohort, SPEC, 3, "dirichlet:x", 0)
    with pytest.raises(ValueError, match="cannot split 120 eligible patients into 500 sites"):
        partition_cohort(cohort, SPEC, 500, "iid", 0)
    with pytest.raises(ValueError, match="FeTS partition file not found"):
        partition_cohort(cohort, SPEC, 3, f"fets:{tmp_path / 'nope.csv'}", 0)
