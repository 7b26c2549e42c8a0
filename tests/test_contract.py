"""The message contract: weights survive the converters bit for bit; what both sides read off a message."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from shared.contract import (
    CONFIG,
    METRICS,
    SITE_ID,
    is_number,
    numpy_weights,
    payload_bytes,
    site_of,
    state_dict,
)


def _as_server() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def test_weights_round_trip_bit_for_bit_from_a_model_a_state_dict_or_numpy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3), torch.nn.BatchNorm3d(3))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    from_model = ArrayRecord(state_dict(model))
    weights = numpy_weights(from_model)
    assert list(weights) == list(original)  # key order kept
    assert weights["1.num_batches_tracked"].dtype == np.int64
    strided = {k: np.asfortranarray(v) if v.ndim > 1 else v for k, v in weights.items()}
    again = ArrayRecord(state_dict(strided)).to_torch_state_dict()
    assert all(torch.equal(again[k], original[k]) for k in original)
    assert numpy_weights(model.state_dict())["0.weight"].tobytes() == weights["0.weight"].tobytes()


def test_payload_bytes_site_of_and_is_number():
    _as_server()
    empty_list = ConfigRecord({"shares": [], "round": 1})  # Flower 1.41 cannot count this one
    msg = Message(RecordDict({CONFIG: empty_list, METRICS: MetricRecord({"loss": 0.5})}),
                  dst_node_id=7, message_type="train")
    expected = ConfigRecord({"round": 1}).count_bytes() + MetricRecord({"loss": 0.5}).count_bytes()
    assert payload_bytes([msg, msg]) == 2 * expected
    named = Message(RecordDict({CONFIG: ConfigRecord({SITE_ID: "hosp-a"})}), dst_node_id=7,
                    message_type="train")
    assert site_of(named) == "hosp-a"
    assert site_of(msg) == f"node-{msg.metadata.src_node_id}"  # no site-id: the node id
    assert [is_number(v) for v in (1, 0.5, True, "1", None)] == [True, True, False, False, False]
