"""Server optimisers (FedAdam, FedYogi, FedAvgM) step the trainable weights only; the BatchNorm running
statistics of the global model are the sites' example-weighted mean, as FedAvg's are.

Two rounds in-process (``fl_helpers.LocalGrid``: the real ClientApp) on tiny cohorts with a BatchNorm
network. Before the fix FedAdam moved each running variance by about its eta a round whatever the
sites measured, and FedAvgM's momentum drove a shrinking variance below zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_helpers import run_config

from server.fedbn import buffer_keys_for
from server.rounds import run_rounds
from shared.config import RunConfig

SITES = (2, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("strategy,extra", [("fedadam", {"server-lr": 0.01}),
                                            ("fedavgm", {"server-lr": 1.0, "server-momentum": 0.9})])
def test_server_optimisers_average_the_running_statistics_and_step_the_weights(
        tmp_path, sites_root, make_grid, strategy, extra):
    cfg = run_config(tmp_path / "run", sites_root, network="unet_encoder", strategy=strategy, **extra)
    run = RunConfig.from_flower(cfg)
    buffers = buffer_keys_for(run)
    assert any(k.endswith("running_var") for k in buffers)
    grid = make_grid(cfg, n=2)
    result = run_rounds(grid, run)
    final = result.arrays.to_torch_state_dict()
    last = [m for m in grid.replies if m.metadata.message_type == "train"][-2:]
    assert not any(m.has_error() for m in last)
    n = [float(m.content["metrics"]["num-examples"]) for m in last]

    def mean(k):
        parts = [torch.from_numpy(m.content["arrays"][k].numpy()).double() for m in last]
        return sum(w * p for w, p in zip(n, parts)) / sum(n)

    for k in buffers:
        if k.endswith("num_batches_tracked"):
            assert final[k].dtype == torch.int64 and final[k] == torch.round(mean(k)).long()
        else:
            torch.testing.assert_close(final[k].double(), mean(k), rtol=1e-5, atol=1e-6)
            assert not k.endswith("running_var") or bool((final[k] > 0).all())
    stepped = [k for k in set(final) - buffers
               if not np.allclose(final[k].double().numpy(), mean(k).numpy(), atol=1e-6)]
    assert stepped, "the server optimiser should move the weights off the plain average"
    assert all(torch.isfinite(v.double()).all() for v in final.values())


def test_central_dp_keeps_the_running_statistics_inside_the_noised_aggregate():
    """Under central DP an exact mean of the sites' statistics would bypass the noise: left alone."""
    from flwr.app import Array, ArrayRecord

    from server.running_stats import averaged_running_stats

    run = RunConfig(strategy="fedadam", dp="central", network="unet_encoder")
    aggregate = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    assert averaged_running_stats(aggregate, [object()], run, None) is aggregate
