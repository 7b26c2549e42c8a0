"""An in-process federation for benchmarks: the real round loop and the real ClientApp, no Ray.

``simulations.runner.simulate`` starts a Ray cluster per run; on a loaded shared machine Ray's start-up
times out ("The current node timed out during startup"), and a sweep of dozens of runs pays its start-up
each time. :func:`run_inprocess` prepares the same sites (``simulations.runner.prepare_sites``: same
cohort, partition and run config as ``gliofed simulate``) and runs ``server.rounds.run_rounds`` with a
Grid that hands each message to the ClientApp of ``client.app`` in this process, one site after the
other, each with its own Flower ``Context`` (``ctx.state`` lasts across rounds, as on a SuperNode).
Only the transport differs from a simulation; every number a round logs is computed the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApps called in this process (node ids 100, 101, ...)."""

    def __init__(self, num_sites: int, client_app: Any, run_config: dict[str, Any],
                 min_report_cases: int = 1) -> None:
        from flwr.app import RecordDict

        self.app = client_app
        self.run_config = run_config
        self.node_configs = {100 + i: {"partition-id": i, "num-partitions": num_sites,
                                       "min-report-cases": min_report_cases}
                             for i in range(num_sites)}
        self.states = {n: RecordDict() for n in self.node_configs}
        self.exchanges: list[tuple[Any, Any]] = []  # every (message, reply), for counting
        self._identity(0, 0)

    @staticmethod
    def _identity(node_id: int, task_id: int) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node_id, task_id

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Context

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self._identity(node, 1)  # the reply is built as that node
            try:
                ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node],
                              state=self.states[node], run_config=self.run_config)
                replies.append(self.app(msg, ctx))
            finally:
                self._identity(0, 0)
            self.exchanges.append((msg, replies[-1]))
        return replies


def federation_args(ap: Any) -> Any:
    """The benchmark federation's options on ``ap`` (an argparse parser): 5 sites, Dirichlet 0.5 label
    skew, 3 rounds of 2 local epochs, 160 synthetic cases at 32^3."""
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--size", type=int, default=32)
    return ap


def ensure_cohort(cohort: Path, spec: Any) -> Path:
    """``cohort``, generated first (as ``gliofed simulate`` would for ``spec``) when it holds none, so
    that several runs share one cohort."""
    if not (cohort / "cohort.csv").is_file():
        from simulations.synth import generate_cohort

        generate_cohort(cohort, cases=spec.cases, sites=max(spec.sites, 2), shape=spec.size,
                        tasks=[spec.task], seed=spec.seed)
    return cohort


def run_inprocess(spec: Any) -> tuple[list[dict[str, Any]], InProcessGrid]:
    """Prepare ``spec``'s sites and run its federation in process; returns the round rows (also in
    ``spec.out/rounds.jsonl``) and the grid. ``spec`` is a ``simulations.runner.SimulationSpec``."""
    from client.app import make_client_app
    from server.rounds import run_rounds
    from simulations.runner import prepare_sites, run_config_for

    sites_root, _, part = prepare_sites(spec, echo=lambda *a: None)
    run = run_config_for(spec, sites_root)
    for stale in ("rounds.jsonl", "checkpoints/last.json", "summary.json"):
        (Path(spec.out) / stale).unlink(missing_ok=True)
    app = make_client_app(run, {"min-report-cases": spec.min_report_cases})
    grid = InProcessGrid(len(part.sites), app, run.to_flower(), spec.min_report_cases)
    return run_rounds(grid, run).rounds, grid
