"""`gliofed dashboard`: the JSON API, files, token, server-sent events, and the page in real Chromium.

The browser tests use headless Chromium (Debian package ``chromium``; ``.ci/run`` installs it) and skip
with the reason when it is absent. Screenshots go to the test's folder, or to $GLIOFED_SCREENSHOT_DIR.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from server.dashboard.app import check_bind, create_app

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium; "
                             ".ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The dashboard on uvicorn in a background thread (a real ASGI server on a free port)."""

    def __init__(self, run_dir: Path, token: str | None = None) -> None:
        import uvicorn

        self.port = _free_port()
        config = uvicorn.Config(create_app(run_dir, token, poll_s=0.2), host="127.0.0.1",
                                port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def chromium(url: str, shot: Path) -> str:
    """The rendered DOM of ``url`` (after its scripts ran) and a screenshot at ``shot``."""
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--timeout=6000", "--window-size=1300,1500"]
    # --timeout, not --virtual-time-budget: the page keeps an event stream open, which would stall
    # virtual time; the page renders its first snapshot well within the 6 s
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)
    out_dir = os.environ.get("GLIOFED_SCREENSHOT_DIR")
    if out_dir:
        shutil.copy(shot, Path(out_dir) / shot.name)
    return dom


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_api_snapshot_of_a_finished_run(finished_run):
    snap = TestClient(create_app(finished_run)).get("/api/run").json()
    assert snap["state"] == "finished" and snap["task"] == "grading" and snap["headline"] == "auc"
    assert [r["round"] for r in snap["rounds"]] == [1, 2] and snap["num_rounds"] == 2
    sites = snap["status"]["sites"]
    assert sites["hosp-a"]["node_id"] == "101" and sites["node-303"]["state"] == "failed"
    lo, hi = snap["cis"]["2"]["pooled"]["accuracy"]
    assert lo <= snap["rounds"][-1]["pooled"]["accuracy"] <= hi
    chosen = json.loads((finished_run / "checkpoints" / "best.json").read_text())  # model selection
    assert snap["best"]["round"] == chosen["round"] and snap["best"]["source"] == "checkpoints/best.json"
    assert snap["links"] == {"report": True, "model": True, "sites_log": True}
    assert any(c["name"].startswith("round-0002") and c["bytes"] > 0 for c in snap["checkpoints"])


def test_best_round_is_the_servers_selection_when_it_wrote_one(finished_run, tmp_path):
    from server.dashboard.data import RunView

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / "best.json").write_text('{"round": 1}')
    best = RunView(run).snapshot()["best"]
    assert best["round"] == 1 and best["source"] == "checkpoints/best.json"
    assert best["value"] == _rows(run)[0]["pooled"]["auc"]
    (run / "checkpoints" / "best.json").unlink()  # no selection written: the best logged round
    best = RunView(run).snapshot()["best"]
    aucs = [r["pooled"]["auc"] for r in _rows(run)]
    assert best["source"] == "rounds.jsonl" and best["round"] == 1 + aucs.index(max(aucs))


def test_files_are_served_read_only_and_only_from_the_run_folder(finished_run):
    client = TestClient(create_app(finished_run))
    assert "hosp-a" in client.get("/files/report.html").text
    assert "round 2 hosp-b: trained" in client.get("/files/sites.log").text
    zf = zipfile.ZipFile(io.BytesIO(client.get("/files/model.zip").content))
    assert "model/configs/metadata.json" in zf.namelist()
    assert client.get("/files/run_config.json").json()["task"] == "grading"
    assert client.get("/files/last.pt").status_code == 404
    assert client.get("/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.post("/api/run").status_code == 405
    assert client.get("/static/charts.js").status_code == 200


def test_token_is_required_and_binding_off_loopback_needs_one(finished_run):
    client = TestClient(create_app(finished_run, token="s3cret"))
    assert client.get("/api/run").status_code == 401
    assert client.get("/?token=wrong").status_code == 401
    assert client.get("/?token=s3cret").status_code == 200  # sets the cookie
    assert client.get("/api/run").json()["state"] == "finished"
    fresh = TestClient(create_app(finished_run, token="s3cret"))
    assert fresh.get("/api/run", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with pytest.raises(ValueError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)


def test_server_sent_events_push_a_new_snapshot_when_the_run_changes(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with LiveServer(run) as url, httpx.stream("GET", url + "api/events", timeout=20) as resp:
        lines = resp.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert first["state"] == "finished"
        status = json.loads((run / "status.json").read_text())
        ended = subprocess.Popen(["true"])
        ended.wait()
        status.update(state="running", pid=ended.pid)  # a server process that has ended
        (run / "status.json").write_text(json.dumps(status))
        second = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert second["state"] == "stopped"  # "running", but the writing process has ended


@needs_chromium
def test_browser_renders_a_finished_run(finished_run, tmp_path):
    with LiveServer(finished_run) as url:
        dom = chromium(url, tmp_path / "dashboard-finished.png")
    text = _text(dom)
    assert "Federated grading: run" in text
    for site in ("hosp-a", "hosp-b", "node-303"):
        assert f'data-site="{site}"' in dom
    assert "cohort-unreadable" in text and "finished" in text
    assert "Metrics, latest round (round 2)" in text and "2 / 2" in text
    pooled = _rows(finished_run)[-1]["pooled"]
    assert f"{pooled['accuracy']:.3f}" in text
    assert dom.count("<svg") >= 4  # learning curve, per-site, training time, bytes
    assert (tmp_path / "dashboard-finished.png").stat().st_size > 20_000


@needs_chromium
@pytest.mark.integration
@pytest.mark.slow
def test_browser_follows_a_running_two_site_simulation(tmp_path):
    from fl_helpers import write_tiny_cohort

    cohort = write_tiny_cohort(tmp_path / "cohort", n_cases=24, splits=False)
    out = tmp_path / "sim"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    sim = subprocess.Popen(
        [sys.executable, "-m", "gliofed", "simulate", "--cohort", str(cohort), "--sites", "2",
         "--rounds", "5", "--partition", "iid", "--size", "16", "--local-epochs", "1",
         "--no-baselines", "--network", "small_cnn", "--out", str(out), "-c", "dp=opacus", "-c", "target-epsilon=8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        deadline = time.time() + 400
        while not ((out / "rounds.jsonl").is_file() and _rows(out)):
            assert sim.poll() is None, sim.stdout.read()[-3000:]
            assert time.time() < deadline, "no round finished in 400 s"
            time.sleep(1)
        with LiveServer(out) as url:
            dom = chromium(url, tmp_path / "dashboard-running.png")
        text = _text(dom)
        assert 'data-site="site-0"' in dom and 'data-site="site-1"' in dom
        assert "round in progress" in text
        assert re.search(r"rounds finished \d / 5", text)
        shown = int(re.search(r"Metrics, latest round \(round (\d+)\)", text).group(1))
        row = next(r for r in _rows(out) if r["round"] == shown)
        assert f"{row['pooled']['accuracy']:.3f}" in text
        out_text, _ = sim.communicate(timeout=600)
        assert sim.returncode == 0, out_text[-3000:]
        with LiveServer(out) as url:
            done = _text(chromium(url, tmp_path / "dashboard-simulation.png"))
        assert "rounds finished 5 / 5" in done and "report.html" in done
        status = json.loads((out / "status.json").read_text())
        spent = status["site_train"]["5"]["site-0"]["dp-epsilon"]
        assert f"{spent:.2f}" in done and "budget ε=8" in done  # ε per site against the budget
    finally:
        if sim.poll() is None:
            os.killpg(sim.pid, 15)
            sim.wait(timeout=30)
