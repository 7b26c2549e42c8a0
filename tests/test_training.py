"""The learning core: cache, networks (incl. DP-compatible), metrics, training, bundles and the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shared import data
from shared.cohort import read_cohort
from shared.models import build_model
from shared.tasks import TASKS, select_samples
from shared.training import TrainConfig, evaluate_model, train_epochs
from shared.training.bundle import export_bundle, load_bundle
from shared.training.metrics import (
    BINS,
    auc_from_histograms,
    classification_metrics,
    score_bins,
    score_histograms,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from simulations.synth import generate_cohort

    root = tmp_path_factory.mktemp("site")
    return generate_cohort(root, cases=24, sites=2, shape=32, seed=5, workers=1, progress=False,
                           tasks=("grading", "typing", "rano", "recurrence"))


@pytest.mark.parametrize(
    ("name", "ch", "k"),
    [("small_cnn", 4, 2), ("resnet10", 4, 2), ("resnet18", 1, 7), ("densenet121", 6, 4),
     ("unet_encoder", 1, 7), ("context_cnn", 1, 7), ("resnet10_seg", 1, 7)],
)
def test_network_output_shapes(name: str, ch: int, k: int) -> None:
    model = build_model(name, ch, k).eval()
    with torch.no_grad():
        out = model(torch.randn(2, ch, 32, 32, 32))
    assert out.shape == (2, k)


@pytest.mark.parametrize("name", ["resnet10", "densenet121", "unet_encoder", "small_cnn", "context_cnn"])
def test_dp_compatible_networks_train_under_opacus(name: str) -> None:
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = build_model(name, 2, 3, dp_compatible=True)
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model)
    out = gsm(torch.randn(2, 2, 32, 32, 32))
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    grads = [p.grad_sample for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.shape[0] == 2 for g in grads)


def test_context_cnn_is_instance_normalised_and_sees_where_a_lesion_is() -> None:
    """Typing tells a sella mass from a vertex one: the same blob at two places must score differently,
    and the auxiliary segmentation head returns a full-size map only when asked for."""
    model = build_model("context_cnn", 1, 7, seg_classes=4).eval()
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    low, high = torch.zeros(1, 1, 24, 24, 24), torch.zeros(1, 1, 24, 24, 24)
    low[..., 3:6] = 2.0
    high[..., 18:21] = 2.0
    with torch.no_grad():
        assert not torch.allclose(model(low), model(high), atol=1e-4)
        model.return_seg = True
        logits, seg = model(low)
    assert logits.shape == (1, 7) and seg.shape == (1, 4, 24, 24, 24)


def test_resnet_seg_predicts_like_its_resnet_and_trains_its_early_stages_on_the_mask() -> None:
    """resnet10_seg: the segmentation heads are a training target only (prediction is the plain
    ResNet, bit for bit), and the mask loss reaches the first stage, where small lesions live."""
    seg_net = build_model("resnet10_seg", 1, 7, seg_classes=4).eval()
    plain = build_model("resnet10", 1, 7).eval()
    plain.load_state_dict({k.removeprefix("net."): v for k, v in seg_net.state_dict().items()
                           if k.startswith("net.")})
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(seg_net(x), plain(x))
    seg_net.train()
    seg_net.return_seg = True
    logits, seg = seg_net(x)
    assert logits.shape == (2, 7) and seg.shape == (2, 4, 32, 32, 32)
    target = torch.zeros(2, 32, 32, 32, dtype=torch.int64)
    target[:, 10:14, 10:14, 10:14] = 1
    torch.nn.functional.cross_entropy(seg, target).backward()
    assert seg_net.net.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert seg_net.net.fc.weight.grad is None  # the class head is not trained by the mask loss


def test_augmentation_flips_left_right_only_by_default() -> None:
    """An up-down or front-back flip would move the sella to the vertex: only the RAS x axis flips."""
    x = torch.zeros(1, 8, 8, 8)
    x[0, 1, 2, 6] = 1.0  # right of centre, posterior, superior
    gen = torch.Generator().manual_seed(0)
    sides = set()
    for _ in range(30):
        y, _ = data.augment(x, None, gen)
        i, j, k = np.unravel_index(int(y[0].argmax()), (8, 8, 8))
        sides.add(i > 3)
        assert j < 4 and k > 3  # still posterior and superior
    assert sides == {True, False}  # left-right did flip
    b, _ = data.augment_batch(x[None].repeat(16, 1, 1, 1, 1), None, gen)
    peak = [np.unravel_index(int(v.argmax()), (8, 8, 8)) for v in b[:, 0]]
    assert all(j < 4 and k > 3 for _, j, k in peak)
    assert {i > 3 for i, _, _ in peak} == {True, False}
    all_axes, _ = data.augment_batch(x[None].repeat(16, 1, 1, 1, 1), None, gen, flip_axes=(0, 1, 2))
    assert any(np.unravel_index(int(v.argmax()), (8, 8, 8))[2] < 4 for v in all_axes[:, 0])


def test_mr_augmentation_draws_scanner_like_cases_and_keeps_the_background() -> None:
    """``augment_level="mr"``: other contrast, bias field and noise, re-z-scored over the brain."""
    from shared.mr_augment import scanner_like

    x = torch.zeros(6, 2, 16, 16, 16)
    x[:, :, 3:13, 3:13, 3:13] = torch.randn(6, 2, 10, 10, 10)
    brain = x != 0
    y = scanner_like(x, torch.Generator().manual_seed(1))
    assert torch.equal(y[~brain], x[~brain])  # background stays 0
    for b in range(6):
        for c in range(2):
            v, u = y[b, c][brain[b, c]], x[b, c][brain[b, c]]
            assert abs(float(v.mean())) < 0.05 and abs(float(v.std()) - 1) < 0.05
            r = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
            assert 0.8 < r < 0.9999  # the same anatomy, another scanner
    assert torch.equal(y, scanner_like(x, torch.Generator().manual_seed(1)))  # reproducible
    one, _ = data.augment(x[0], None, torch.Generator().manual_seed(2), level="mr")
    many, _ = data.augment_batch(x, None, torch.Generator().manual_seed(2), level="mr")
    assert one.shape == x[0].shape and many.shape == x.shape
    with pytest.raises(ValueError, match="augment level"):
        data.augment(x[0], None, torch.Generator(), level="heavy")


def test_auc_from_histograms_matches_sklearn_on_binned_scores() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    p1 = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    hist = score_histograms(probs, labels, 2)
    binned = score_bins(p1)
    assert auc_from_histograms(hist[1, 0], hist[1, 1]) == pytest.approx(
        roc_auc_score(labels, binned), abs=1e-12)
    # a confident model: every probability above 0.99, ranking still informative
    sure = 1 - np.exp(-rng.uniform(5, 12, 300) - 2 * labels)
    h = score_histograms(np.stack([1 - sure, sure], 1), labels, 2)
    assert auc_from_histograms(h[1, 0], h[1, 1]) == pytest.approx(roc_auc_score(labels, sure), abs=0.02)
    assert score_bins(np.array([0.5]))[0] == BINS // 2 and score_bins(np.array([0.51]))[0] == BINS // 2 + 1
    m = classification_metrics(labels, probs, ("LGG", "HGG"))
    assert 0.7 < m["auc"] < 0.95 and 0 <= m["balanced_accuracy"] <= 1


def test_cache_means_second_epoch_reads_no_nifti(site: Path, tmp_path: Path) -> None:
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(site), "train")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), batch_size=4,
                      cache_dir=str(tmp_path / "cache"))
    model = build_model("small_cnn", 4, 2)
    before = data.nifti_loads
    res = train_epochs(model, samples, spec, cfg, epochs=1)
    first = data.nifti_loads - before
    assert first == len(samples) * 5  # four sequences + seg per session
    mid = data.nifti_loads
    # a fresh run (new in-memory cache) still reads from the disk cache, not NIfTI
    train_epochs(build_model("small_cnn", 4, 2), samples, spec, cfg, epochs=2)
    assert data.nifti_loads == mid
    assert res.num_examples == len(samples)  # examples, not batches
    assert np.isfinite(res.loss)


def test_fedprox_term_pulls_towards_global_weights(site: Path, tmp_path: Path) -> None:
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(site), "train")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16),
                      cache_dir=str(tmp_path / "c"), augment=False, lr=1e-2, batch_size=2)
    base = build_model("small_cnn", 4, 2)
    g = {k: v.clone() for k, v in base.state_dict().items()}

    def drift(mu: float) -> float:
        m = build_model("small_cnn", 4, 2)
        m.load_state_dict(g)
        train_epochs(m, samples, spec, cfg, epochs=3, proximal_mu=mu, global_state=g)
        return sum(float(((p - g[n]) ** 2).sum()) for n, p in m.named_parameters())

    assert drift(100.0) < drift(0.0)


@pytest.mark.parametrize("task", ["grading", "typing", "rano", "recurrence"])
def test_every_task_trains_evaluates_and_round_trips_as_bundle(site: Path, tmp_path: Path,
                                                              task: str) -> None:
    spec = TASKS[task]
    cohort = read_cohort(site)
    samples, _ = select_samples(spec, cohort)
    assert len(samples) >= 4
    cfg = TrainConfig(task=task, network="small_cnn", input_size=(16, 16, 16),
                      cache_dir=str(tmp_path / "c"))
    from shared.training import build_task_model

    model = build_task_model(spec, cfg)
    train_epochs(model, samples, spec, cfg, epochs=1)
    ev = evaluate_model(model, samples, spec, cfg)
    assert ev.confusion.sum() == len(samples) == ev.num_examples
    assert ev.score_hist.shape == (spec.num_classes, 2, BINS)
    from sklearn.metrics import balanced_accuracy_score

    assert ev.metrics["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(ev.labels, ev.probs.argmax(1)))
    out = export_bundle(model, spec, cfg, tmp_path / "model", {"mode": "test"}, ev.metrics)
    loaded, meta = load_bundle(out)
    assert meta["task"] == task and meta["classes"] == list(spec.classes)
    ev2 = evaluate_model(loaded, samples, spec, replace(cfg, augment=False))
    np.testing.assert_allclose(ev2.probs, ev.probs, atol=1e-5)


def test_cli_train_predict_evaluate_explain(site: Path, tmp_path: Path) -> None:
    from gliofed.cli import app

    r = CliRunner()
    model = tmp_path / "m"
    res = r.invoke(app, ["train", "--task", "grading", "--cohort", str(site), "--out", str(model),
                         "--network", "small_cnn", "--epochs", "1", "--size", "16",
                         "--ema-decay", "0.9", "--calibrate", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (model / "configs" / "metadata.json").is_file()
    assert '"ema_decay": 0.9' in (model / "configs" / "metadata.json").read_text()
    assert '"calibrate": true' in (model / "configs" / "metadata.json").read_text()
    assert "calibrate skipped: the validation split has 1 cases of 1 class" in res.output  # too few
    assert (model / "eval" / "roc.png").is_file()
    preds = tmp_path / "p.csv"
    res = r.invoke(app, ["predict", "--model", str(model), "--cohort", str(site), "--out", str(preds)])
    assert res.exit_code == 0, res.output
    lines = preds.read_text().splitlines()
    assert lines[0] == "case_id,label,prob_LGG,prob_HGG"
    usable = [c for c in read_cohort(site).cases if c.has_images(TASKS["grading"].inputs)]
    assert len(lines) - 1 == len(usable)  # every row with the inputs, labelled or not
    res = r.invoke(app, ["evaluate", "--model", str(model), "--cohort", str(site), "--out",
                         str(tmp_path / "ev"), "--split", "all"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["explain", "--model", str(model), "--cohort", str(site), "--out",
                         str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "x").glob("*_explain.png"))
    res = r.invoke(app, ["explain", "--model", str(model), "--cohort", str(site), "--out",
                         str(tmp_path / "occ"), "--method", "occlusion"])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "occ").glob("*_explain.png"))
    res = r.invoke(app, ["explain", "--model", str(model), "--cohort", str(site), "--out",
                         str(tmp_path / "y"), "--method", "lrp"])
    assert res.exit_code != 0 and "occlusion" in res.output
    res = r.invoke(app, ["train", "--task", "nope", "--cohort", str(site), "--out", str(model)])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
    res = r.invoke(app, ["train", "--task", "grading", "--cohort", str(site), "--out", str(model),
                         "--ema-decay", "1.5"])
    assert res.exit_code == 2 and "ema_decay 1.5" in res.output


def test_rano_with_subtraction_and_clinical_inputs(site: Path, tmp_path: Path) -> None:
    from shared.training import build_task_model

    spec = TASKS["rano"]
    samples, _ = select_samples(spec, read_cohort(site))
    # `spd_mm2` is a numeric extra column the synthetic cohort writes; any numeric column works
    cfg = TrainConfig(task="rano", network="small_cnn", input_size=(16, 16, 16), subtraction=True,
                      clinical=("spd_mm2", "not_a_column"), cache_dir=str(tmp_path / "c"))
    model = build_task_model(spec, cfg)
    assert model.backbone.features[0].in_channels == 9  # 3 sequences x (baseline, follow-up, diff)
    train_epochs(model, samples, spec, cfg, epochs=1)
    assert float(model.fitted) == 1.0 and float(model.std[0]) > 0
    ev = evaluate_model(model, samples, spec, cfg)
    assert np.isfinite(ev.probs).all()
    out = export_bundle(model, spec, cfg, tmp_path / "m", {"mode": "test"})
    loaded, meta = load_bundle(out)
    assert meta["network"]["clinical"] == ["spd_mm2", "not_a_column"]
    torch.testing.assert_close(loaded.mean, model.mean)


def test_batch_augmentation_is_reproducible_and_keeps_labels():
    """The GPU path's batched augmentation (run here on the CPU): same seed, same batch; labels kept."""
    x = torch.rand(3, 2, 12, 12, 12)
    seg = torch.randint(0, 3, (3, 12, 12, 12)) * 2  # labels 0, 2, 4
    a, sa = data.augment_batch(x, seg, torch.Generator().manual_seed(0))
    b, sb = data.augment_batch(x, seg, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert a.shape == x.shape and sa.shape == seg.shape
    assert set(sa.unique().tolist()) <= {0, 2, 4}
    c, _ = data.augment_batch(x, None, torch.Generator().manual_seed(1))
    assert not torch.equal(a, c) and a.isfinite().all()


def test_cache_key_is_memoised_until_the_file_changes(tmp_path):
    import os

    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"x" * 100)
    cache = data.SessionCache(tmp_path / "c")
    cfg = data.PreprocessConfig(size=(8, 8, 8))
    k1 = cache.key([f], None, cfg)
    assert cache.key([f], None, cfg) == k1
    f.write_bytes(b"y" * 101)
    os.utime(f, ns=(1, 1))
    assert cache.key([f], None, cfg) != k1


def test_resident_batches_cover_the_set_once_per_epoch(tmp_path):
    """The GPU-resident batch source (exercised on the CPU here): every item once per epoch."""
    from shared.tasks import TASKS, select_samples
    from tests.fl_helpers import write_tiny_cohort

    write_tiny_cohort(tmp_path / "site", n_cases=10)
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(tmp_path / "site"))
    ds = data.TaskDataset(samples, spec, (16, 16, 16), data.SessionCache(tmp_path / "c"))
    rb = data.ResidentBatches(ds, 4, torch.device("cpu"), seed=0)
    assert len(rb) == 3
    ys = torch.cat([b["y"] for b in rb])
    assert sorted(ys.tolist()) == sorted(ds.labels())
    assert not data.ResidentBatches.fits(ds, torch.device("cpu"))  # only ever used on CUDA


def test_fit_starts_no_epoch_past_its_deadline(site: Path, tmp_path: Path) -> None:
    """A benchmark with a time budget still returns a trained, validated model when the budget ends."""
    import time

    from shared.training import fit

    spec = TASKS["grading"]
    cohort = read_cohort(site)
    tr, _ = select_samples(spec, cohort, "train")
    va, _ = select_samples(spec, cohort, "val")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), epochs=5,
                      cache_dir=str(tmp_path / "c"), augment=False)
    logs: list[str] = []
    _, hist = fit(spec, cfg, tr, va, progress=False, log=logs.append, deadline=time.time() + 0.01)
    assert [h["epoch"] for h in hist] == [1]
    assert "stopping before epoch 2" in logs[-1]
    _, hist = fit(spec, replace(cfg, epochs=2), tr, va, progress=False, log=logs.append)
    assert [h["epoch"] for h in hist] == [1, 2]


def test_fit_keeps_one_optimiser_and_follows_the_cosine_schedule(site: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """fit() hands every epoch the same AdamW (its moments are not reset each epoch, which jolted
    training), and a cosine schedule sets lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2."""
    import math

    from shared.training import fit, loop

    seen: list[tuple[int, float, int]] = []
    real = loop.train_epochs

    def spy(model, samples, spec, cfg, **kw):
        opt = kw["optimizer"]
        res = real(model, samples, spec, cfg, **kw)
        steps = max(int(s["step"]) for s in opt.state.values())
        seen.append((id(opt), opt.param_groups[0]["lr"], steps))
        return res

    monkeypatch.setattr(loop, "train_epochs", spy)
    spec = TASKS["grading"]
    cohort = read_cohort(site)
    tr, _ = select_samples(spec, cohort, "train")
    va, _ = select_samples(spec, cohort, "val")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), epochs=3, lr=0.01,
                      cache_dir=str(tmp_path / "c"), augment=False, patience=10, lr_schedule="cosine")
    fit(spec, cfg, tr, va, progress=False, log=lambda m: None)
    assert len({s[0] for s in seen}) == 1
    assert [round(s[1], 6) for s in seen] == [round(0.01 * (1 + math.cos(math.pi * e / 3)) / 2, 6)
                                              for e in range(3)]
    assert seen[0][2] < seen[1][2] < seen[2][2]  # Adam's step count carries over
    with pytest.raises(ValueError, match="lr_schedule"):
        replace(cfg, lr_schedule="step").resolved()


def test_fit_breaks_a_saturated_validation_metric_by_the_validation_loss(site: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """With a validation AUC of 1.0 at every epoch, fit keeps the epoch whose validation
    cross-entropy is lowest (before: the first epoch to reach 1.0, an underfit model)."""
    from shared.training import fit, loop

    spec = TASKS["grading"]
    cohort = read_cohort(site)
    tr, _ = select_samples(spec, cohort, "train")
    va, _ = select_samples(spec, cohort, "val")
    losses = {1: 0.6, 2: 0.5, 3: 0.2, 4: 0.4}
    epoch = {"n": 0}

    def fake_train(model, samples, spec, cfg, **kw):
        epoch["n"] += 1
        with torch.no_grad():
            next(model.parameters()).fill_(float(epoch["n"]))  # marks which epoch's weights these are
        return loop.TrainResult(num_examples=len(samples), loss=0.1, metrics={}, seconds=0.0)

    def fake_eval(model, samples, spec, cfg):
        labels = np.array([0, 1])
        p_true = float(np.exp(-losses[epoch["n"]]))
        probs = np.array([[p_true, 1 - p_true], [1 - p_true, p_true]])
        ce = float(-np.log(probs[[0, 1], labels]).mean())
        return loop.EvalResult(2, {"auc": 1.0, "accuracy": 1.0, "cross_entropy": ce},
                               np.eye(2, dtype=np.int64), None, probs, labels)

    monkeypatch.setattr(loop, "train_epochs", fake_train)
    monkeypatch.setattr(loop, "evaluate_model", fake_eval)
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), epochs=4,
                      cache_dir=str(tmp_path / "c"), augment=False, patience=10)
    model, hist = fit(spec, cfg, tr, va, progress=False, log=lambda m: None)
    assert float(next(model.parameters()).flatten()[0]) == 3.0
    assert [round(h["val_loss"], 3) for h in hist] == [0.6, 0.5, 0.2, 0.4]


def test_weight_average_moves_towards_each_step_with_warm_up_and_copies_counters() -> None:
    from shared.training.loop import _WeightAverage

    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    avg = _WeightAverage(0.5)
    with pytest.raises(RuntimeError, match="no training step"):
        avg.model()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.0)
    avg(net)  # the first step: a copy
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    net[1].num_batches_tracked.fill_(7)
    avg(net)  # d = min(0.5, 2 / 11): the average moves 9/11 of the way
    got = avg.model()
    assert got is not net
    assert torch.allclose(got[0].weight, torch.full_like(got[0].weight, 9 / 11))
    assert int(got[1].num_batches_tracked) == 7
    assert not any(p.requires_grad for p in got.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(task="grading", ema_decay=1.0).resolved()


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_fit_validates_and_returns_the_weight_average_when_asked(site: Path, tmp_path: Path,
                                                                 monkeypatch, decay: float) -> None:
    """ema_decay > 0: every epoch's validation scores the moving average, not the trained network,
    and the model fit returns carries the best-scoring epoch's average."""
    import copy

    from shared.training import fit, loop

    trained, scored = [], []
    real_train, real_eval = loop.train_epochs, loop.evaluate_model

    def spy_train(model, *a, **kw):
        trained.append(id(model))
        return real_train(model, *a, **kw)

    def spy_eval(model, *a, **kw):
        ev = real_eval(model, *a, **kw)
        scored.append((id(model), copy.deepcopy(model.state_dict()), ev.metrics["auc"],
                       ev.metrics["cross_entropy"]))
        return ev

    monkeypatch.setattr(loop, "train_epochs", spy_train)
    monkeypatch.setattr(loop, "evaluate_model", spy_eval)
    spec = TASKS["grading"]
    cohort = read_cohort(site)
    tr, _ = select_samples(spec, cohort, "train")
    va, _ = select_samples(spec, cohort, "val")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), epochs=3,
                      lr=0.01, cache_dir=str(tmp_path / "c"), augment=False, patience=10,
                      ema_decay=decay)
    model, _ = fit(spec, cfg, tr, va, progress=False, log=lambda m: None)
    assert len(set(trained)) == 1 and len(scored) == 3
    assert all((sid == trained[0]) == (decay == 0) for sid, *_ in scored)
    best = max(scored, key=lambda r: (-np.inf if np.isnan(r[2]) else r[2], -r[3]))[1]  # fit's rule
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k


def test_logit_adjustment_trains_the_class_balanced_bias(site: Path, tmp_path: Path) -> None:
    """balance=logit_adjust trains on logits + log(prior): on a label-skewed site the network's own
    output bias stays near the balanced one, where plain cross-entropy learns log(majority/minority)
    (the pull between sites' biases that left FedAvg calling one class, benchmarks/README.md)."""
    from torch import nn

    from shared.training.loop import _log_prior

    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(site), "train")
    hgg = [s for s in samples if s.label == "HGG"]
    lgg = [s for s in samples if s.label == "LGG"]
    skewed = (hgg[:2] * 3)[:6] + lgg[:1]  # 6:1, a site like site-0 (98 % HGG)
    assert len(skewed) == 7

    class BiasOnly(nn.Module):  # the input is ignored: all it can learn is the class prior
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(4, 1, 1)
            self.bias = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.bias.expand(len(x), 2) + 0 * self.conv(x).mean()

    def learnt(balance: str) -> float:
        m = BiasOnly()
        cfg = TrainConfig(task="grading", network="small_cnn", input_size=(8, 8, 8), lr=0.05,
                          cache_dir=str(tmp_path / "c"), augment=False, batch_size=7, balance=balance)
        train_epochs(m, skewed, spec, cfg, epochs=150)
        return float(m.bias[1] - m.bias[0])  # logit(HGG) - logit(LGG)

    assert torch.allclose(_log_prior([1, 1, 1, 1, 1, 1, 0], 2).exp(), torch.tensor([2 / 9, 7 / 9]))
    plain, adjusted = learnt("none"), learnt("logit_adjust")
    assert plain > 1.2  # ~ log(6/1)
    assert abs(adjusted) < 0.5 * plain  # ~ log(6/1) - log(7/2)
    with pytest.raises(ValueError, match="balance"):
        TrainConfig(task="grading", balance="focal").resolved()


def test_a_last_batch_of_one_case_does_not_stop_batchnorm_training(site: Path, tmp_path: Path) -> None:
    """5 cases in batches of 4 left a batch of 1, on which BatchNorm raises ("Expected more than 1
    value per channel"): a site with 4k + 1 training cases failed every round (scanner parity run)."""
    spec = TASKS["grading"]
    samples, _ = select_samples(spec, read_cohort(site), "train")
    five = (samples * 5)[:5]
    cfg = TrainConfig(task="grading", network="resnet10", input_size=(16, 16, 16), batch_size=4,
                      cache_dir=str(tmp_path / "c"), augment=False)
    res = train_epochs(build_model("resnet10", 4, 2), five, spec, cfg, epochs=2)
    assert np.isfinite(res.loss) and res.num_examples == 5
    small = train_epochs(build_model("small_cnn", 4, 2), five, spec, cfg, epochs=1)  # GroupNorm:
    assert np.isfinite(small.loss)  # no batch is dropped
    one = build_model("resnet10", 4, 2)  # a site with one training case (seed-2 parity site-1)
    before = {k: v.clone() for k, v in one.state_dict().items()}
    assert np.isfinite(train_epochs(one, five[:1], spec, cfg, epochs=1).loss)
    assert not torch.equal(one.fc.weight, before["fc.weight"])  # it trained
    assert torch.equal(one.bn1.running_mean, before["bn1.running_mean"])  # on its running statistics


def test_rano_adds_the_difference_image_by_default() -> None:
    """Measured: without follow-up minus baseline, rano stayed at chance (benchmarks/README.md)."""
    from shared.training.loop import model_inputs

    rano = TASKS["rano"]
    assert TrainConfig(task="rano").resolved().subtraction is True
    assert TrainConfig(task="rano", subtraction=False).resolved().subtraction is False
    assert TrainConfig(task="grading").resolved().subtraction is False
    with_diff = model_inputs(rano, TrainConfig(task="rano"))["in_channels"]
    assert with_diff == model_inputs(rano, TrainConfig(task="rano", subtraction=False))["in_channels"] * 3 // 2
