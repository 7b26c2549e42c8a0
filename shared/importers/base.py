"""What every layout importer shares: the user-facing error, progress while importing, relative paths."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar


class ImportErrorForUser(ValueError):
    """A layout problem the user must fix (wrong folder, missing CSV, ...)."""


_T = TypeVar("_T")
SHOW_PROGRESS: ContextVar[bool] = ContextVar("gliofed_import_progress", default=False)


def track(items: Iterable[_T], label: str) -> Iterator[_T]:
    """Iterate ``items``, with a transient progress bar on stderr while an import asked for one."""
    items = list(items)
    if not SHOW_PROGRESS.get() or not items:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=label, console=Console(stderr=True), transient=True)


def relpath(path: Path, out: Path) -> str:
    """Path of ``path`` relative to the site folder when possible (else absolute)."""
    try:
        return os.path.relpath(path.resolve(), out.resolve())
    except ValueError:  # different drive
        return str(path.resolve())
