"""`gliofed deploy certs`: the federation's CA, the SuperLink TLS certificate and site auth keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

deploy_app = typer.Typer(help="Deployment helpers for the aggregation server and hospital sites.",
                         no_args_is_help=True)


@deploy_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, server.pem/key, sites/.")],
    host: Annotated[list[str], typer.Option("--host", help="Server name or IP sites connect to "
                                                           "(repeat; all go into the certificate).")],
    site: Annotated[list[str], typer.Option("--site", help="Site name to create a key pair for "
                                                           "(repeat).")] = [],  # noqa: B006
    days: int = 825,
    overwrite: Annotated[bool, typer.Option(help="Re-issue everything, including the CA.")] = False,
) -> None:
    """Create (or extend) the private CA, the SuperLink certificate and site EC key pairs."""
    from server.pki import make_deploy_keys

    try:
        keys = make_deploy_keys(out, host, site, days=days, overwrite=overwrite)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"CA certificate (give to every site): {keys.ca_cert}")
    typer.echo(f"SuperLink certificate/key: {keys.server_cert} {keys.server_key}")
    for name, (priv, pub) in keys.site_keys.items():
        typer.echo(f"site {name}: private key {priv} (stays at the site), public key {pub} "
                   f"(register: flwr supernode register {pub} <federation>)")


@deploy_app.command("supervise", context_settings={"allow_extra_args": True,
                                                  "ignore_unknown_options": True})
def supervise(
    cmd: Annotated[list[str], typer.Argument(help="The daemon and its arguments, after `--`.")],
    grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL for what the "
                                              "daemon leaves behind.")] = 20.0,
) -> None:
    """Run a site daemon (flower-supernode) so that stopping it also stops the SuperExec and every
    flwr-clientapp it started (used by the systemd unit and the Docker entrypoint)."""
    from client.supervise import supervise as run_supervised

    try:
        code = run_supervised(cmd, grace=grace)
    except (ValueError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `deploy certs` and `deploy supervise`."""
    app.add_typer(deploy_app, name="deploy")
