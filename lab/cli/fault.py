"""``lab fault …``: faults injected into the running lab, each saying what it did and how it is
undone (the work is :mod:`lab.orchestration.faults`)."""

from __future__ import annotations

from typing import Annotated

import typer

from lab.cli.errors import user_errors

app = typer.Typer(
    help="Inject faults into the running lab: kill a worker, pause the server; show, clear.",
    no_args_is_help=True,
)


@app.command("kill-worker")
def kill_worker(
    signal_name: Annotated[
        str, typer.Option("--signal", help="KILL, TERM or SEGV", case_sensitive=False)
    ] = "KILL",
) -> None:
    """Signal one worker process of the server (the newest); its master replaces it."""
    from lab.orchestration import faults

    with user_errors("lab fault kill-worker"):
        container, pid, design = faults.kill_worker(signal_name=signal_name.upper())
    typer.echo(
        f"sent SIG{signal_name.upper()} to worker {pid} of {design} in {container}; nothing to "
        "undo: the server reaps it and serves on (`lab logs server` shows the respawn)"
    )


@app.command("pause")
def pause(
    seconds: Annotated[
        float | None,
        typer.Option(
            "--for", min=0.1, help="resume after this many seconds (default: stay paused)"
        ),
    ] = None,
) -> None:
    """Freeze the server's container (docker pause): connections queue, nothing is answered."""
    from lab.orchestration import faults

    with user_errors("lab fault pause"):
        if seconds is None:
            name = faults.pause()
            typer.echo(f"paused {name}: undo with `lab fault clear` (or `lab down`)")
            return
        typer.echo(f"pausing the server for {seconds:g} s…")
        name = faults.pause(seconds=seconds)
    typer.echo(f"resumed {name} after {seconds:g} s")


@app.command("show")
def show() -> None:
    """The faults in place now, and how each is undone."""
    from lab.orchestration import faults

    with user_errors("lab fault show"):
        active = faults.show()
    if not active:
        typer.echo("no fault in place")
    for fault in active:
        typer.echo(f"{fault.fault}: {fault.container} — undo: {fault.undo}")


@app.command("clear")
def clear() -> None:
    """Undo every fault in place."""
    from lab.orchestration import faults

    with user_errors("lab fault clear"):
        undone = faults.clear()
    typer.echo("; ".join(undone) if undone else "no fault in place: nothing to undo")
