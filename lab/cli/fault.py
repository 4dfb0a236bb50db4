"""``lab fault …``: faults injected into the running lab, each saying what it did and how it is
undone (the work is :mod:`lab.orchestration.faults`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lab.cli.errors import user_errors

app = typer.Typer(
    help=(
        "Inject faults into the running lab: kill a worker, pause the server, impair a "
        "client's path (delay, stall, loss, rate, partition); show, clear."
    ),
    no_args_is_help=True,
)

ClientOption = Annotated[
    list[int] | None,
    typer.Option(
        "--client",
        min=1,
        help="the client (its number, as `lab status` shows); repeat; default all",
    ),
]
ForOption = Annotated[
    float | None,
    typer.Option("--for", min=0.1, help="undo it after this many seconds (default: stay)"),
]


def _network(kind: str, seconds: float | None, clients: list[int] | None, **spec: Any) -> None:
    from lab.orchestration import faults

    with user_errors(f"lab fault {kind}"):
        injected = faults.network_fault(kind, clients=clients or (), seconds=seconds, **spec)
    undo = (
        f"undone by itself after {seconds:g} s (sooner: `lab fault clear`)"
        if seconds is not None
        else "undo with `lab fault clear` (or `lab down`)"
    )
    for fault in injected:
        typer.echo(f"{fault.spec} on {fault.client} ⇄ server, by {fault.mechanism}")
    typer.echo(undo)


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
            paused = faults.pause()
            typer.echo(f"paused {paused.container}: undo with `lab fault clear` (or `lab down`)")
            if paused.replaced_after is not None:
                typer.echo(_swarm_replaces(paused.replaced_after))
            return
        typer.echo(f"pausing the server for {seconds:g} s…")
        paused = faults.pause(seconds=seconds)
    if paused.replaced:
        typer.echo(
            f"Swarm replaced {paused.container} while it was paused (its health checks failed): "
            "a new server task serves now, at a new address"
        )
    else:
        typer.echo(f"resumed {paused.container} after {seconds:g} s")


def _swarm_replaces(after: float) -> str:
    return (
        f"on Swarm: paused for more than about {after:g} s, the server fails its health checks "
        "and Swarm replaces the task (a new server, not this one resumed)"
    )


@app.command("delay")
def delay(
    milliseconds: Annotated[float, typer.Argument(min=0.1, help="added each way, ms")],
    jitter: Annotated[float, typer.Option("--jitter", min=0, help="± ms, each way")] = 0.0,
    clients: ClientOption = None,
    seconds: ForOption = None,
) -> None:
    """Add latency between client(s) and the server (new connections, by the proxy here)."""
    if jitter > milliseconds:
        typer.echo(
            f"lab fault delay: error: --jitter {jitter:g} is above the delay: lower it", err=True
        )
        raise typer.Exit(2)
    _network("delay", seconds, clients, delay_ms=milliseconds, jitter_ms=jitter)


@app.command("stall")
def stall(clients: ClientOption = None, seconds: ForOption = None) -> None:
    """Stop the path carrying bytes (new connections hang; held bytes go on at the end)."""
    _network("stall", seconds, clients)


@app.command("loss")
def loss(
    percent: Annotated[float, typer.Argument(min=0.01, max=100, help="packets dropped, %")],
    clients: ClientOption = None,
    seconds: ForOption = None,
) -> None:
    """Drop a share of the packets between client(s) and the server, each way."""
    _network("loss", seconds, clients, loss_pct=percent)


@app.command("rate")
def rate(
    kbit: Annotated[int, typer.Argument(min=8, help="kbit/s")],
    clients: ClientOption = None,
    seconds: ForOption = None,
) -> None:
    """Shape the client(s)' sending side to a bandwidth (tbf)."""
    _network("rate", seconds, clients, rate_kbit=kbit)


@app.command("partition")
def partition(
    client_number: Annotated[int, typer.Argument(min=1, metavar="CLIENT", help="its number")],
    seconds: ForOption = None,
) -> None:
    """Cut one client off labnet (DROP both ways: sends hang, as across a real cut)."""
    _network("partition", seconds, [client_number])


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
