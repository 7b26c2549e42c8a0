"""`gliofed` sub-commands: synth (owner fills in; heavy imports stay inside the functions)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
