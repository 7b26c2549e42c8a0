"""GPU checks (marker ``gpu``; `make test-gpu` on a CUDA machine): same answers as the CPU, AMP trains.

Skipped without CUDA. Only ``shared`` code is used, so the checks need torch, monai, opacus and
nibabel, not Flower.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_qtmnet_cuda_matches_cpu():
    from shared.qtm.net import TIME_AXIS_S, build_qtmnet

    torch.manual_seed(0)
    model = build_qtmnet().eval()
    x = torch.rand(1, len(TIME_AXIS_S), 32, 32, 16)
    with torch.no_grad():
        ref = model(x)
        torch.backends.cudnn.allow_tf32 = False
        got = model.cuda()(x.cuda()).cpu()
    assert _rel(got, ref) < 1e-4


def test_qtmnet_bf16_inference_is_close():
    from shared.qtm.net import TIME_AXIS_S, build_qtmnet, predict_volume

    torch.manual_seed(1)
    model = build_qtmnet()
    curves = np.random.default_rng(0).random((len(TIME_AXIS_S), 40, 36, 12)).astype(np.float32)
    cpu = predict_volume(model, curves, "cpu")
    gpu = predict_volume(model.cuda(), curves, "cuda", amp=True)
    for name in ("vp", "ve"):
        err = np.abs(gpu[name] - cpu[name]).mean() / max(np.abs(cpu[name]).mean(), 1e-9)
        assert err < 0.05, name


def test_2cxm_fit_cuda_matches_cpu():
    from shared.dce import parker_aif, twocxm
    from shared.dce.fit import fit_2cxm

    rng = np.random.default_rng(0)
    t = np.arange(60) * 5.0
    ca = parker_aif(t, 10.0)
    n = 256
    fp, ps = rng.uniform(20, 80, n), rng.uniform(0.01, 0.2, n)
    ve, vp = rng.uniform(0.1, 0.4, n), rng.uniform(0.02, 0.08, n)
    ct = np.stack([twocxm(t, ca, fp[i], ps[i], ve[i], vp[i]) for i in range(n)])
    ct = ct + rng.normal(0, 0.002, ct.shape)
    a = fit_2cxm(ct, t, ca, device="cpu")
    b = fit_2cxm(ct, t, ca, device="cuda")
    for k in ("fp", "ps", "ve", "vp"):
        assert np.median(np.abs(a[k].numpy() - b[k].numpy()) / np.abs(a[k].numpy())) < 1e-3, k
    assert np.median(np.abs(b["vp"].numpy() - vp) / vp) < 0.1


def test_classifier_trains_with_amp_on_cuda():
    from shared.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet10", 4, 2).cuda().to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(4, 4, 64, 64, 64, device="cuda").to(memory_format=torch.channels_last_3d)
    y = torch.tensor([0, 1, 0, 1], device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_opacus_dp_step_on_cuda():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from shared.models import build_model

    torch.manual_seed(0)
    model = GradSampleModule(build_model("resnet10", 4, 2, dp_compatible=True).cuda())
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), 0.01), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=4)
    x = torch.randn(4, 4, 32, 32, 32, device="cuda")
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1], device="cuda"))
    loss.backward()
    per_sample = [p.grad_sample for p in model.parameters() if p.requires_grad]
    assert all(g.shape[0] == 4 for g in per_sample)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_loop_on_cuda_learns_with_device_augmentation(tmp_path):
    """The real loop runs on CUDA: float16 items, loader workers, batched augmentation on the GPU."""
    from shared.cohort import read_cohort
    from shared.tasks import TASKS, select_samples
    from shared.training import TrainConfig, build_task_model, evaluate_model, train_epochs
    from tests.fl_helpers import write_tiny_cohort

    write_tiny_cohort(tmp_path / "site", n_cases=24)
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(tmp_path / "site"))
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), batch_size=4,
                      device="cuda", cache_dir=str(tmp_path / "cache"), lr=3e-3)
    model = build_task_model(spec, cfg)
    res = train_epochs(model, samples, spec, cfg, epochs=8)
    assert np.isfinite(res.loss) and res.num_examples == len(samples)
    ev = evaluate_model(model, samples, spec, cfg)
    assert 0.0 <= ev.metrics["auc"] <= 1.0 and ev.num_examples == len(samples)


def test_batch_augmentation_on_cuda_in_half_precision():
    from shared.data import augment_batch

    x = torch.rand(2, 4, 32, 32, 32, device="cuda").half()
    seg = (torch.randint(0, 3, (2, 32, 32, 32), device="cuda") * 2)
    a, sa = augment_batch(x, seg, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and a.shape == x.shape and torch.isfinite(a).all()
    assert set(sa.unique().tolist()) <= {0, 2, 4}
    ref, _ = augment_batch(x.float().cpu(), None, torch.Generator().manual_seed(0))
    assert _rel(a.cpu(), ref) < 1e-2  # same transform as the float32 CPU path, to half precision
