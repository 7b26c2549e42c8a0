"""Shared fixtures; tiny NIfTI written on the fly, fixed seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def sites_root(request, tmp_path_factory):
    """Folders ``site-0 .. site-{N-1}`` of tiny learnable cohorts (``fl_helpers.write_tiny_cohort``).

    A test module sets ``SITES = (number of sites, cases per site)``; the default is (3, 16).
    """
    from fl_helpers import write_tiny_cohort

    n_sites, n_cases = getattr(request.module, "SITES", (3, 16))
    root = tmp_path_factory.mktemp("sites")
    for i in range(n_sites):
        write_tiny_cohort(root / f"site-{i}", n_cases=n_cases, seed=i, site=f"S{i}")
    return root


@pytest.fixture
def one_thread():
    """Torch on one thread (federation tests run several sites in one process on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_grid():
    """``make_grid(cfg, n=3, extra=None, cls=LocalGrid)``: an in-process Grid of ``n`` simulated
    sites (partition ids 0..n-1 as nodes 100..) plus ``extra`` {node id: node config}."""
    from fl_helpers import LocalGrid

    def build(cfg: dict, n: int = 3, extra: dict | None = None, cls: type = LocalGrid):
        nodes = {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}
        nodes.update(extra or {})
        return cls(nodes, cfg)

    return build

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
