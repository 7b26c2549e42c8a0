"""Following a run: the status file, the per-site round log, `gliofed report`, bootstrap CIs, MLflow."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from gliofed.cli import app


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_status_file_names_sites_by_site_id_with_states_and_reasons(finished_run):
    status = json.loads((finished_run / "status.json").read_text())
    assert status["state"] == "finished" and status["mode"] == "deployment"
    sites = status["sites"]
    assert {k: v["node_id"] for k, v in sites.items()} == {"hosp-a": 101, "hosp-b": 202,
                                                           "node-303": 303}
    assert sites["hosp-a"]["state"] == "done" and sites["hosp-a"]["rounds_trained"] == 2
    assert sites["node-303"]["state"] == "failed"
    assert sites["node-303"]["reason"] == "cohort-unreadable"  # the fixed error vocabulary
    assert set(status["site_train"]["2"]) == {"hosp-a", "hosp-b"}
    assert json.loads((finished_run / "run_config.json").read_text())["num-server-rounds"] == 2


def test_sites_log_has_each_rounds_outcome_per_site_and_the_node_id_mapping(finished_run):
    log = (finished_run / "sites.log").read_text()
    assert "site hosp-a is node 101" in log and "site hosp-b is node 202" in log
    assert "node-303: query failed: cohort-unreadable" in log
    for rnd in (1, 2):
        for site in ("hosp-a", "hosp-b"):
            assert f"round {rnd} {site}: trained " in log
        assert f"round {rnd} done in " in log
    assert "2/2 sites trained" in log and log.rstrip().endswith(f"model exported to {finished_run}/model")


def test_report_renders_a_deployed_run_with_site_ids_and_cis(finished_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert "A deployed federation" in page and "hosp-a" in page and "hosp-b" in page
    assert "bootstrap 95% CI" in page and 'href="sites.log"' in page
    assert (run / "learning_curves.png").is_file() and not (run / "comparison.png").exists()
    pooled = _rows(run)[-1]["pooled"]["auc"]
    assert f"{pooled:.3f}" in page


def test_report_and_dashboard_commands_refuse_missing_and_foreign_folders(tmp_path):
    for cmd in ("report", "dashboard"):
        res = CliRunner().invoke(app, [cmd, str(tmp_path / "nope")])
        assert res.exit_code == 2 and "no such run folder" in res.output
        res = CliRunner().invoke(app, [cmd, str(tmp_path)])
        assert res.exit_code == 2 and "not a gliofed run folder" in res.output


def test_bootstrap_cis_match_the_binomial_width_and_perfect_separation():
    from server.evalci import bootstrap_cis

    conf = np.array([[40, 10], [10, 40]])  # 100 cases, accuracy 0.8: binomial 95% CI ~ +-0.078
    hist = np.zeros((2, 2, 10), dtype=np.int64)
    hist[1, 0, 9] = 50  # positives all score high
    hist[1, 1, 0] = 50  # negatives all score low
    hist[0, 0, 9], hist[0, 1, 0] = 50, 50
    ci = bootstrap_cis(conf, hist, n_boot=2000)
    lo, hi = ci["accuracy"]
    assert 0.70 <= lo <= 0.74 and 0.86 <= hi <= 0.90
    assert ci["auc"] == [1.0, 1.0]
    assert ci["balanced_accuracy"][0] < 0.8 < ci["balanced_accuracy"][1]


def test_round_cis_pool_the_sites_counts(finished_run):
    from server.evalci import round_cis

    cis = round_cis(finished_run)
    assert sorted(cis) == [1, 2]
    pooled, site = cis[2]["pooled"]["accuracy"], cis[2]["sites"]["hosp-a"]["accuracy"]
    assert pooled[1] - pooled[0] < site[1] - site[0]  # 8 pooled cases: narrower than 4 at one site


def test_mlflow_records_config_metrics_report_and_model(finished_run, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is the optional extra gliofed[tracking]")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["track", str(finished_run), "--uri", uri])
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("gliofed").experiment_id])[0]
    assert run.data.params["task"] == "grading" and run.data.params["num-server-rounds"] == "2"
    assert run.data.tags["gliofed.mode"] == "deployment"
    history = client.get_metric_history(run.info.run_id, "pooled/auc")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(_rows(finished_run)[-1]["pooled"]["auc"])
    assert "site/hosp-a/train_seconds" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "sites.log", "rounds.jsonl", "model", "report"} <= arts
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model/configs")}
    assert "model/configs/metadata.json" in model
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the database, not in the cwd


def test_heartbeats_come_from_the_superlink_and_a_vanished_node_goes_offline(tmp_path):
    from types import SimpleNamespace

    from server.status import RunStatus
    from shared.config import RunConfig

    class Grid:  # what Flower's deployment grid answers: NodeInfo with online_until and interval
        def __init__(self) -> None:
            self.nodes = [SimpleNamespace(node_id=7, online_until=1000.0, heartbeat_interval=30.0),
                          SimpleNamespace(node_id=8, online_until=1020.0, heartbeat_interval=30.0)]

        def get_nodes(self):
            return list(self.nodes)

    status = RunStatus(RunConfig(run_dir=str(tmp_path), min_available_nodes=2))
    fake = Grid()
    grid = status.watch(fake)
    assert grid.get_node_ids() == [7, 8]
    assert status.data["state"] == "running"
    assert status.data["sites"]["node-7"]["last_seen"] == 940.0  # 1000 - 2 x 30 s
    status.learn_name(8, "hosp-b")
    fake.nodes = fake.nodes[:1]
    grid.get_node_ids()
    saved = json.loads((tmp_path / "status.json").read_text())
    assert saved["sites"]["hosp-b"]["state"] == "offline"
    assert saved["sites"]["hosp-b"]["reason"] == "not connected to the SuperLink"
    assert "hosp-b (node 8) is offline" in (tmp_path / "sites.log").read_text()


def test_a_deployed_run_with_tracking_uri_records_itself_at_the_end(finished_run, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is the optional extra gliofed[tracking]")
    import shutil

    from mlflow.tracking import MlflowClient

    from server.app import finish
    from server.status import RunStatus
    from shared.config import RunConfig

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunConfig(run_dir=str(run_dir), tracking_uri=uri, resume=True)
    finish(run, RunStatus(run), run_dir / "model")  # what serve() does after the last round
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gliofed").experiment_id])
    assert [r.data.tags["gliofed.run_dir"] for r in runs] == [str(run_dir.resolve())]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_the_superlinks_error_reply_is_booked_to_the_site_the_message_went_to(tmp_path):
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.status import RunStatus
    from shared.config import RunConfig

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # the ServerApp's
    status = RunStatus(RunConfig(run_dir=str(tmp_path)))
    status.learn_name(4242, "hosp-b")
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=4242,
                  message_type="train")
    msg.metadata.__dict__["_message_id"] = "m-1"  # what the grid sets when it pushes the message
    TaskIdentity.node_id = 1  # the SuperLink (node 1) answers for an unavailable node
    reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=msg)
    TaskIdentity.node_id = 0
    status.received([msg], [reply], timeout=60)
    site = status.data["sites"]["hosp-b"]
    assert (site["state"], site["reason"]) == ("failed", "Node Unavailable")
    assert "node-1" not in status.data["sites"]
    assert "round None hosp-b: train failed: Node Unavailable" in (tmp_path / "sites.log").read_text()


def test_a_run_ended_by_a_signal_is_stopped_and_an_exception_is_failed(tmp_path):
    from server.status import RunStatus
    from shared.config import RunConfig

    status = RunStatus(RunConfig(run_dir=str(tmp_path / "a")))
    status.data["sites"]["hosp-a"] = {"node_id": 5, "state": "training", "reason": ""}
    status.failed(SystemExit(0))  # what flwr stop does to the ServerApp process
    assert status.data["state"] == "stopped"
    assert status.data["sites"]["hosp-a"]["state"] == "stopped"
    other = RunStatus(RunConfig(run_dir=str(tmp_path / "b")))
    other.failed(RuntimeError("round 1: no connected site has eligible data"))
    saved = json.loads((tmp_path / "b" / "status.json").read_text())
    assert (saved["state"], saved["reason"]) == (
        "failed", "RuntimeError: round 1: no connected site has eligible data")


def test_flowers_exit_hook_marks_the_run_stopped_before_its_forced_exit(tmp_path):
    """flwr stop -> SIGINT -> Flower runs its early exit hooks, then os._exit()s 5 s later, maybe
    before SystemExit reaches the round loop: the early hook must already have marked the run."""
    from flwr.supercore.exit import exit_handler as hooks

    from server.status import RunStatus
    from shared.config import RunConfig

    status = RunStatus(RunConfig(run_dir=str(tmp_path)))
    status.data["sites"]["hosp-a"] = {"node_id": 5, "state": "training", "reason": ""}
    before = len(hooks.registered_exit_handlers)
    with status.marked_on_flower_exit():
        assert len(hooks.registered_exit_handlers) == before + 1
        hooks.trigger_exit_handlers(run_before_force_exit=True)  # what flwr_exit does first
        saved = json.loads((tmp_path / "status.json").read_text())
        assert saved["state"] == "stopped"
        assert saved["sites"]["hosp-a"]["state"] == "stopped"
        assert "run stopped" in (tmp_path / "sites.log").read_text()
        status.failed(RuntimeError("the unwinding round loop"))  # the first end stays
        assert status.data["state"] == "stopped"
    with status.marked_on_flower_exit():
        pass
    assert len(hooks.registered_exit_handlers) == before  # no hook outlives its run


def test_dashboard_counts_an_unreaped_server_process_as_ended(tmp_path):
    """flower-superexec reaps its ended ServerApps late; a zombie must not read as a running run."""
    import socket
    import subprocess
    import time
    from pathlib import Path

    from server.dashboard.data import _alive

    if not Path("/proc/self/stat").is_file():
        pytest.skip("no /proc on this system: zombies cannot be told apart")
    child = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(200):
            if stat.read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.05)
        status = {"pid": child.pid, "host": socket.gethostname()}
        assert _alive(status) is False
        assert _alive({"pid": os.getpid(), "host": socket.gethostname()}) is True
    finally:
        child.wait()
