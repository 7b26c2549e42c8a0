"""Run a site daemon (the Flower SuperNode) so that stopping it stops everything it started.

Why: Flower 1.41's SuperNode starts ``flower-superexec``, which starts one ``flwr-clientapp`` per task,
all in the SuperNode's process group. Each only watches its parent with ``os.kill(parent_pid, 0)``
(``flwr/supercore/app_utils.py``) and then raises SIGINT in itself. Measured here: after SIGTERM to a
SuperNode, its SuperExec exited but its ``flwr-clientapp`` was still running 30 s later, retrying the
dead SuperNode's runtime API; and an exited parent that nobody reaps stays a zombie, which still
answers ``kill(pid, 0)``, so where orphans are not reaped the watch never fires at all.

``supervise(cmd)`` makes itself the child subreaper (Linux ``prctl``), starts ``cmd`` in a new process
group, forwards SIGTERM/SIGINT/SIGHUP to the whole group, reaps every orphan it adopts (so the
parent-watch of the Flower processes fires), and when the daemon ends it signals what is left of the
group: SIGTERM, then SIGKILL after ``grace`` seconds. ``gliofed deploy supervise -- CMD ...`` is the
command the systemd unit and the Docker entrypoint run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def become_subreaper() -> bool:
    """Adopt orphaned descendants instead of PID 1 (Linux >= 3.4); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _killpg(pgid: int, sig: int) -> bool:
    """Signal the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _reap() -> None:
    """Collect every child that has exited (adopted orphans included), without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _group_alive(pgid: int) -> bool:
    _reap()
    return _killpg(pgid, 0)


def end_group(pgid: int, grace: float, poll: float = 0.2) -> None:
    """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    if not _killpg(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(poll)
    _killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(poll)


def supervise(cmd: Sequence[str], grace: float = 20.0) -> int:
    """Run ``cmd`` until it exits or a stop signal comes; leave none of its processes behind.

    Returns the daemon's exit code, or 0 when it ended because it was asked to stop.
    """
    if not cmd:
        raise ValueError("supervise: no command given (gliofed deploy supervise -- CMD ARGS...)")
    become_subreaper()
    child = subprocess.Popen(list(cmd), process_group=0)
    pgid = child.pid
    stop: list[int] = []

    def forward(signum, _frame) -> None:
        stop.append(signum)
        _killpg(pgid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    code: int | None = None
    try:
        while code is None:
            try:
                pid, status = os.waitpid(-1, 0)  # the daemon, or an adopted orphan
            except ChildProcessError:
                code = child.returncode if child.returncode is not None else 0
                break
            if pid == child.pid:
                code = os.waitstatus_to_exitcode(status)
        child.returncode = code
        end_group(pgid, grace)
        _reap()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop else int(code)
