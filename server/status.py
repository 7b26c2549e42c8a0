"""What the ServerApp keeps current in RUN_DIR for people watching a run (dashboard, ``tail -f``).

- ``status.json`` (rewritten atomically): run state, the round in progress with its phase and deadline,
  and every site by its ``site-id`` (node config) with its node id, state (connected / checking /
  training / evaluating / done / failed / offline), the reason of a failure and when it was last seen.
- ``sites.log``: one human-readable line per site per round (trained, evaluated, failed and why), plus
  connects, disconnects and the round summary; node ids appear next to site ids so the two can be mapped.
- ``eval_counts.jsonl``: each round's per-site confusion matrices and score histograms (counts only), from
  which the dashboard and the report draw bootstrap confidence intervals.
- ``run_config.json``: the run config the server ran with.

``StatusGrid`` wraps Flower's Grid: it sees every message and reply of the round loop (plain and SecAgg+)
so the loop itself needs no change; ``RunStatus.round_done`` is the loop's ``on_round_end`` hook.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

from shared import contract as R
from shared.config import RunConfig

STATUS_FORMAT = "gliofed-status/1"
HEARTBEAT_PATIENCE = 2  # Flower's SuperLink: online_until = last heartbeat + 2 x heartbeat_interval
POLL_S = 10.0  # how often the connected nodes are re-read while a round waits for replies
ACTIVE = {"train": "training", "evaluate": "evaluating", "query": "checking"}
DONE = {"train": "trained", "evaluate": "done", "query": "connected"}


def _kind(message_type: str) -> str:
    return str(message_type).split(".", 1)[0]


def _config_value(msg: Any, key: str) -> Any:
    """``key`` from any ConfigRecord of ``msg`` (Message-API and legacy SecAgg+ messages alike)."""
    try:
        for record in msg.content.config_records.values():
            if key in record:
                return record[key]
    except (AttributeError, TypeError):
        pass
    return None


def _metrics(msg: Any) -> dict[str, Any]:
    """Every entry of the reply's Metric/ConfigRecords (SecAgg+ fit replies use a ConfigRecord)."""
    out: dict[str, Any] = {}
    try:
        for records in (msg.content.config_records, msg.content.metric_records):
            for rec in records.values():
                out.update(rec)
    except (AttributeError, TypeError):
        pass
    return out


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _locked(method):
    @wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


def heartbeat_of(info: Any) -> float | None:
    """Last heartbeat of a node from the SuperLink's NodeInfo (None where the grid has no such data)."""
    until, interval = getattr(info, "online_until", 0.0), getattr(info, "heartbeat_interval", 0.0)
    if until and interval:
        return float(until) - HEARTBEAT_PATIENCE * float(interval)
    return None


class RunStatus:
    """The status file, the per-site log and the evaluation counts of one run."""

    def __init__(self, run: RunConfig, mode: str = "deployment") -> None:
        self.run = run
        self.lock = threading.RLock()  # the grid poller and the round loop both update the status
        self.dir = Path(run.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run_config.json").write_text(json.dumps(run.to_flower(), indent=1))
        self.names: dict[int, str] = {}  # node id -> site id
        self.pending: dict[str, Any] = {}  # per-site counts of the round's evaluation
        now = time.time()
        self.data: dict[str, Any] = {
            "format": STATUS_FORMAT, "mode": mode, "state": "waiting", "reason": "",
            "started": now, "updated": now, "finished": None, "pid": os.getpid(),
            "host": socket.gethostname(),
            "task": run.task, "strategy": run.strategy, "num_rounds": run.num_server_rounds,
            "min_available_nodes": run.min_available_nodes, "round_timeout": run.round_timeout,
            "quorum_timeout": run.quorum_timeout, "resume": run.resume,
            "dp": run.dp, "target_epsilon": run.target_epsilon, "secagg": run.secagg,
            "round": {"number": None, "phase": "waiting for sites", "phase_started": now,
                      "deadline": now + run.quorum_timeout, "started": now},
            "sites": {},
            "site_train": {},  # round -> site -> train metrics (seconds, loss, dp-epsilon, ...)
        }
        if not run.resume:  # a fresh run in an old folder starts its own records
            for stale in ("eval_counts.jsonl", "sites.log"):
                (self.dir / stale).unlink(missing_ok=True)
        self.log(f"run started: task {run.task}, {run.num_server_rounds} rounds, strategy "
                 f"{run.strategy}{' (resumed)' if run.resume else ''}")
        self.save()

    # -- files -------------------------------------------------------------------------------
    def save(self) -> None:
        self.data["updated"] = time.time()
        tmp = self.dir / "status.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.dir / "status.json")

    def log(self, text: str) -> None:
        with (self.dir / "sites.log").open("a", encoding="utf-8") as fh:
            fh.write(f"{_stamp(time.time())} {text}\n")

    # -- sites -------------------------------------------------------------------------------
    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def _site(self, node: int) -> dict[str, Any]:
        return self.data["sites"].setdefault(self.name(node), {
            "node_id": node, "state": "connected", "reason": "", "since": time.time(),
            "last_seen": time.time(), "rounds_trained": 0, "round": None})

    def _set(self, node: int, state: str, reason: str = "") -> dict[str, Any]:
        site = self._site(node)
        site.update(state=state, reason=reason, since=time.time())
        return site

    @_locked
    def learn_name(self, node: int, site_id: str) -> None:
        """A reply named its site: key the site by its site-id from now on."""
        if not site_id or self.names.get(node) == site_id:
            return
        old = self.data["sites"].pop(self.name(node), None)
        self.names[node] = site_id
        site = self._site(node)
        if old:
            site.update({k: v for k, v in old.items() if k != "node_id"})
        self.log(f"site {site_id} is node {node}")

    @_locked
    def seen(self, nodes: list[int], heartbeats: dict[int, float | None] | None = None) -> None:
        """The SuperLink's connected nodes and, in a deployment, each one's last heartbeat."""
        now = time.time()
        for node in nodes:
            site = self._site(node)
            site["last_seen"] = (heartbeats or {}).get(node) or now
            if site["state"] == "offline":
                self._set(node, "connected")
                self.log(f"{self.name(node)} (node {node}) connected again")
        online = set(nodes)
        for name, site in self.data["sites"].items():
            if site["node_id"] not in online and site["state"] != "offline":
                site.update(state="offline", reason="not connected to the SuperLink", since=now)
                self.log(f"{name} (node {site['node_id']}) is offline")
        if self.data["state"] == "waiting" and len(nodes) >= self.run.min_available_nodes:
            self.data["state"] = "running"
        self.save()

    @_locked
    def sent(self, messages: list[Any], timeout: float | None) -> None:
        now = time.time()
        rnd = self.data["round"]
        for msg in messages:
            kind = _kind(msg.metadata.message_type)
            number = _config_value(msg, R.SERVER_ROUND)
            if kind == "train" and number is not None and rnd["number"] != int(number):
                self.round_started(int(number))
            phase = {"train": "training", "evaluate": "evaluating", "query": "checking sites"}
            rnd.update(phase=phase.get(kind, kind), phase_started=now,
                       deadline=now + timeout if timeout else None)
            site = self._set(msg.metadata.dst_node_id, ACTIVE.get(kind, kind))
            site["round"] = rnd["number"]
        self.data["state"] = "running"
        self.save()

    @_locked
    def received(self, messages: list[Any], replies: list[Any], timeout: float | None) -> None:
        now = time.time()
        answered = set()
        # a reply names the message it answers; the SuperLink's own error replies (node unavailable)
        # come from its node id 1, not from the site, so the site is the one the message went to
        sent_to = {mid: m.metadata.dst_node_id for m in messages
                   if (mid := getattr(m.metadata, "message_id", ""))}
        for reply in replies:
            node = sent_to.get(getattr(reply.metadata, "reply_to_message_id", "") or "",
                               reply.metadata.src_node_id)
            answered.add(node)
            kind = _kind(reply.metadata.message_type)
            if reply.has_error():
                self._set(node, "failed", reply.error.reason)
                self.log(f"round {self.data['round']['number']} {self.name(node)}: {kind} failed: "
                         f"{reply.error.reason}")
                continue
            site_id = _config_value(reply, R.SITE_ID)
            metrics = _metrics(reply)
            if site_id is None and R.SITE_ID in metrics:  # SecAgg+ carries it in the fit metrics
                site_id = metrics[R.SITE_ID]
            self.learn_name(node, str(site_id) if site_id is not None else "")
            site = self._set(node, DONE.get(kind, "done"))
            site["last_seen"] = now
            if kind == "train" and R.TRAIN_SECONDS in metrics:
                site["rounds_trained"] += 1
                rnd = str(self.data["round"]["number"])
                self.data["site_train"].setdefault(rnd, {})[self.name(node)] = {
                    k: float(v) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if kind == "evaluate" and R.CONFUSION in metrics:
                self.pending[self.name(node)] = {
                    "num_classes": int(metrics[R.NUM_CLASSES]),
                    "confusion": [int(x) for x in metrics[R.CONFUSION]],
                    "score_hist": [int(x) for x in metrics.get(R.SCORE_HIST, [])]}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                why = (f"no {_kind(msg.metadata.message_type)} reply within round-timeout "
                       f"({timeout:g} s)" if timeout else "no reply")
                self._set(node, "failed", why)
                self.log(f"round {self.data['round']['number']} {self.name(node)}: {why}")
        self.save()

    # -- rounds ------------------------------------------------------------------------------
    def round_started(self, number: int) -> None:
        now = time.time()
        self.data["round"].update(number=number, started=now)

    @_locked
    def round_done(self, rnd: int, row: dict[str, Any]) -> None:
        """The round loop's ``on_round_end``: per-site lines, the counts file, the next round."""
        train = row.get("site_train_seconds") or {}
        for name in sorted(set(train) | set(row.get("sites") or {})):
            parts = []
            if name in train:
                parts.append(f"trained {train[name]:.1f} s")
            ev = (row.get("sites") or {}).get(name)
            if ev:
                shown = ", ".join(f"{k} {v:.3f}" for k, v in ev.items()
                                  if k in ("auc", "balanced_accuracy", "param_mae")
                                  and isinstance(v, float) and math.isfinite(v))
                parts.append(f"evaluated on {int(ev.get(R.NUM_EXAMPLES, 0))} cases"
                             + (f": {shown}" if shown else ""))
            self.log(f"round {rnd} {name}: " + "; ".join(parts))
        pooled = ", ".join(f"{k} {v:.3f}" for k, v in (row.get("pooled") or {}).items()
                           if k in ("auc", "balanced_accuracy", "accuracy", "param_mae")
                           and isinstance(v, float))
        self.log(f"round {rnd} done in {row.get('seconds', 0):.1f} s: {row.get('replied')}/"
                 f"{row.get('sampled')} sites trained; pooled {pooled or 'n/a'}; "
                 f"{row.get('bytes_sent', 0) / 2**20:.1f} MiB sent, "
                 f"{row.get('bytes_received', 0) / 2**20:.1f} MiB received")
        if self.pending:
            with (self.dir / "eval_counts.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"round": rnd, "sites": self.pending}) + "\n")
        self.pending = {}
        now = time.time()
        self.data["last_round"] = rnd
        self.data["round"].update(number=rnd + 1 if rnd < self.run.num_server_rounds else None,
                                  phase="waiting for sites", phase_started=now, started=now,
                                  deadline=now + self.run.quorum_timeout)
        for site in self.data["sites"].values():
            if site["state"] in ("trained", "done", "evaluating", "training", "checking"):
                site["state"] = "connected"
        self.save()

    @_locked
    def finished(self, model_dir: Path | None = None) -> None:
        self.data.update(state="finished", finished=time.time(),
                         model_dir=str(model_dir) if model_dir else None)
        for site in self.data["sites"].values():
            if site["state"] not in ("failed", "offline"):
                site.update(state="done", since=time.time())
        self.data["round"].update(number=None, phase="finished", deadline=None)
        self.log("run finished" + (f"; model exported to {model_dir}" if model_dir else ""))
        self.save()

    @_locked
    def failed(self, err: BaseException) -> None:
        """The run ended without finishing: ``stopped`` (flwr stop, a signal) or ``failed``.

        Only the first call counts: a stop marked by Flower's exit hook is not overwritten when the
        same stop then unwinds the round loop."""
        if self.data.get("state") in ("stopped", "failed", "finished"):
            return
        now = time.time()
        if isinstance(err, (SystemExit, KeyboardInterrupt)):
            state, reason = "stopped", "the server process was stopped (flwr stop or a signal)"
        else:
            state, reason = "failed", f"{type(err).__name__}: {err}"
        self.data.update(state=state, reason=reason, finished=now)
        self.data["round"].update(phase=state, deadline=None)
        for site in self.data["sites"].values():
            if site["state"] in ACTIVE.values():
                site.update(state="stopped", reason=f"run {state} while the site was {site['state']}",
                            since=now)
        self.log(f"run {state}: {reason}")
        self.save()

    def watch(self, grid: Any) -> StatusGrid:
        return StatusGrid(grid, self)

    @contextmanager
    def marked_on_flower_exit(self) -> Iterator[None]:
        """Mark the run stopped as soon as Flower starts to exit (``flwr stop``, SIGINT, SIGTERM).

        Flower's signal handler runs its exit hooks and then kills the process with ``os._exit``
        5 s later, which on a loaded machine can come before ``SystemExit`` reaches the round loop:
        the run would then stay ``running`` in status.json with no ``run stopped`` in sites.log.
        The hook is taken out again when the run ends, so in-process simulations do not collect them.
        """
        try:
            from flwr.supercore.exit import exit_handler as hooks
        except ImportError:  # another Flower layout: the round loop's SystemExit still marks it
            yield
            return

        def hook() -> None:
            self.failed(SystemExit())

        hooks.add_exit_handler(hook, run_before_force_exit=True)
        try:
            yield
        finally:
            with hooks._lock_handlers:
                hooks.registered_exit_handlers[:] = [
                    h for h in hooks.registered_exit_handlers if h.exit_handler is not hook]


class StatusGrid:
    """A Grid view that reports connected nodes, messages and replies to a :class:`RunStatus`.

    While a round waits for replies it re-reads the connected nodes every ``POLL_S`` seconds, so
    heartbeats and sites going offline show during long local training too.
    """

    def __init__(self, grid: Any, status: RunStatus) -> None:
        self._grid = grid
        self.status = status
        self._poll = True

    def _nodes(self) -> list[int]:
        get_nodes = getattr(self._grid, "get_nodes", None)
        if get_nodes is not None:
            infos = list(get_nodes())
            nodes = [int(i.node_id) for i in infos]
            self.status.seen(nodes, {int(i.node_id): heartbeat_of(i) for i in infos})
        else:
            nodes = list(self._grid.get_node_ids())
            self.status.seen(nodes)
        return nodes

    def get_node_ids(self) -> list[int]:
        return self._nodes()

    def _poller(self, done: threading.Event) -> None:
        while not done.wait(POLL_S) and self._poll:
            try:
                self._nodes()
            except Exception:  # noqa: BLE001 - a view must never break the run: stop polling
                self._poll = False

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        self.status.sent(messages, timeout)
        done = threading.Event()
        poller = threading.Thread(target=self._poller, args=(done,), daemon=True)
        poller.start()
        try:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        finally:
            done.set()
            poller.join(timeout=POLL_S)
        self.status.received(messages, replies, timeout)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """``status.json`` of a run folder, or None (absent or being replaced)."""
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
