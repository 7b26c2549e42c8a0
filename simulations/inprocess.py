"""An in-process federation: the real round loop and the real ClientApp, no Ray.

``simulations.runner.simulate`` starts a Ray cluster per run; a sweep of dozens of runs pays that
start-up each time (and on a loaded machine Ray's start-up can time out). :class:`InProcessGrid` is a
Flower Grid that hands each message to a ClientApp in this process, one site after the other, each with
its own Flower ``Context`` (``ctx.state`` lasts across rounds, as on a SuperNode). Only the transport
differs from a simulation; every number a round logs is computed the same way. The tests use it too
(``tests/fl_helpers.LocalGrid``), with nodes that can be taken offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InProcessGrid:
    """A Flower Grid whose nodes are ``client_app`` called in this process.

    ``node_configs`` maps node id -> node config. Nodes in ``offline`` are not listed and never answer.
    ``sent`` keeps every message, ``replies`` every reply, ``exchanges`` each (message, reply) pair;
    with ``keep_arrays = False`` they are kept without their ArrayRecords (a resnet10 is 57 MB: twelve
    rounds of five sites kept whole filled 6 GB and the kernel killed the run).
    """

    def __init__(self, node_configs: dict[int, dict[str, Any]], client_app: Any,
                 run_config: dict[str, Any], keep_arrays: bool = True) -> None:
        from flwr.app import RecordDict

        self.keep_arrays = keep_arrays
        self.client_app = client_app
        self.run_config = run_config
        self.node_configs = dict(node_configs)
        self.states = {n: RecordDict() for n in self.node_configs}
        self.offline: set[int] = set()
        self.sent: list[Any] = []
        self.replies: list[Any] = []
        self.exchanges: list[tuple[Any, Any]] = []
        self._identity(0, 0)

    @classmethod
    def for_sites(cls, num_sites: int, client_app: Any, run_config: dict[str, Any],
                  min_report_cases: int = 1, keep_arrays: bool = True) -> InProcessGrid:
        """Nodes 100, 101, ... with the node configs a simulation gives its sites."""
        return cls({100 + i: {"partition-id": i, "num-partitions": num_sites,
                              "min-report-cases": min_report_cases} for i in range(num_sites)},
                   client_app, run_config, keep_arrays)

    def _kept(self, msg: Any) -> Any:
        """``msg`` as the logs keep it: whole, or without its ArrayRecords."""
        from flwr.app import ArrayRecord, Message, RecordDict

        if self.keep_arrays or msg.has_error():
            return msg
        content = RecordDict({k: v for k, v in msg.content.items() if not isinstance(v, ArrayRecord)})
        return Message(content=content, metadata=msg.metadata)

    @staticmethod
    def _identity(node_id: int, task_id: int) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node_id, task_id

    def get_node_ids(self) -> list[int]:
        return [n for n in self.node_configs if n not in self.offline]

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Context

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            kept = self._kept(msg)
            self.sent.append(kept)
            if node in self.offline:
                continue
            self._identity(node, 1)  # the reply is built as that node
            try:
                ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node],
                              state=self.states[node], run_config=self.run_config)
                reply = self.client_app(msg, ctx)
            finally:
                self._identity(0, 0)
            replies.append(reply)
            self.replies.append(self._kept(reply))
            self.exchanges.append((kept, self.replies[-1]))
        return replies


def site_grid(spec: Any, run: Any, num_sites: int) -> InProcessGrid:
    """``num_sites`` simulated sites running ``run``'s ClientApp, logging messages without weights."""
    from client.app import make_client_app

    app = make_client_app(run, {"min-report-cases": spec.min_report_cases})
    return InProcessGrid.for_sites(num_sites, app, run.to_flower(), spec.min_report_cases,
                                   keep_arrays=False)


def serve_inprocess(spec: Any, run: Any, num_sites: int) -> Path:
    """What the Ray engine's ServerApp does (round loop, model export, report), with the sites answering
    in this process; for ``simulate`` with ``spec.engine = "inprocess"``. Returns the MODEL_DIR."""
    from server.app import serve

    return serve(site_grid(spec, run, num_sites), run)
