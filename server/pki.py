"""Deployment keys: a private CA, the SuperLink's TLS certificate and each site's EC auth key pair.

Used by ``gliofed deploy certs``. TLS: the CA signs a server certificate whose SANs are the aggregation
server's host names/IPs (SuperNodes verify it with ``--root-certificates ca.crt``). Site identity: Flower
1.41 authenticates SuperNodes by an EC key on a NIST curve (OpenSSH format), registered on the
SuperLink with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DeployKeys:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # site -> (private key, public key .pub)


def _write(path: Path, data: bytes, private: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def make_deploy_keys(out: str | Path, hosts: Sequence[str], sites: Sequence[str] = (),
                     days: int = 825, overwrite: bool = False) -> DeployKeys:
    """Create ``out/ca.{crt,key}``, ``out/server.{pem,key}`` and ``out/sites/<site>{,.pub}``.

    Existing files are kept unless ``overwrite`` (re-running adds new sites without re-issuing the CA).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM
    nopass = serialization.NoEncryption()

    ca_crt, ca_key_p = out / "ca.crt", out / "ca.key"
    if overwrite or not ca_crt.exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gliofed federation CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA384()))
        _write(ca_key_p, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass), True)
        _write(ca_crt, ca.public_bytes(pem), False)
        overwrite = True  # a new CA invalidates the old server certificate
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_p.read_bytes(), password=None)

    srv_crt, srv_key_p = out / "server.pem", out / "server.key"
    if overwrite or not srv_crt.exists():
        if not hosts:
            raise ValueError("give at least one --host (the name or IP sites use to reach the server)")
        key = ec.generate_private_key(ec.SECP384R1())
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA384()))
        _write(srv_key_p, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass), True)
        _write(srv_crt, cert.public_bytes(pem), False)

    site_keys: dict[str, tuple[Path, Path]] = {}
    for site in sites:
        if not site or "/" in site or site.startswith("."):
            raise ValueError(f"invalid site name {site!r}")
        priv, pub = out / "sites" / site, out / "sites" / f"{site}.pub"
        if overwrite or not priv.exists():
            key = ec.generate_private_key(ec.SECP384R1())
            _write(priv, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, nopass), True)
            _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH)
                   + f" {site}\n".encode(), False)
        site_keys[site] = (priv, pub)
    return DeployKeys(ca_crt, ca_key_p, srv_crt, srv_key_p, site_keys)
