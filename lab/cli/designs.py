"""``lab designs``: every registered design, how it works and where it comes from."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lab.sockets.designs import DESIGNS


def designs() -> None:
    """List the server designs: how each works and where it comes from."""
    table = Table("design", "model", "how it works", "from", "backlog", box=None, pad_edge=False)
    for name, design in DESIGNS.items():
        table.add_row(
            name, design.model, design.summary, design.origin, str(design.default_backlog)
        )
    Console(width=200).print(table)
