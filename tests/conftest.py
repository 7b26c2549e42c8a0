"""Shared fixtures; tiny NIfTI written on the fly, fixed seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


RECORDED_SITES = {101: "hosp-a", 202: "hosp-b"}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A small finished deployed-style run folder, recorded by the real ServerApp loop (``serve``)
    with the real ClientApp in-process: sites hosp-a and hosp-b train 2 rounds; node 303 points at a
    missing data folder, so it fails its eligibility query (a failed site with a reason)."""
    from fl_helpers import LocalGrid, run_config, write_tiny_cohort

    from server.app import serve

    root = tmp_path_factory.mktemp("recorded")
    nodes = {}
    for i, (node, site) in enumerate(RECORDED_SITES.items()):
        write_tiny_cohort(root / "data" / site, n_cases=16, seed=i, site=site)
        nodes[node] = {"data-path": str(root / "data" / site), "site-id": site}
    nodes[303] = {"data-path": str(root / "data" / "missing"), "site-id": "hosp-c"}
    cfg = run_config(root / "run", None, **{"num-server-rounds": 2})
    serve(LocalGrid(nodes, cfg), cfg)
    return root / "run"
