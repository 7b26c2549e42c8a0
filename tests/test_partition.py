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


def test_sizes_scheme_scales_a_federations_site_sizes_to_the_cohort(cohort, tmp_path):
    from simulations.partition import read_site_sizes, scaled_sizes

    sizes = tmp_path / "sizes.csv"
    sizes.write_text("site,patients\nbig,500\nmid,100\nsmall,4\n")
    assert read_site_sizes(sizes) == [500, 100, 4]
    assert scaled_sizes([500, 100, 4], 120) == [96, 21, 3]  # 2 each, then 114 pro rata (94.4, 18.9, 0.8)
    part = partition_cohort(cohort, SPEC, 0, f"sizes:{sizes}", seed=1)
    assert [len(s) for s in part.sites] == [96, 21, 3]
    flat = [p for s in part.sites for p in s]
    assert len(set(flat)) == 120
    assert part != partition_cohort(cohort, SPEC, 0, f"sizes:{sizes}", seed=2)
    fets = tmp_path / "partitioning.csv"  # FeTS layout: one row per subject, sizes are row counts
    fets.write_text("Partition_ID,Subject_ID\n" + "".join(f"{1 + (i % 5 == 0)},S{i}\n" for i in range(50)))
    assert read_site_sizes(fets) == [40, 10]
    with pytest.raises(ValueError, match="need 80 eligible patients"):
        scaled_sizes([1] * 40, 60)
    bad = tmp_path / "bad.csv"
    bad.write_text("hospital,n\na,3\n")
    with pytest.raises(ValueError, match="needs columns"):
        partition_cohort(cohort, SPEC, 0, f"sizes:{bad}", 0)


def test_fets_2021_institution_sizes_scale_to_a_small_cohort(cohort):
    from pathlib import Path

    from simulations.partition import read_site_sizes, scaled_sizes

    here = Path(__file__).resolve().parents
    found = [p / "shared/reference/fets/partitioning_1.csv" for p in (here[2], here[3])]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        pytest.skip("shared/reference/fets/partitioning_1.csv (FeTS 2021 institutions) is not next to "
                    "this checkout: it is reference material, not shipped with gliofed")
    sizes = read_site_sizes(path)
    assert len(sizes) == 23 and sizes[0] == 511 and sizes[-1] == 4
    scaled = scaled_sizes(sizes, 120)
    assert sum(scaled) == 120 and min(scaled) == 2 and scaled == sorted(scaled, reverse=True)


def test_scanner_cohort_plan_gives_every_site_the_same_class_mix():
    from simulations.synth.generate import plan_cohort

    plans = plan_cohort(90, 3, ["grading"], seed=0, label_skew=False)
    mix = Counter((p.site, p.kind) for p in plans)
    for kind in ("hgg", "lgg"):
        counts = [mix[(s, kind)] for s in range(3)]
        assert max(counts) - min(counts) <= 1
    skewed = Counter((p.site, p.kind) for p in plan_cohort(90, 3, ["grading"], seed=0))
    assert max(abs(skewed[(s, "hgg")] - skewed[(t, "hgg")]) for s in range(3) for t in range(3)) > 1
