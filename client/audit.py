"""The site's append-only audit log: one JSON line per request served, refused or failed.

Each line records when, which run (Flower run id), the request kind, task and round, the outcome, the
policy rule that refused it (if any), the error reply sent, and *what was sent*: per record its name,
type, size in bytes and, for metric and config records, the key names (never values, never case data);
plus the epsilon the site has spent when the reply carried one. Lines are appended under a file lock
with ``O_APPEND`` and fsync'd, so concurrent runs never interleave or lose a line.

Where: ``<state>/audit/<site-id>.jsonl`` next to the privacy ledger's folder (``$GLIOFED_PRIVACY_DIR``
or ``~/.local/state/gliofed/privacy``); a simulated site's log lives in ``RUN_DIR/audit/``.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from shared.config import NodeConfig, RunConfig


def audit_path(node: NodeConfig, run: RunConfig | None = None) -> Path:
    """The audit log of this site (a simulated site's belongs to its run folder)."""
    from client.privacy import ledger_path

    if node.partition_id >= 0 and run is not None:
        return Path(run.run_dir) / "audit" / f"site-{node.partition_id}.jsonl"
    ledger = ledger_path(node.site_id or "site")
    return ledger.parent.parent / "audit" / ledger.with_suffix(".jsonl").name


def describe_records(content: Any) -> dict[str, dict[str, Any]]:
    """Per record of a reply: type, bytes and (metrics / config) key names; never values."""
    out: dict[str, dict[str, Any]] = {}
    for name, record in content.items():
        kind = type(record).__name__
        if kind == "ArrayRecord":
            arrays = {k: record[k] for k in record}
            out[name] = {"type": "arrays", "tensors": len(arrays),
                         "bytes": int(sum(len(a.data) for a in arrays.values()))}
        else:
            items = dict(record)
            out[name] = {"type": "metrics" if kind == "MetricRecord" else "config",
                         "keys": sorted(items), "bytes": len(json.dumps(items, default=str))}
    return out


def append(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line (locked, O_APPEND, fsync'd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def record_request(node: NodeConfig, run: RunConfig | None, *, kind: str, run_id: Any,
                   server_round: Any, outcome: str, content: Any = None, reason: str = "",
                   rule: str = "") -> dict[str, Any]:
    """Write the audit line of one request; returns it."""
    entry: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "run_id": str(run_id), "kind": kind,
                             "task": run.task if run is not None else "",
                             "round": server_round, "outcome": outcome, "site": node.site_id}
    if rule:
        entry["rule"] = rule
    if reason:
        entry["reply_error"] = reason
    if content is not None:
        entry["sent"] = describe_records(content)
        metrics = content.get("metrics", {})
        if "dp-epsilon" in metrics:
            entry["epsilon"] = float(metrics["dp-epsilon"])
    append(audit_path(node, run), entry)
    return entry


def read_log(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per request kind and outcome, refusals per rule, runs, bytes sent, last epsilon."""
    eps = [e["epsilon"] for e in entries if "epsilon" in e]
    return {
        "requests": len(entries),
        "by_kind_outcome": dict(Counter(f"{e['kind']} {e['outcome']}" for e in entries)),
        "refused_by_rule": dict(Counter(e["rule"] for e in entries if e.get("rule"))),
        "runs": sorted({e["run_id"] for e in entries}),
        "bytes_sent": int(sum(r.get("bytes", 0) for e in entries
                              for r in e.get("sent", {}).values())),
        "epsilon_spent": eps[-1] if eps else 0.0,
        "first": entries[0]["time"] if entries else "",
        "last": entries[-1]["time"] if entries else "",
    }


def _server_round(content: Any) -> Any:
    for record in content.config_records.values():
        if "server-round" in record:
            return record["server-round"]
    return None


def enforced(kind: str, msg: Any, ctx: Any, call: Any, configs: Any, reason_of: Any,
             secagg_message: bool = False) -> Any:
    """Take the configs (``configs(ctx)``, the node's already tightened by the policy), check the
    request against the site policy, run ``call(run, node)``, write the audit line.

    Returns what ``call`` returns (a RecordDict, or the Message of a delegated app); any exception is
    audited (``refused`` for a policy rule, else ``failed``) and raised again for the error reply.
    """
    from client.policy import REQUEST, PolicyRefused, SitePolicy, check_request, load_policy

    run = node = None
    rnd = _server_round(msg.content)
    try:
        run, node = configs(ctx)
        config = msg.content.get("config", None)
        policy = load_policy(node.data_path) if node.data_path else SitePolicy()
        check_request(policy, kind, run, node, config, secagg_message)
        token = REQUEST.set((policy, str(ctx.run_id)))
        try:
            out = call(run, node)
        finally:
            REQUEST.reset(token)
    except Exception as err:
        if node is not None:
            record_request(node, run, kind=kind, run_id=ctx.run_id, server_round=rnd,
                                 outcome="refused" if isinstance(err, PolicyRefused) else "failed",
                                 reason=reason_of(err), rule=getattr(err, "rule", ""))
        raise
    content, reason = out, ""
    if hasattr(out, "has_error"):  # the Message of a delegated (SecAgg+) app
        content = None if out.has_error() else out.content
        reason = out.error.reason if out.has_error() else ""
    record_request(node, run, kind=kind, run_id=ctx.run_id, server_round=rnd,
                         outcome="served", content=content, reason=reason)
    return out
