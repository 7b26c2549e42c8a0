"""Deployment artefacts: the PKI generator and the structure of the systemd/Docker/compose files."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gliofed.cli import app
from server.pki import make_deploy_keys

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_pki_chain_sans_and_site_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    keys = make_deploy_keys(tmp_path, ["fl.example.org", "10.1.2.3"], ["hosp-a"])
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    priv, pub = keys.site_keys["hosp-a"]
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    key = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    for secret in (keys.ca_key, keys.server_key, priv):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # adding a site later keeps the CA and the server certificate
    ca_before, srv_before = keys.ca_cert.read_bytes(), keys.server_cert.read_bytes()
    more = make_deploy_keys(tmp_path, ["fl.example.org"], ["hosp-b"])
    assert more.ca_cert.read_bytes() == ca_before and more.server_cert.read_bytes() == srv_before
    assert (tmp_path / "sites" / "hosp-b.pub").is_file()


def test_openssl_verifies_the_server_certificate(tmp_path: Path) -> None:
    keys = make_deploy_keys(tmp_path, ["localhost"], [])
    try:
        r = subprocess.run(["openssl", "verify", "-CAfile", str(keys.ca_cert), str(keys.server_cert)],
                           capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("openssl not installed")
    assert r.returncode == 0 and ": OK" in r.stdout


def test_cli_certs_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["deploy", "certs", "--out", str(tmp_path), "--host", "h",
                                 "--site", "../evil"])
    assert r.exit_code == 2 and "invalid site name '../evil'" in r.output


def test_systemd_units_check_site_and_use_tls_auth() -> None:
    link = (DEPLOY / "systemd" / "gliofed-superlink.service").read_text()
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--database /var/lib/gliofed/state.db", "--disable-runtime-dependency-installation"):
        assert flag in link
    node = (DEPLOY / "systemd" / "gliofed-supernode.service").read_text()
    assert "ExecStartPre=/opt/gliofed/.venv/bin/gliofed site check ${GLIOFED_DATA_PATH}" in node
    assert "--root-certificates" in node and "--auth-supernode-private-key" in node
    env = (DEPLOY / "site.env.example").read_text()
    for var in set(re.findall(r"\$\{(GLIOFED_[A-Z_]+)\}", node)):
        assert f"{var}=" in env, var


def test_compose_and_dockerfiles_are_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"superlink", "site"}
    for svc in compose["services"].values():
        dockerfile = DEPLOY.parent / svc["build"]["dockerfile"]
        assert dockerfile.is_file()
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                src = line.split()[1]
                assert (DEPLOY.parent / src).exists(), f"{dockerfile.name}: COPY {src} missing"
    site = compose["services"]["site"]
    assert any(v.endswith(":/data:ro") for v in site["volumes"])
    assert "--disable-runtime-dependency-installation" in (DEPLOY / "Dockerfile.server").read_text()
    r = subprocess.run(["sh", "-n", str(DEPLOY / "site-entrypoint.sh")], capture_output=True, check=False)
    assert r.returncode == 0


UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def test_systemd_analyze_verify_passes_on_every_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` on each unit as installed (the /opt/gliofed venv is this venv)."""
    import shutil
    import sys

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install -y systemd)")
    venv = str(Path(sys.executable).parent.parent)
    assert len(UNITS) == 2
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/gliofed/.venv", venv))
        r = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0 and unit.name + ":" not in r.stderr, r.stderr


def test_units_use_absolute_read_only_paths_and_a_writable_flower_home() -> None:
    env = dict(line.split("=", 1) for line in (DEPLOY / "site.env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    for unit in UNITS:
        text = unit.read_text()
        settings = [ln.split("=", 1) for ln in text.splitlines() if "=" in ln and not ln.startswith("#")]
        writable = " ".join(v for k, v in settings if k == "ReadWritePaths").split()
        for key, value in settings:
            if key.endswith("Paths"):
                assert all(p.startswith("/") for p in value.split()), f"{unit.name}: {key}={value}"
            if key == "Environment" and value.split("=", 1)[0] in ("FLWR_HOME", "MPLCONFIGDIR"):
                path = value.split("=", 1)[1]
                assert any(path.startswith(w + "/") for w in writable), f"{unit.name}: {value}"
        assert "KillMode=control-group" in text
    node = (DEPLOY / "systemd" / "gliofed-supernode.service").read_text()
    assert f"ReadOnlyPaths={env['GLIOFED_DATA_PATH']}" in node
    assert "gliofed deploy supervise -- /opt/gliofed/.venv/bin/flower-supernode" in node
    assert "exec gliofed deploy supervise -- flower-supernode" in (
        DEPLOY / "site-entrypoint.sh").read_text()


_DAEMON = """
import signal, subprocess, sys, time
# like the SuperNode: a child that outlives us unless someone ends our process group; it ignores
# SIGTERM, so only the supervisor's SIGKILL after the grace period ends it
signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))  # before the pid is printed: no race
kid = subprocess.Popen(["sh", "-c", "trap '' TERM; while true; do sleep 1; done"])
print(kid.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("supervised", [True, False])
def test_supervise_leaves_no_process_behind_when_the_daemon_is_stopped(supervised: bool) -> None:
    import signal
    import sys
    import time

    cmd = [sys.executable, "-c", _DAEMON]
    if supervised:
        cmd = [sys.executable, "-m", "gliofed", "deploy", "supervise", "--grace", "2", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    kid = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGTERM)  # to the supervisor (or the bare daemon) only
        assert proc.wait(timeout=20) == (0 if supervised else 3)
        deadline = time.time() + 10
        while _alive(kid) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive(kid) is (not supervised)  # the bare daemon leaves its child running
    finally:
        if _alive(kid):
            os.kill(kid, signal.SIGKILL)
