"""Class-balanced logit calibration: the fit, its fold into the output layer, and `fit(calibrate=True)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.cohort import read_cohort
from shared.models import build_model
from shared.tasks import TASKS, select_samples
from shared.training import TrainConfig, evaluate_model, fit
from shared.training.calibrate import fit_logit_calibration, fold_into_logits


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _apply(probs: np.ndarray, t: float, b: np.ndarray) -> np.ndarray:
    return _softmax(np.log(np.clip(probs, 1e-12, None)) / t + b)


def test_calibration_restores_the_recall_of_an_under_called_class() -> None:
    """Class 1's cases score a little below class 0 (a model leaning towards 0): the fitted offset
    raises class 1, its recall goes up, and an absent class keeps offset 0."""
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 2, n)
    z = np.zeros((n, 3))
    z[:, 0] = rng.normal(0.0, 1.0, n) + 1.0 * (labels == 0)
    z[:, 1] = rng.normal(0.0, 1.0, n) + 1.0 * (labels == 1) - 0.8  # pushed down
    z[:, 2] = -5.0
    probs = _softmax(z)
    before = (probs.argmax(1)[labels == 1] == 1).mean()
    t, b = fit_logit_calibration(probs, labels)
    after = (_apply(probs, t, b).argmax(1)[labels == 1] == 1).mean()
    assert t > 0 and b[1] > b[0] and b[2] == 0.0
    assert after > before + 0.15
    balanced = np.mean([(_apply(probs, t, b).argmax(1)[labels == c] == c).mean() for c in (0, 1)])
    assert balanced > np.mean([(probs.argmax(1)[labels == c] == c).mean() for c in (0, 1)])
    with pytest.raises(ValueError, match="two classes"):
        fit_logit_calibration(probs[labels == 0], labels[labels == 0])


@pytest.mark.parametrize(("name", "clinical"), [("small_cnn", 0), ("resnet10_mirror", 0), ("small_cnn", 2)])
def test_fold_makes_the_network_output_the_calibrated_softmax(name: str, clinical: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 1, 4, clinical=clinical).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    c = torch.randn(3, clinical) if clinical else None
    run = (lambda m: m(x, c)) if clinical else (lambda m: m(x))
    with torch.no_grad():
        before = torch.softmax(run(model).double(), 1).numpy()
    b = np.array([0.5, -0.2, 0.0, -0.3])
    fold_into_logits(model, 1.7, b, x)
    with torch.no_grad():
        after = torch.softmax(run(model).double(), 1).numpy()
    np.testing.assert_allclose(after, _apply(before, 1.7, b), atol=1e-4)


def test_fold_refuses_a_network_whose_logits_are_not_linear_layers() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3), torch.nn.Softmax(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="did not fold"):
        fold_into_logits(net, 2.0, np.array([1.0, 0.0, -1.0]), torch.randn(4, 8))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # left as it was
    with pytest.raises(ValueError, match="cannot fold"):
        fold_into_logits(torch.nn.Sequential(torch.nn.Flatten()), 1.0, np.zeros(3), torch.randn(2, 8))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from simulations.synth import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("site"), cases=24, sites=2, shape=32, seed=5,
                           workers=1, progress=False, tasks=("grading",))


def test_fit_folds_the_validation_calibration_into_the_returned_model(site: Path, tmp_path: Path) -> None:
    """fit(calibrate=True) returns the same trained network with the map fitted on the validation
    split's probabilities folded in: its probabilities are that map of the uncalibrated ones."""
    spec = TASKS["grading"]
    cohort = read_cohort(site)
    tr, _ = select_samples(spec, cohort, "train")
    va, _ = select_samples(spec, cohort, "val")
    te, _ = select_samples(spec, cohort, "test")
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(16, 16, 16), epochs=2,
                      lr=0.01, cache_dir=str(tmp_path / "c"), augment=False)
    plain, _ = fit(spec, cfg, tr, va, progress=False, log=lambda m: None)
    lines: list[str] = []
    cal, _ = fit(spec, TrainConfig(**{**cfg.__dict__, "calibrate": True}), tr, va, progress=False,
                 log=lines.append)
    assert any(m.startswith(f"calibrated on {len(va)} validation cases") for m in lines)
    val = evaluate_model(plain, va, spec, cfg)
    t, b = fit_logit_calibration(val.probs, val.labels)
    assert abs(t - 1) > 1e-3 or np.abs(b).max() > 1e-3  # a map that changes something
    got = evaluate_model(cal, te, spec, cfg).probs
    np.testing.assert_allclose(got, _apply(evaluate_model(plain, te, spec, cfg).probs, t, b), atol=1e-4)
