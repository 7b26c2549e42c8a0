"""The hospital's site-policy.toml, enforced on every message, and the site's audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fl_helpers import LocalGrid, run_config, write_tiny_cohort
from typer.testing import CliRunner

from client.audit import read_log, summarise
from client.policy import PolicyError, PolicyRefused, effective_node, parse_policy
from client.privacy import Ledger
from client.site_check import check_site
from gliofed.cli import app
from server.rounds import run_rounds
from shared.config import NodeConfig, RunConfig


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_policy_file_is_parsed_strictly_and_only_tightens() -> None:
    p = parse_policy('allowed-tasks = ["grading"]\ndp-required = true\nmin-report-cases = 20\n'
                     "max-epsilon-lifetime = 4.0\n")
    assert p.allowed_tasks == ("grading",) and p.dp_required and p.min_report_cases == 20
    node = effective_node(p, NodeConfig(max_epsilon=8.0, min_report_cases=10))
    assert (node.max_epsilon, node.min_report_cases) == (4.0, 20)
    assert effective_node(p, NodeConfig(max_epsilon=2.0, min_report_cases=30)).max_epsilon == 2.0
    for text, msg in (("max-epochs = 3", "unknown key 'max-epochs'"),
                      ("dp-required = 1", "dp-required = 1 is not a valid bool"),
                      ("min-report-cases = -2", "is not a valid non-negative number"),
                      ('allowed-tasks = ["grading", "tumour"]', "unknown task.s. tumour"),
                      ("dp-required = ", "not valid TOML")):
        with pytest.raises(PolicyError, match=msg):
            parse_policy(text)


def test_the_site_refuses_what_its_policy_forbids_and_audits_every_request(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    for i in range(3):
        write_tiny_cohort(sites / f"site-{i}", n_cases=8, seed=i, site=f"S{i}")
    (sites / "site-0" / "site-policy.toml").write_text('allowed-tasks = ["typing"]\n')
    (sites / "site-1" / "site-policy.toml").write_text("max-local-epochs = 1\nmin-report-cases = 50\n")
    cfg = run_config(tmp_path / "run", sites, **{"num-server-rounds": 1, "local-epochs": 2})
    grid = LocalGrid({100 + i: {"partition-id": i} for i in range(3)}, cfg)
    result = run_rounds(grid, RunConfig.from_flower(cfg))
    assert result.rounds[0]["replied"] == 1 and sorted(result.sites) == ["site-2"]
    reasons = sorted({r.error.reason for r in grid.replies if r.has_error()})
    assert reasons == ["policy-refused rule=allowed-tasks", "policy-refused rule=max-local-epochs"]
    assert result.rounds[0]["withheld"] == ["site-1"]  # policy k = 50 > its test cases

    audit = tmp_path / "run" / "audit"
    zero, one = read_log(audit / "site-0.jsonl"), read_log(audit / "site-1.jsonl")
    assert [(e["kind"], e["outcome"], e.get("rule")) for e in zero] == [
        ("query", "refused", "allowed-tasks")]
    assert [(e["kind"], e["outcome"], e.get("rule")) for e in one] == [
        ("query", "served", None), ("train", "refused", "max-local-epochs"),
        ("evaluate", "served", None)]
    assert one[2]["sent"]["metrics"]["keys"] == ["skipped"]  # nothing but the skip count
    two = read_log(audit / "site-2.jsonl")
    train = next(e for e in two if e["kind"] == "train")
    assert train["sent"]["arrays"]["tensors"] > 0 and train["sent"]["arrays"]["bytes"] > 1000
    assert "num-examples" in train["sent"]["metrics"]["keys"] and train["run_id"] == "1"
    text = (audit / "site-2.jsonl").read_text()
    assert "S2-case" not in text and "S2-pat" not in text and str(sites) not in text
    assert summarise(zero + one)["refused_by_rule"] == {"allowed-tasks": 1, "max-local-epochs": 1}

    r = CliRunner().invoke(app, ["site", "audit", str(sites / "site-1"), "--log",
                                 str(audit / "site-1.jsonl")])
    assert r.exit_code == 0, r.output
    assert "train refused: 1" in r.output and "refused by max-local-epochs: 1" in r.output
    r = CliRunner().invoke(app, ["site", "policy", str(sites / "site-1"), "--node-config",
                                 "min-report-cases=5 max-epsilon=3"])
    assert r.exit_code == 0 and "max-local-epochs = 1" in r.output
    assert "dp-required = false  # no rule" in r.output
    assert "max-epsilon = 3 (0 = none), min-report-cases = 50" in r.output


def test_dp_and_secagg_rules_and_the_per_run_budget(tmp_path: Path) -> None:
    from client.policy import SitePolicy, check_request

    run = RunConfig(task="grading", dp="none")
    with pytest.raises(PolicyRefused, match="dp-required"):
        check_request(SitePolicy(dp_required=True), "train", run, NodeConfig())
    check_request(SitePolicy(dp_required=True), "evaluate", run, NodeConfig())  # no training
    dp = run.replace(dp="opacus", noise_multiplier=0.5)
    with pytest.raises(PolicyRefused, match="min-noise-multiplier"):
        check_request(SitePolicy(min_noise_multiplier=0.8), "train", dp, NodeConfig())
    with pytest.raises(PolicyRefused, match="secagg-required"):
        check_request(SitePolicy(secagg_required=True), "train", dp, NodeConfig())
    check_request(SitePolicy(secagg_required=True), "train", dp.replace(secagg=True), NodeConfig(),
                  secagg_message=True)
    ledger = Ledger(tmp_path / "site.json")
    ledger.reserve(1.0, 0.25, 40, 1e-5, run="a", run_budget=50.0)
    one_run = ledger.epsilon(1e-5)
    with pytest.raises(PolicyRefused, match="max-epsilon-per-run"):
        ledger.reserve(1.0, 0.25, 40, 1e-5, run="a", run_budget=one_run * 1.2)
    ledger.reserve(1.0, 0.25, 40, 1e-5, run="b", run_budget=one_run * 1.2)  # another run: its own
    assert len(ledger.entries()) == 2


def test_fingerprint_pinning_and_site_check_validates_the_policy(tmp_path: Path) -> None:
    from client.policy import SitePolicy, certificate_fingerprint, check_request

    cert = tmp_path / "ca.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n")
    fp = certificate_fingerprint(cert)
    pinned = SitePolicy(allowed_server_fingerprints=(fp.upper().replace("SHA256:", "sha256:"),))
    check_request(pinned, "query", RunConfig(), NodeConfig(server_certificate=str(cert)))
    with pytest.raises(PolicyRefused, match="allowed-server-fingerprints"):
        check_request(SitePolicy(allowed_server_fingerprints=("sha256:00",)), "query", RunConfig(),
                      NodeConfig(server_certificate=str(cert)))
    with pytest.raises(PolicyRefused, match="names no server-certificate"):
        check_request(pinned, "query", RunConfig(), NodeConfig())
    site = write_tiny_cohort(tmp_path / "site", n_cases=4)
    (site / "site-policy.toml").write_text("max-local-epochs = -1\n")
    rep = check_site(site, workers=1)
    assert any(p.file.endswith("site-policy.toml") and "max-local-epochs = -1" in p.message
               for p in rep.errors)
    r = CliRunner().invoke(app, ["site", "policy", str(site)])
    assert r.exit_code == 1 and "max-local-epochs" in r.output
    assert json.loads(json.dumps(SitePolicy().as_toml_dict()))["min-report-cases"] == 0
