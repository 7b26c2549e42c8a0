"""Waiting for sites with a deadline, and asking them whether they can take part.

Flower's ``sample_nodes`` waits forever for ``min_available_nodes``; here the wait ends after
``quorum-timeout`` seconds and the run either proceeds with whoever is connected or stops with a clear
message. Only sites whose query reply shows eligible cases for the task are sampled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared.config import RunConfig
from shared.contract import ELIGIBLE, payload_bytes

log = logging.getLogger(__name__)


class QuorumError(RuntimeError):
    """The quorum was not reached before the deadline and the run is configured to stop."""


def wait_for_quorum(grid: Grid, run: RunConfig, sleep_s: float = 0.5) -> list[int]:
    """Connected node ids once ``min-available-nodes`` are there or ``quorum-timeout`` has passed."""
    deadline = time.monotonic() + run.quorum_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= run.min_available_nodes:
            return nodes
        if time.monotonic() >= deadline:
            msg = (
                f"quorum not reached: {len(nodes)} of {run.min_available_nodes} sites connected "
                f"after {run.quorum_timeout:g} s"
            )
            if run.quorum_action == "stop" or not nodes:
                raise QuorumError(msg)
            log.warning("%s; proceeding with the %d connected", msg, len(nodes))
            return nodes
        time.sleep(sleep_s)


def query_eligibility(
    grid: Grid, nodes: Iterable[int], run: RunConfig
) -> tuple[dict[int, dict[str, int]], int, int]:
    """Ask ``nodes`` for their eligible counts: ({node: counts}, bytes sent, bytes received).

    Nodes that reply with an error (no data, bad folder) or not at all are left out.
    """
    messages = [
        Message(
            RecordDict(),  # the site knows the task from the run config
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=run.round_timeout)) if messages else []
    eligible: dict[int, dict[str, int]] = {}
    for msg in replies:
        if msg.has_error():
            log.warning("site %s cannot take part: %s", msg.metadata.src_node_id, msg.error.reason)
            continue
        counts = {k: int(v) for k, v in msg.content[ELIGIBLE].items()}
        eligible[msg.metadata.src_node_id] = counts
    return eligible, payload_bytes(messages), payload_bytes(replies)


class SubsetGrid:
    """A Grid view that only shows ``node_ids`` to the strategy's sampler (everything else passes)."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._nodes = sorted(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
