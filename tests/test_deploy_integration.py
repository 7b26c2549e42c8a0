"""Real deployment on 127.0.0.1: a TLS SuperLink with node authentication and two SuperNode sites.

Marked ``integration`` (run by ``make test-integration`` and CI). Every process is started in its own
session and killed by its process-group id at the end, even when an assertion fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.pki import make_deploy_keys
from tests.fl_helpers import write_tiny_cohort

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Start processes in their own sessions; stop them all by their ids."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(tmp / "flwr-home"), "GLIOFED_CACHE": str(tmp / "cache")}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, env=self.env,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(pred, timeout: float, what: str, detail=None) -> None:
    """Poll ``pred``; on time-out say what was awaited and, with ``detail``, what was seen instead."""
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        time.sleep(0.5)
    seen = f"; seen: {detail()}" if detail else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")


@pytest.fixture()
def federation(tmp_path: Path):
    procs = Procs(tmp_path)
    keys = make_deploy_keys(tmp_path / "pki", ["localhost", "127.0.0.1"], ["hosp-a", "hosp-b", "rogue"])
    port = free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "hospital-net"\n\n[superlink.hospital-net]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{keys.ca_cert}"\n')
    app = tmp_path / "app"  # `flwr run` packs (and may rewrite) the app dir: never the repo itself
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "tests", "benchmarks", "__pycache__", "*.egg-info", "docs", "deploy"))
    try:
        procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(keys.ca_cert),
            "--ssl-certfile", str(keys.server_cert), "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth", "--database", str(tmp_path / "state.db"),
            "--disable-runtime-dependency-installation", "--port", str(port)])
        wait_for(lambda: "Application startup complete" in procs.log("superlink"), 60, "SuperLink")
        for site in ("hosp-a", "hosp-b"):
            r = procs.flwr("supernode", "register", str(keys.site_keys[site][1]), "hospital-net")
            assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout + r.stderr
        sites = {s: write_tiny_cohort(tmp_path / "data" / s, n_cases=16, seed=i, site=s)
                 for i, s in enumerate(("hosp-a", "hosp-b"))}

        def start_site(site: str, key: str | None = None, ca: bool = True, retries: int = 0):
            # as the systemd unit and the Docker entrypoint run it: under `gliofed deploy supervise`
            args = [str(BIN / "gliofed"), "deploy", "supervise", "--grace", "10", "--",
                    str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                    "--auth-supernode-private-key", str(keys.site_keys[key or site][0]),
                    # a few test cases per site: below the default min-report-cases (10) every
                    # metric would be withheld (that rule has its own tests)
                    "--node-config",
                    f'data-path="{sites.get(site, tmp_path)}" site-id="{site}" min-report-cases=1',
                    "--port", str(free_port())]
            if ca:
                args += ["--root-certificates", str(keys.ca_cert)]
            if retries:
                args += ["--max-retries", str(retries)]
            return procs.start(site, args)

        yield procs, app, keys, start_site
    finally:
        procs.stop_all()


def _run(procs: Procs, app: Path, run_dir: Path, rounds: int, extra: str = "") -> subprocess.CompletedProcess:
    cfg = (f"num-server-rounds={rounds} run-dir='{run_dir}' input-size=16 network='small_cnn' "
           f"min-available-nodes=2 quorum-timeout=20 round-timeout=120 batch-size=4 {extra}")
    return procs.flwr("run", str(app), "hospital-net", "--stream", "-c", cfg, timeout=900)


def _session(sid: int) -> list[str]:
    """Live (not zombie) processes of session ``sid``: what a site started."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(f"{d.name} {cmd[:120]}")
    return out


def _rounds(run_dir: Path) -> list[dict]:
    p = run_dir / "rounds.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_tls_federation_with_authenticated_sites(federation, tmp_path: Path) -> None:
    procs, app, _keys, start_site = federation
    start_site("hosp-a")
    start_site("hosp-b")
    # An unregistered key is refused, and so is a client that does not trust our CA.
    rogue = start_site("rogue", retries=1)
    noca = start_site("noca", key="hosp-a", ca=False, retries=1)
    rogue.wait(timeout=120)
    noca.wait(timeout=120)
    assert "Failed to activate SuperNode" in procs.log("rogue")
    assert "CERTIFICATE_VERIFY_FAILED" in procs.log("noca")
    listed = {"out": ""}

    def both_online() -> bool:  # a site can still be between registered and online (CI: one was)
        listed["out"] = procs.flwr("supernode", "list", "hospital-net").stdout
        return listed["out"].count("online") == 2

    wait_for(both_online, 120, "hosp-a and hosp-b online", lambda: listed["out"])

    run_dir = tmp_path / "run"
    r = _run(procs, app, run_dir, rounds=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _rounds(run_dir)
    assert [x["round"] for x in rows] == [1, 2] and all(x["replied"] == 2 for x in rows)
    meta = json.loads((run_dir / "model" / "configs" / "metadata.json").read_text())
    assert meta["task"] == "grading" and meta["provenance"]["rounds"] == 2
    # sites are named by their site-id everywhere; the ServerApp writes the report and the site log
    assert all(set(x["sites"]) == {"hosp-a", "hosp-b"} for x in rows)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and set(status["sites"]) == {"hosp-a", "hosp-b"}
    log = (run_dir / "sites.log").read_text()
    for site in ("hosp-a", "hosp-b"):
        assert re.search(rf"site {site} is node {status['sites'][site]['node_id']}\n", log), log
        assert f"round 2 {site}: trained " in log
    report = (run_dir / "report.html").read_text()
    assert "A deployed federation" in report and "hosp-a" in report and "hosp-b" in report

    # Restarting the ServerApp with resume continues after the last completed round.
    r = _run(procs, app, run_dir, rounds=3, extra="resume=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["round"] for x in _rounds(run_dir)] == [1, 2, 3]

    # Killing one site mid-run: the run finishes with the other (quorum deadline + round timeout).
    run2 = tmp_path / "run2"
    cfg = (f"num-server-rounds=3 run-dir='{run2}' input-size=16 network='small_cnn' "
           "min-available-nodes=2 quorum-timeout=5 round-timeout=180 batch-size=4")
    runner = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "hospital-net", "--stream", "-c", cfg],
                              cwd=tmp_path, env=procs.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs.procs["run2"] = runner
    wait_for(lambda: len(_rounds(run2)) >= 1, 300, "round 1 of the second run")
    procs.stop("hosp-b")
    out, _ = runner.communicate(timeout=900)
    assert runner.returncode == 0, out[-3000:]
    rows = _rounds(run2)
    assert [x["round"] for x in rows] == [1, 2, 3]
    assert rows[-1]["replied"] == 1
    assert (run2 / "model" / "models" / "model.pt").is_file()
    assert "hosp-b (node " in (run2 / "sites.log").read_text()  # the killed site went offline


def test_a_stopped_run_leaves_no_process_at_the_sites(federation, tmp_path: Path) -> None:
    """`flwr stop` on a run whose sites are training, then the sites stop their daemons (SIGTERM to
    the supervisor only, as systemd or `docker stop` would): no site process may be left behind."""
    procs, app, _keys, start_site = federation
    start_site("hosp-a")
    start_site("hosp-b")
    run3 = tmp_path / "run3"
    cfg = (f"num-server-rounds=3 run-dir='{run3}' input-size=16 network='small_cnn' "
           "min-available-nodes=2 quorum-timeout=60 round-timeout=600 batch-size=4 local-epochs=300")
    r = procs.flwr("run", str(app), "hospital-net", "-c", cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_id = re.search(r"run (\d+)", r.stdout).group(1)
    wait_for(lambda: '"state": "training"' in (run3 / "status.json").read_text()
             if (run3 / "status.json").is_file() else False, 300, "sites training in run 3")
    r = procs.flwr("stop", run_id, "hospital-net")
    assert r.returncode == 0, r.stdout + r.stderr
    from server.dashboard.data import RunView

    def seen() -> str:
        snap = RunView(run3).snapshot()
        log = (run3 / "sites.log").read_text()[-800:] if (run3 / "sites.log").is_file() else ""
        return f"state {snap['state']!r}, status {snap['status']}, sites.log ...{log}"

    wait_for(lambda: RunView(run3).snapshot()["state"] == "stopped", 120,
             "the dashboard to show run 3 stopped", seen)
    assert "run stopped" in (run3 / "sites.log").read_text()
    for site in ("hosp-a", "hosp-b"):
        supervisor = procs.procs.pop(site)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        wait_for(lambda sid=supervisor.pid: not _session(sid), 30, f"{site}'s processes to end")
