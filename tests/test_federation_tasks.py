"""Every imaging task runs through the real round loop and ClientApp (in-process grid, 2 rounds)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fl_helpers import LocalGrid, run_config

from server.rounds import run_rounds
from shared.cohort import read_cohort
from shared.config import RunConfig
from shared.contract import TRAIN_LOSS
from shared.tasks import get_task
from simulations.partition import partition_cohort, write_partition


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    from simulations.synth import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), cases=48, sites=2, shape=32, seed=3,
                           workers=1, progress=False,
                           tasks=("grading", "typing", "rano", "recurrence"))


@pytest.mark.parametrize("task", ["typing", "rano", "recurrence", "grading"])
def test_task_runs_federated(task: str, cohort_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cohort = read_cohort(cohort_dir)
    part = partition_cohort(cohort, get_task(task), 2, "iid", seed=0)
    write_partition(cohort, part, tmp_path / "sites")
    cfg = run_config(tmp_path / "run", tmp_path / "sites", task=task,
                     **{"num-server-rounds": 2, "fraction-evaluate": 1.0})
    grid = LocalGrid({100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}, cfg)
    result = run_rounds(grid, RunConfig.from_flower(cfg))
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert all(r["replied"] == 2 for r in result.rounds)
    # pooled metrics (summed confusion matrices) = the global model evaluated on the union of the
    # sites' test splits in one place
    from shared.learning import train_config_for
    from shared.tasks import select_samples
    from shared.training import build_task_model, evaluate_model

    run, spec = RunConfig.from_flower(cfg), get_task(task)
    test = [s for i in range(2) for s in select_samples(
        spec, read_cohort(tmp_path / "sites" / f"site-{i}", seed=run.seed), split="test")[0]]
    model = build_task_model(spec, train_config_for(run))
    model.load_state_dict(result.arrays.to_torch_state_dict())
    ev = evaluate_model(model, test, spec, train_config_for(run))
    pooled = result.rounds[-1]["pooled"]
    assert pooled["num_examples"] == len(test) > 0
    assert pooled["balanced_accuracy"] == pytest.approx(ev.metrics["balanced_accuracy"])
    assert math.isfinite(result.rounds[-1]["train"][TRAIN_LOSS])
