"""DP that keeps the signal: last-block DP fine-tuning, GroupNorm + weight standardisation, virtual
batches, and a DP federation started from a pretrained model (init-model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from client.privacy import Ledger, epsilon_of, ledger_path
from shared.config import NodeConfig, RunConfig
from shared.tasks import TASKS
from tests.fl_helpers import write_tiny_cohort


@pytest.fixture()
def dp_hosp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread):
    """A 16-case site (12 training patients) and a DP run of small_cnn at 16^3 on the CPU."""
    monkeypatch.setenv("GLIOFED_PRIVACY_DIR", str(tmp_path / "ledger"))
    site = write_tiny_cohort(tmp_path / "hosp-ft", n_cases=16)
    run = RunConfig.from_flower({"task": "grading", "dp": "opacus", "noise-multiplier": 1.0,
                                 "local-epochs": 1, "batch-size": 4, "network": "small_cnn",
                                 "input-size": 16, "device": "cpu", "lr": 0.01,
                                 "cache-dir": str(tmp_path / "cache")})
    return site, run


def _message(run: RunConfig, weights: dict | None = None):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from shared.learning import learning_core, train_config_for

    if weights is None:
        model = learning_core().build_model(TASKS["grading"], train_config_for(run, device="cpu"))
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord({})}), weights


def test_last_block_dp_round_trains_only_the_last_blocks_and_is_charged(dp_hosp) -> None:
    """dp-train-layers = last:2: the backbone comes back bit-identical, the last two blocks moved, and
    the ledger charges the same steps at the same noise as a whole-model DP round."""
    from client.site import train_site

    site, run = dp_hosp
    run = run.replace(dp_train_layers="last:2")
    node = NodeConfig.from_flower({"data-path": str(site)}, run)
    msg, sent = _message(run)
    got = train_site(msg, run, node)["arrays"].to_torch_state_dict()
    trained = {"features.22.weight", "features.22.bias", "fc.weight", "fc.bias"}
    for key, before in sent.items():
        if key in trained:
            assert not torch.equal(got[key], before), f"{key} was to be trained"
        else:
            assert torch.equal(got[key], before), f"{key} was to stay frozen"
    entries = Ledger(ledger_path(node.site_id)).entries()
    per_epoch = math.ceil(12 / 4)
    assert [(e["steps"], e["state"], e["noise"]) for e in entries] == [(per_epoch, "charged", 1.0)]
    assert Ledger(ledger_path(node.site_id)).epsilon(1e-5) == pytest.approx(
        epsilon_of([(1.0, 1 / per_epoch, per_epoch)], 1e-5), rel=1e-9)


def test_dp_train_layers_selects_by_prefix_and_refuses_what_matches_nothing() -> None:
    from shared.models import build_model
    from shared.training.dp_layers import blocks, freeze_for_dp

    model = build_model("resnet10_gnws", 4, 2)
    assert blocks(model)[-2:] == ["layer4.0", "fc"]
    trained = freeze_for_dp(model, "layer4,fc")
    assert trained and all(n.startswith(("layer4.", "fc.")) for n in trained)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "conv1.weight" in frozen and "layer3.0.conv1.weight" in frozen
    assert freeze_for_dp(model, "") == [n for n, _ in model.named_parameters()]  # "" = everything
    with pytest.raises(ValueError, match=r"no parameter .* starts with \['layer9'\]; its blocks are"):
        freeze_for_dp(model, "layer9")
    with pytest.raises(ValueError, match=r"the network has 7 blocks"):
        freeze_for_dp(model, "last:8")
    with pytest.raises(ValueError, match='dp-train-layers applies to DP-SGD at the sites; set dp = '
                                         '"opacus"'):
        RunConfig(dp_train_layers="last:1")
    with pytest.raises(ValueError, match="dp-logical-batch=2 is smaller than batch-size=8"):
        RunConfig(dp="opacus", dp_logical_batch=2, batch_size=8)


def test_weight_standardised_groupnorm_network_trains_under_opacus_with_exact_per_sample_grads(
        one_thread) -> None:
    """small_cnn_gnws: no BatchNorm, standardised kernels, the base network's keys; opacus' per-sample
    gradients of its WSConv3d layers (gliofed's rule through the standardisation) equal each sample's
    own gradient."""
    from opacus import GradSampleModule

    from shared.models import build_model
    from shared.models_gn import WSConv3d, assert_dp_trainable
    from shared.training.dp_layers import register_ws_grad_sampler, ws_conv_grad_sample

    register_ws_grad_sampler()
    assert GradSampleModule.GRAD_SAMPLERS[WSConv3d] is ws_conv_grad_sample

    torch.manual_seed(0)
    model = build_model("small_cnn_gnws", 2, 2)
    assert_dp_trainable(model)
    assert set(model.state_dict()) == set(build_model("small_cnn", 2, 2).state_dict())
    conv = next(m for m in model.modules() if isinstance(m, WSConv3d))
    assert sum(isinstance(m, WSConv3d) for m in model.modules()) == 8  # every convolution
    w = conv.standardised().reshape(conv.out_channels, -1)
    assert torch.allclose(w.mean(1), torch.zeros(conv.out_channels), atol=1e-5)
    assert torch.allclose(w.var(1, unbiased=False), torch.ones(conv.out_channels), atol=5e-3)
    x, y = torch.randn(3, 2, 8, 8, 8), torch.tensor([0, 1, 1])
    alone = build_model("small_cnn_gnws", 2, 2)
    alone.load_state_dict(model.state_dict())
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(3):
        alone.zero_grad()
        torch.nn.functional.cross_entropy(alone(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for name, p in alone.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4), (name, i)


def test_a_gnws_model_round_trips_through_a_bundle_without_gliofed(tmp_path: Path, monkeypatch) -> None:
    """The exported bundle carries models_gn.py: its scripts build the *_gnws network on their own."""
    import importlib
    import sys

    from shared.training import TrainConfig, build_task_model
    from shared.training.bundle import export_bundle

    cfg = TrainConfig(task="grading", network="small_cnn_gnws", input_size=(16, 16, 16)).resolved()
    model = build_task_model(TASKS["grading"], cfg)
    out = export_bundle(model, TASKS["grading"], cfg, tmp_path / "b", {"mode": "test"}, None)
    monkeypatch.syspath_prepend(str(out))
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        monkeypatch.delitem(sys.modules, name)
    built = importlib.import_module("scripts.models").build_model("small_cnn_gnws", 4, 2)
    built.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 4, 16, 16, 16)
    assert torch.allclose(built.eval()(x), model.eval()(x), atol=1e-6)


def test_virtual_batches_take_one_noisy_step_per_logical_batch(one_thread) -> None:
    """A logical batch of 8 cut into physical batches of 2 gives the same DP step as the batch of 8
    at once (no noise, so the steps are comparable); the optimiser steps once."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from shared.training.dp_layers import LogicalBatches

    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
    results, steps = [], []
    for physical in (8, 2):
        torch.manual_seed(1)
        net = torch.nn.Linear(5, 2)
        gsm = GradSampleModule(net)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0,
                          max_grad_norm=0.5, expected_batch_size=8)
        taken = []
        opt.attach_step_hook(lambda o, taken=taken: taken.append(1))
        seen = []
        for batch in LogicalBatches([{"x": x, "y": y}], physical, opt):
            seen.append(len(batch["y"]))
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(gsm(batch["x"]), batch["y"]).backward()
            opt.step()
        assert seen == [physical] * (8 // physical)
        results.append(net.weight.detach().clone())
        steps.append(len(taken))
    assert steps == [1, 1]
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_dp_logical_batch_is_accounted_at_the_logical_rate(dp_hosp) -> None:
    """dp-logical-batch = 8 with batch-size 2: the ledger charges ceil(12 / 8) = 2 steps per epoch at
    sample rate 1/2, and no forward pass sees more than 2 patients."""
    from client.site import train_site

    site, run = dp_hosp
    run = run.replace(batch_size=2, dp_logical_batch=8)
    node = NodeConfig.from_flower({"data-path": str(site)}, run)
    widest = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: widest.append(args[0].shape[0]) if isinstance(mod, torch.nn.Conv3d)
        and args and hasattr(args[0], "shape") else None)
    try:
        reply = train_site(_message(run)[0], run, node)
    finally:
        handle.remove()
    assert 0 < max(widest) <= 2
    entries = Ledger(ledger_path(node.site_id)).entries()
    assert [(e["steps"], e["sample_rate"]) for e in entries] == [(2, 0.5)]
    assert reply["metrics"]["dp-steps"] == 2


def test_a_dp_federation_starts_from_a_pretrained_model(dp_hosp, tmp_path: Path) -> None:
    """init-model: the server's initial weights are the pretrained bundle's; a DP site trains from
    them (last block only) and its reply differs from them only in that block."""
    from client.site import train_site
    from server.model import initial_arrays
    from shared.learning import learning_core, train_config_for
    from shared.training.bundle import export_bundle

    site, run = dp_hosp
    cfg = train_config_for(run.replace(dp="none"), device="cpu")  # pretrained without DP
    torch.manual_seed(7)
    pre = learning_core().build_model(TASKS["grading"], cfg)
    export_bundle(pre, TASKS["grading"], cfg.resolved(), tmp_path / "public", {"mode": "test"}, None)
    run = run.replace(init_model=str(tmp_path / "public"), dp_train_layers="fc")
    start = initial_arrays(run).to_torch_state_dict()
    for k, v in pre.state_dict().items():
        assert torch.equal(start[k], v)
    node = NodeConfig.from_flower({"data-path": str(site)}, run)
    got = train_site(_message(run, start)[0], run, node)["arrays"].to_torch_state_dict()
    moved = sorted(k for k in start if not torch.equal(got[k], start[k]))
    assert moved == ["fc.bias", "fc.weight"]
