"""``lab soak``: the robustness battery on the lab's designs, as local processes on loopback;
a table of design × check (figure, pass or fail) and a sentence per design on why. The work
is :mod:`lab.measure.robustness`; ``lab compare --robustness`` puts the same table in its
report beside fault benches."""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def soak(
    designs: Annotated[
        str | None, typer.Option(help="comma-separated (default: every design)")
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="the short form: 300 in the storm, 2,000 sequential, 60 fuzz")
    ] = False,
    connections: Annotated[
        int | None,
        typer.Option(min=1, help="sequential connections (default 100,000; --quick 2,000)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="results folder", envvar="LAB_RESULTS")] = Path(
        "results"
    ),
) -> None:
    """Storm, slowloris, a non-reader, a large echo, sequential connections, fuzz, a killed
    worker and a pause, for each design; exits 1 if any check failed."""
    from lab.measure.robustness import battery, table_markdown
    from lab.sockets.designs import DESIGNS

    names = [d.strip() for d in designs.split(",") if d.strip()] if designs else list(DESIGNS)
    unknown = [d for d in names if d not in DESIGNS]
    if unknown:
        typer.echo(
            f"lab soak: error: {unknown[0]} is not a design: choose from {', '.join(DESIGNS)}",
            err=True,
        )
        raise typer.Exit(2)
    interactive = sys.stderr.isatty()
    with console.status("soaking…") if interactive else contextlib.nullcontext():
        checks = battery(
            names,
            quick=quick,
            sequential=connections,
            progress=lambda design, check: (
                console.log(f"{design}: {check}") if not interactive else None
            ),
        )
    text = table_markdown(checks)
    stamp = datetime.datetime.now(datetime.UTC).strftime("soak-%Y%m%d-%H%M%S")
    folder = out / stamp
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "robustness.md").write_text("# Robustness\n\n" + text)
    (folder / "robustness.json").write_text(
        json.dumps([c.to_dict() for c in checks], indent=1) + "\n"
    )
    typer.echo(text)
    typer.echo(f"the table: {folder / 'robustness.md'}")
    if any(c.passed is False for c in checks):
        raise typer.Exit(1)
