"""Flower ServerApp (thin placeholder until the federation issue lands)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Placeholder: the federation issue replaces this with the real strategy loop."""
