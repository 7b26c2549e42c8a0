"""Bootstrap confidence intervals reported by the accuracy benchmarks."""

from __future__ import annotations

import numpy as np

from shared.training.metrics import bootstrap_ci, per_class_recall


def test_bootstrap_ci_is_a_point_for_perfect_predictions_and_wide_for_a_coin():
    classes = ("a", "b")
    labels = np.array([0, 1] * 20)
    perfect = np.eye(2)[labels]
    assert bootstrap_ci(labels, perfect, classes, "accuracy", n_boot=200) == (1.0, 1.0)
    assert bootstrap_ci(labels, perfect, classes, "auc", n_boot=200) == (1.0, 1.0)
    coin = np.eye(2)[np.random.default_rng(0).integers(0, 2, 40)]
    lo, hi = bootstrap_ci(labels, coin, classes, "accuracy", n_boot=500)
    assert lo < 0.5 < hi and hi - lo > 0.2


def test_per_class_recall_names_each_class():
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 0]]
    assert per_class_recall(labels, probs, ("x", "y", "z")) == {"x": 0.5, "y": 1.0, "z": 0.0}
