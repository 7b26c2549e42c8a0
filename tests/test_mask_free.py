"""Inputs come from the images alone, and MODEL_DIR runs under MONAI's bundle runner without gliofed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shared.cohort import read_cohort
from shared.data import SessionCache, TaskDataset
from shared.tasks import TASKS, select_samples
from shared.training import TrainConfig, build_task_model, predict_probs
from shared.training.bundle import export_bundle

PROJECT_PACKAGES = ("shared", "gliofed", "client", "server", "simulations")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from simulations.synth import generate_cohort

    root = tmp_path_factory.mktemp("maskfree")
    return generate_cohort(root / "site", cases=16, sites=1, shape=32, seed=11, workers=1,
                           progress=False, tasks=("grading", "typing", "rano"))


def _blank_seg_copy(site: Path, dest: Path) -> Path:
    """The same cohort (byte-identical image files) with every seg cell emptied."""
    import shutil

    shutil.copytree(site / "images", dest / "images")
    rows = list(csv.DictReader((site / "cohort.csv").open()))
    assert any(r["seg"] for r in rows)
    for r in rows:
        r["seg"] = ""
    with (dest / "cohort.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest


@pytest.mark.parametrize("task,network", [("grading", "small_cnn"), ("typing", "unet_encoder"),
                                          ("rano", "small_cnn")])
def test_blank_seg_gives_bit_identical_inputs_and_predictions(site, tmp_path, task, network):
    spec = TASKS[task]
    blank = _blank_seg_copy(site, tmp_path / "blank")
    with_seg, _ = select_samples(spec, read_cohort(site), require_label=False)
    no_seg, _ = select_samples(spec, read_cohort(blank), require_label=False)
    assert [s.case_id for s in with_seg] == [s.case_id for s in no_seg] and len(with_seg) >= 2
    assert all("seg" in s.case.images for s in with_seg) and not any("seg" in s.case.images for s in no_seg)
    cfg = TrainConfig(task=task, network=network, input_size=(16, 16, 16), augment=False,
                      cache_dir=str(tmp_path / "c"))
    a = TaskDataset(with_seg, spec, (16, 16, 16), SessionCache(tmp_path / "c1"), with_seg=True)
    b = TaskDataset(no_seg, spec, (16, 16, 16), SessionCache(tmp_path / "c2"), with_seg=True)
    for i in range(len(a)):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["x"], ib["x"]), with_seg[i].case_id
        assert (ia["seg"] >= 0).all() and (ib["seg"] == -100).all()  # the mask is only a target
    model = build_task_model(spec, cfg)
    pa = predict_probs(model, with_seg, spec, cfg)
    pb = predict_probs(model, no_seg, spec, replace_cache(cfg, tmp_path / "c3"))
    assert np.array_equal(pa, pb)


def replace_cache(cfg: TrainConfig, path: Path) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, cache_dir=str(path))


def _blocker(folder: Path) -> Path:
    """A sitecustomize that makes every gliofed package unimportable in a subprocess."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {PROJECT_PACKAGES!r}\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} is blocked: the bundle must not need gliofed')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    return folder


def _read(path: Path) -> dict[str, dict[str, str]]:
    return {r["case_id"]: r for r in csv.DictReader(path.open())}


@pytest.mark.parametrize("task,network", [("grading", "resnet10"), ("rano", "unet_encoder"),
                                          ("rano", "small_cnn_mirror")])
def test_model_dir_runs_under_monai_bundle_runner_without_gliofed(site, tmp_path, task, network):
    from gliofed.cli import app

    spec = TASKS[task]
    blank = _blank_seg_copy(site, tmp_path / "blank")  # the runner never needs a mask either
    samples, _ = select_samples(spec, read_cohort(site))
    cfg = TrainConfig(task=task, network=network, input_size=(16, 16, 16), augment=False,
                      cache_dir=str(tmp_path / "c"), subtraction=task == "rano")
    cfg = cfg.resolved()
    from shared.training import model_inputs, train_epochs

    model = build_task_model(spec, cfg, model_inputs(spec, cfg, samples)["in_channels"])
    train_epochs(model, samples, spec, cfg, epochs=1)
    model_dir = export_bundle(model, spec, cfg, tmp_path / "model", {"mode": "test"})
    ours = tmp_path / "gliofed.csv"
    res = CliRunner().invoke(app, ["predict", "--model", str(model_dir), "--cohort", str(blank),
                                   "--out", str(ours)])
    assert res.exit_code == 0, res.output
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(_blocker(tmp_path / "block"))
    probe = subprocess.run([sys.executable, "-c", "import shared"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the blocker really blocks
    out = tmp_path / "monai_out"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(model_dir / "configs" / "inference.json"), "--bundle_root", str(model_dir),
         "--dataset_dir", str(blank), "--output_dir", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    theirs, mine = _read(out / "predictions.csv"), _read(ours)
    assert list(theirs) == list(mine) and len(mine) >= 2
    header = next(csv.reader((out / "predictions.csv").open()))
    assert header == ["case_id", "label", *[f"prob_{c}" for c in spec.classes]]
    for cid, row in mine.items():
        assert theirs[cid]["label"] == row["label"]
        for c in spec.classes:
            assert abs(float(theirs[cid][f"prob_{c}"]) - float(row[f"prob_{c}"])) < 1e-3, cid


@pytest.mark.parametrize("task,network", [("typing", "unet_encoder"), ("grading", "resnet10"),
                                          ("rano", "densenet121")])
def test_explain_works_for_every_task_network(site, tmp_path, task, network):
    from shared.training.explain import explain_cases, last_active_conv

    spec = TASKS[task]
    samples, _ = select_samples(spec, read_cohort(site))
    size = 32 if network == "densenet121" else 16  # DenseNet's four poolings need 32^3
    cfg = TrainConfig(task=task, network=network, input_size=(size,) * 3, augment=False,
                      cache_dir=str(tmp_path / "c"))
    model = build_task_model(spec, cfg)
    if network == "unet_encoder":  # the seg head's convs must not be taken for the class path
        layer = last_active_conv(model, torch.zeros(1, 1, 16, 16, 16))
        assert all(layer is not h for h in model.seg_head)
    rows = explain_cases(model, samples[:2], spec, cfg, tmp_path / "x")
    assert [r["case_id"] for r in rows] == [s.case_id for s in samples[:2]]
    for r in rows:
        assert Path(r["png"]).stat().st_size > 5000
        assert r["predicted"] in spec.classes
        assert 0.0 < r["saliency_inside"] < 1.0  # the mask is read for the measurement only


def test_mass_inside_measures_the_share_on_the_dilated_lesion():
    from shared.training.explain import mass_inside

    mask = np.zeros((10, 10, 10), np.uint8)
    mask[4:6, 4:6, 4:6] = 1
    heat = np.zeros((10, 10, 10))
    heat[5, 5, 5] = 3.0
    heat[0, 0, 0] = 1.0
    assert mass_inside(heat, mask, dilate=0) == pytest.approx(0.75)
    heat[2, 5, 5] = 4.0  # two voxels from the lesion: inside only once dilated
    assert mass_inside(heat, mask, dilate=0) == pytest.approx(3 / 8)
    assert mass_inside(heat, mask, dilate=2) == pytest.approx(7 / 8)


def test_unknown_balance_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="weighted_loss, sampler, none, logit_adjust"):
        TrainConfig(task="typing", balance="oversample").resolved()


def test_saliency_methods_stay_inside_the_brain():
    """Every saliency method gives a [0, 1] map; by default nothing lands on the zero background."""
    from torch import nn

    from shared.training.explain import SALIENCY_METHODS, saliency

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    x = torch.zeros(1, 1, 12, 12, 12)
    x[..., 3:9, 3:9, 3:9] = torch.randn(6, 6, 6) + 1.0  # the "brain"; zero background around it
    background = (x[0, 0] == 0).numpy()
    raw = saliency(model, x, 1, method="gradient", brain_only=False)
    assert raw[background].max() > 0  # the gradient itself leaks onto the background next to the brain
    maps = {m: saliency(model, x, 1, method=m, window=2) for m in SALIENCY_METHODS}  # 2-voxel cubes
    for m, s in maps.items():
        assert s.shape == (12, 12, 12) and s.max() == pytest.approx(1.0), m
        assert (s[background] == 0).all(), m
    assert not np.allclose(maps["smoothgrad"], maps["gradient"])
    with pytest.raises(ValueError, match="smoothgrad"):
        saliency(model, x, 1, method="lrp")


def test_integrated_gradients_add_up_to_the_logit_change():
    """Completeness (Sundararajan 2017): the attributions sum to logit(x) - logit(0), which a plain
    input x gradient of a saturating network does not."""
    from torch import nn

    from shared.training.explain import _input_grad, integrated_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    x = 3 * torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        change = float(model(x)[0, 1] - model(torch.zeros_like(x))[0, 1])
    ig = integrated_gradients(model, x, 1, steps=64)
    assert ig.shape == x.shape
    assert float(ig.sum()) == pytest.approx(change, rel=0.02, abs=1e-3)
    plain = float((_input_grad(model, x, 1) * x).sum())
    assert abs(plain - change) > 0.05 * abs(change)  # the test can tell the two apart


def test_occlusion_map_puts_its_mass_where_the_decision_is_read():
    """A toy net whose class-1 logit reads one cube only: occlusion finds that cube, not the rest."""
    from torch import nn

    from shared.training.explain import mass_inside, occlusion_map, saliency

    class ReadsOneCube(nn.Module):
        def forward(self, x):
            v = x[:, 0, 4:8, 4:8, 4:8].mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(v), 4 * v], 1)

    torch.manual_seed(0)
    x = torch.zeros(1, 1, 16, 16, 16)
    x[..., 2:14, 2:14, 2:14] = torch.rand(12, 12, 12) + 0.5  # positive brain: blanking lowers class 1
    cube = np.zeros((16, 16, 16), np.uint8)
    cube[4:8, 4:8, 4:8] = 1
    heat = occlusion_map(ReadsOneCube(), x, 1, window=4, stride=2)
    assert heat.shape == (16, 16, 16) and heat.min() >= 0
    assert mass_inside(heat, cube, dilate=2) > 0.9
    assert heat[12:, 12:, 12:].max() == 0  # far from the cube nothing changes the class
    assert occlusion_map(ReadsOneCube(), x, 0, window=4, stride=2).max() == 0  # class 0 only rises
    s = saliency(ReadsOneCube(), x, 1, method="occlusion")
    assert s.max() == pytest.approx(1.0) and (s[x[0, 0].numpy() == 0] == 0).all()


def test_mirror_network_sees_each_channel_and_its_left_right_asymmetry():
    from shared.models import MirrorInput, build_model
    from shared.training.loop import _first_conv_in_channels

    model = build_model("small_cnn_mirror", 2, 3)
    assert isinstance(model, MirrorInput) and _first_conv_in_channels(model) == 2
    seen = []
    model.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    half = torch.rand(1, 2, 8, 16, 16)
    symmetric = torch.cat([half, torch.flip(half, dims=(2,))], 2)  # mirror image about the midline
    one_sided = symmetric.clone()
    one_sided[:, 0, 2:5, 6:9, 6:9] += 3.0  # a "lesion" in the left half of channel 0
    model.eval()
    model(symmetric)
    model(one_sided)
    assert seen[0].shape == (1, 4, 16, 16, 16)
    assert torch.equal(seen[0][:, :2], symmetric) and seen[0][:, 2:].abs().max() == 0
    asym = seen[1][:, 2]  # channel 0's asymmetry: +3 at the lesion, -3 at its mirror image
    assert asym[0, 2:5, 6:9, 6:9].eq(3.0).all() and asym[0, 11:14, 6:9, 6:9].eq(-3.0).all()
    assert asym.abs().sum() == 2 * 3.0 * 27 and seen[1][:, 3].abs().max() == 0


def test_avgmax_network_keeps_a_feature_that_fires_in_one_voxel():
    from shared.models import AvgMaxPool3d, build_model

    x = torch.zeros(2, 3, 4, 4, 4)
    x[0, 1, 2, 2, 2] = 6.4  # one voxel of one channel in case 0
    pooled = AvgMaxPool3d()(x)
    assert pooled.shape == (2, 6, 1, 1, 1)
    assert pooled[0, 1].item() == pytest.approx(0.1) and pooled[0, 4].item() == pytest.approx(6.4)
    assert pooled[1].abs().max() == 0
    model = build_model("resnet10_avgmax", 1, 7)
    assert isinstance(model.avgpool, AvgMaxPool3d) and model.fc.in_features == 1024
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 7)
