"""The ``gliofed`` command line: composes the sub-commands each package offers.

Each module in ``gliofed.commands`` exposes ``register(app)`` and keeps heavy imports (torch, flwr,
nibabel, ...) inside its command functions, so ``gliofed --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = (
    "gliofed.commands.data",  # import, site check
    "gliofed.commands.prepare",  # site prepare (on the site group of commands.data)
    "gliofed.commands.synth",  # synth
    "gliofed.commands.models",  # train, predict, evaluate, explain
    "gliofed.commands.simulate",  # simulate
    "gliofed.commands.qtm",  # qtm simulate|train|predict|grade|fit
    "gliofed.commands.deploy",  # deploy certs
    "gliofed.commands.operate",  # dashboard, report, track
)

app = typer.Typer(
    name="gliofed",
    help="Federated learning for brain-tumour MRI across hospital sites.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from gliofed import __version__

        typer.echo(__version__)
        raise typer.Exit()


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
