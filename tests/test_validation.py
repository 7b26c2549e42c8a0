"""Update validation before aggregation: malformed and outlying updates are rejected with a reason."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.validation import check_update, norm_outliers, reference_shapes, validate_replies
from shared.config import RunConfig

RUN = RunConfig.from_flower({"task": "grading", "network": "small_cnn", "input-size": 16,
                             "validate-updates": True})


def _reply(site: str, weights: dict[str, np.ndarray]) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # act as the server
    content = RecordDict({"arrays": _record(weights),
                          "metrics": MetricRecord({"num-examples": 10}),
                          "config": ConfigRecord({"site-id": site})})
    return Message(content=content, dst_node_id=0, message_type="train")


def _record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in reference_shapes(RUN).items()}


def test_check_update_reasons() -> None:
    ref = {"a": (2, 3), "b": (4,)}
    ok = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    assert check_update(ok, ref) is None
    assert check_update({"a": ok["a"]}, ref).startswith("wrong keys (missing ['b']")
    assert check_update({**ok, "c": ok["b"]}, ref).startswith("wrong keys (missing [], unexpected ['c']")
    assert check_update({**ok, "b": np.zeros(5, np.float32)}, ref) == "wrong shape for b: (5,) instead of (4,)"
    bad = {**ok, "a": np.full((2, 3), np.nan, np.float32)}
    assert check_update(bad, ref) == "NaN/Inf in a"


def test_norm_outliers() -> None:
    assert norm_outliers([1.0, 1.1, 0.9, 1.05, 30.0]) == [4]
    assert norm_outliers([1.0, 1.2, 0.8, 1.1, 1.3]) == []
    assert norm_outliers([1.0, 50.0]) == []  # two updates: nothing to compare against


def test_validate_replies_drops_bad_sites_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    g = _global()
    rng = np.random.default_rng(1)
    honest = [{k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in g.items()}
              for _ in range(4)]
    key = next(iter(g))
    nan = {**honest[0], key: np.full(g[key].shape, np.inf, np.float32)}
    flipped = {k: g[k] - 50 * (honest[1][k] - g[k]) for k in g}  # scaled sign-flipped update
    wrong = {**honest[2], key: np.zeros((3, 3), np.float32)}
    replies = [_reply(f"s{i}", w) for i, w in enumerate(honest)] + [
        _reply("nan-site", nan), _reply("attacker", flipped), _reply("broken", wrong)]
    with caplog.at_level(logging.WARNING):
        ok = validate_replies(replies, RUN, _record(g))
    assert [m.content["config"]["site-id"] for m in ok] == ["s0", "s1", "s2", "s3"]
    text = caplog.text
    assert f"rejected update from nan-site: NaN/Inf in {key}" in text
    assert "rejected update from attacker: update norm" in text
    assert "rejected update from broken: wrong shape" in text
