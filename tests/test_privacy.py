"""Patient-level DP with opacus at a site: accounting across rounds, the site's budget, plain keys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from client.privacy import (
    PrivacyBudgetExceeded,
    epsilon_of,
    make_privatizer,
    one_sample_per_patient,
)
from shared.cohort import read_cohort
from shared.config import NodeConfig, RunConfig
from shared.tasks import TASKS, select_samples
from shared.training import TrainConfig, build_task_model, train_epochs
from tests.fl_helpers import write_tiny_cohort


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GLIOFED_PRIVACY_DIR", str(tmp_path / "ledger"))
    site = write_tiny_cohort(tmp_path / "site", n_cases=16)
    samples, _ = select_samples(TASKS["grading"], read_cohort(site), "train")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), batch_size=4,
                      dp_compatible=True, cache_dir=str(tmp_path / "cache"))
    return samples, cfg


def _round(samples, cfg, run, node):
    model = build_task_model(TASKS["grading"], cfg)
    plain_keys = set(model.state_dict())
    priv = make_privatizer(run, node, len(samples))
    res = train_epochs(model, samples, TASKS["grading"], cfg, epochs=1, privatize=priv)
    assert set(model.state_dict()) == plain_keys  # no `_module.` prefixes
    assert math.isfinite(res.loss)
    return priv


def test_epsilon_accumulates_across_rounds_and_budget_is_enforced(setup) -> None:
    samples, cfg = setup
    run = RunConfig.from_flower({"task": "grading", "dp": "opacus", "noise-multiplier": 1.0,
                                 "max-grad-norm": 1.0, "local-epochs": 1, "batch-size": 4})
    node = NodeConfig.from_flower({"data-path": "/x/hosp-a", "max-epsilon": 1000.0}, run)
    e1 = _round(samples, cfg, run, node).epsilon
    e2 = _round(samples, cfg, run, node).epsilon
    assert 0 < e1 < e2  # composed over both rounds
    tight = NodeConfig.from_flower({"data-path": "/x/hosp-a", "max-epsilon": e2 * 1.01}, run)
    with pytest.raises(PrivacyBudgetExceeded, match=r"max-epsilon .* the site declines to train"):
        _round(samples, cfg, run, tight)
    # the refused round was not charged
    assert _round(samples, cfg, run, node).epsilon == pytest.approx(
        epsilon_of([(1.0, 4 / len(samples), math.ceil(len(samples) / 4))] * 3, 1e-5), rel=1e-6)


def test_target_epsilon_sets_the_noise(setup) -> None:
    samples, cfg = setup
    run = RunConfig.from_flower({"task": "grading", "dp": "opacus", "target-epsilon": 5.0,
                                 "num-server-rounds": 2, "batch-size": 4})
    node = NodeConfig.from_flower({"data-path": "/x/hosp-b"}, run)
    p1 = _round(samples, cfg, run, node)
    p2 = _round(samples, cfg, run, node)
    assert p1.noise_multiplier > 0.3
    assert p2.epsilon == pytest.approx(5.0, rel=0.1)  # the planned rounds spend the target


def test_one_sample_per_patient() -> None:
    class S:
        def __init__(self, pid, cid):
            self.case = type("C", (), {"patient_id": pid, "case_id": cid})()

    out = one_sample_per_patient([S("p", "a"), S("q", "b"), S("p", "c")])
    assert sorted(s.case.case_id for s in out) == ["b", "c"]


@pytest.mark.slow
def test_every_task_network_trains_under_opacus(tmp_path: Path) -> None:
    from opacus import PrivacyEngine

    from shared.models import build_model

    for task in ("grading", "typing", "rano", "recurrence"):
        spec = TASKS[task]
        cfg = TrainConfig(task=task).resolved()
        ch = spec.in_channels
        model = build_model(cfg.network, ch, spec.num_classes, dp_compatible=True,
                            seg_classes=4 if cfg.network == "unet_encoder" else 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        data = torch.utils.data.TensorDataset(torch.randn(4, ch, 32, 32, 32),
                                              torch.randint(0, spec.num_classes, (4,)))
        loader = torch.utils.data.DataLoader(data, batch_size=2)
        m, o, dl = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=1.0, max_grad_norm=1.0,
                                               poisson_sampling=False)
        x, y = next(iter(dl))
        if hasattr(model, "return_seg"):
            model.return_seg = True  # the joint segmentation head trains too
        out = m(x)
        loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        if isinstance(out, tuple):
            loss = loss + out[1].mean()
        loss.backward()
        o.step()
        assert all(not k.startswith("_module.") for k in model.state_dict()), task


def _train_message(run: RunConfig):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from shared.learning import learning_core, train_config_for

    model = learning_core().build_model(TASKS["grading"], train_config_for(run, device="cpu"))
    arrays = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    return RecordDict({"arrays": arrays, "config": ConfigRecord({})})


@pytest.fixture()
def dp_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GLIOFED_PRIVACY_DIR", str(tmp_path / "ledger"))
    site = write_tiny_cohort(tmp_path / "hosp-dp", n_cases=16)
    run = RunConfig.from_flower({"task": "grading", "dp": "opacus", "noise-multiplier": 1.0,
                                 "local-epochs": 1, "batch-size": 4, "network": "small_cnn",
                                 "input-size": 16, "device": "cpu",
                                 "cache-dir": str(tmp_path / "cache")})
    return site, run


def test_the_ledger_charges_every_epoch_trained(dp_site) -> None:
    """3 local epochs are trained: all 3 epochs' DP steps are charged, counted as they happen."""
    from client.privacy import Ledger, ledger_path
    from client.site import train_site

    site, run = dp_site
    run = run.replace(local_epochs=3)
    node = NodeConfig.from_flower({"data-path": str(site)}, run)
    reply = train_site(_train_message(run), run, node)
    entries = Ledger(ledger_path(node.site_id)).entries()
    per_epoch = math.ceil(12 / 4)  # 12 training patients, batches of 4
    assert [(e["steps"], e["state"]) for e in entries] == [(3 * per_epoch, "charged")]
    expected = epsilon_of([(1.0, 1 / per_epoch, 3 * per_epoch)], 1e-5)
    assert reply["metrics"]["dp-epsilon"] == pytest.approx(expected, rel=1e-9)
    assert reply["metrics"]["dp-steps"] == 3 * per_epoch
    assert expected > epsilon_of([(1.0, 1 / per_epoch, per_epoch)], 1e-5) * 1.5  # not 1 epoch's


def test_a_request_past_max_epsilon_is_refused_before_training(dp_site) -> None:
    from client.privacy import Ledger, ledger_path
    from client.site import safe_reason, train_site

    site, run = dp_site
    per_epoch = 3
    one_epoch = epsilon_of([(1.0, 1 / per_epoch, per_epoch)], 1e-5)
    node = NodeConfig.from_flower({"data-path": str(site), "max-epsilon": one_epoch * 1.2}, run)
    with pytest.raises(PrivacyBudgetExceeded, match="9 DP steps would bring site hosp-dp") as err:
        train_site(_train_message(run), run.replace(local_epochs=3), node)
    assert safe_reason(err.value) == "privacy-budget"
    assert Ledger(ledger_path(node.site_id)).entries() == []  # nothing trained, nothing charged
    train_site(_train_message(run), run, node)  # 1 epoch is within the budget: trains
    assert [e["steps"] for e in Ledger(ledger_path(node.site_id)).entries()] == [per_epoch]


def _charge(path: str, n: int) -> None:
    from client.privacy import Ledger

    ledger = Ledger(path)
    for _ in range(n):
        entry, _eps = ledger.reserve(1.0, 0.25, 4, 1e-5)
        ledger.settle(entry, 3, 1e-5)


def test_two_processes_charging_one_ledger_keep_every_entry(tmp_path: Path) -> None:
    import multiprocessing

    from client.privacy import Ledger

    path = str(tmp_path / "site.json")
    ctx = multiprocessing.get_context("fork")  # the children only read and write the ledger
    procs = [ctx.Process(target=_charge, args=(path, 8)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = Ledger(path).entries()
    assert len(entries) == 16 and all(e["steps"] == 3 and e["state"] == "charged" for e in entries)
    assert len({e["id"] for e in entries}) == 16
    assert not [f for f in tmp_path.iterdir() if f.suffix == ".tmp"]  # no temp file left behind


def test_a_step_beyond_the_reservation_is_refused(setup) -> None:
    """Training more epochs than the privatizer was asked to account for stops, it is not free."""
    samples, cfg = setup
    run = RunConfig.from_flower({"task": "grading", "dp": "opacus", "batch-size": 4})
    node = NodeConfig.from_flower({"data-path": "/x/hosp-c"}, run)
    model = build_task_model(TASKS["grading"], cfg)
    priv = make_privatizer(run, node, len(samples), epochs=1)
    with pytest.raises(PrivacyBudgetExceeded, match="more than the 3 DP steps reserved"):
        train_epochs(model, samples, TASKS["grading"], cfg, epochs=2, privatize=priv)
    assert priv.settle() == pytest.approx(epsilon_of([(1.0, 1 / 3, 3)], 1e-5))
