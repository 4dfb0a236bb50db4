"""``lab up``, ``down``, ``status``, ``logs``, ``switch``, ``exec-client``: the containerised lab.

Thin commands: each calls :mod:`lab.orchestration.stack` (imported late, so ``lab client`` and
``lab serve`` never load the docker SDK).
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lab.cli.errors import user_errors
from lab.sockets.designs import DESIGNS

# Wide enough for the tables when piped (rich assumes 80 columns off a terminal).
console = Console(width=None if sys.stdout.isatty() else 160)


class Which(StrEnum):
    server = "server"
    client = "client"
    all = "all"


def _check_design(design: str) -> str:
    if design not in DESIGNS:
        raise typer.BadParameter(f"unknown design {design!r}: choose one of {', '.join(DESIGNS)}")
    return design


def _check_service(service: str | None) -> str | None:
    from lab.sockets.config import SERVICES

    if service is not None and service not in SERVICES:
        raise typer.BadParameter(f"{service!r}: choose {' or '.join(SERVICES)}")
    return service


#: ``--swarm`` on the commands that act on a running lab: they find the lab wherever it runs
#: (compose or Swarm); the flag asks for the Swarm one and says so when it is not there.
OnSwarm = Annotated[
    bool, typer.Option("--swarm", help="the lab deployed on Docker Swarm (`lab up --swarm`)")
]


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("container", "service", "state", "health", "hostname", "address", "design")
    for row in rows:
        table.add_row(
            row["name"],
            row["service"],
            row["state"],
            row["health"],
            row["hostname"],
            row["address"],
            row["design"],
        )
    return table


def up(
    design: Annotated[
        str, typer.Option(help="server design", envvar="LAB_DESIGN", callback=_check_design)
    ] = "iterative",
    clients: Annotated[
        int, typer.Option(min=1, max=64, help="client containers", envvar="LAB_CLIENTS")
    ] = 3,
    transcript: Annotated[
        bool, typer.Option(help="wait for the clients' first exchanges, print the transcript")
    ] = False,
    service: Annotated[
        str | None,
        typer.Option(
            help="echo (default) or kv: commands on a SQLite database kept on the lab's data "
            "volume (`lab client --kv`; docs/kv.md)",
            envvar="LAB_SERVICE",
            callback=_check_service,
        ),
    ] = None,
    on_swarm: Annotated[
        bool,
        typer.Option(
            "--swarm",
            help="deploy as a stack on the Docker Swarm this engine manages (docs/swarm.md)",
        ),
    ] = False,
    server_node: Annotated[
        str | None,
        typer.Option(help="with --swarm: the node (hostname) the server runs on (default: any)"),
    ] = None,
    engines: Annotated[
        list[str] | None,
        typer.Option(
            "--engine",
            help="with --swarm: another node's Docker engine (tcp://HOST:2375, ssh://…), to "
            "check and load the image there and reach its tasks; repeat per node",
        ),
    ] = None,
    publish: Annotated[
        bool,
        typer.Option(
            "--publish",
            help="with --swarm: publish the server's port at LAB_HOST_PORT (12345) of its node, "
            "in host mode — on every interface of that node (Swarm takes no host address)",
        ),
    ] = False,
) -> None:
    """Build the images if missing, start the server and the clients, wait until healthy (what
    is left of an earlier lab — an exited server, a bench's peer — is removed first)."""
    from dataclasses import asdict

    from lab.orchestration import stack

    if not on_swarm and (server_node or engines or publish):
        raise typer.BadParameter("--server-node, --engine and --publish go with --swarm")
    port = _host_port() if publish else None
    where = stack.Swarm(server_node, tuple(engines or ()), port) if on_swarm else None
    with user_errors("lab up"):
        with console.status("preparing the lab…") as status:
            found = stack.up(
                design,
                clients,
                progress=lambda line: status.update(line[:100]),
                extra_env={"LAB_SERVICE": service} if service else None,
                on=where,
            )
            if transcript:
                status.update("waiting for the clients' first exchanges…")
                stack.wait_for_introductions()
        if transcript:
            for line in stack.transcript():
                typer.echo(line)
    console.print(_table([asdict(m) for m in found]))
    if port is not None:
        console.print(
            f"the server is published at port {port} of its node (`lab status --swarm` names "
            f"it), on every interface: `lab client NODE -p {port} -m hi`"
        )
    elif on_swarm:
        console.print(
            "no port is published on the swarm: reach the server from a client task, "
            "`lab exec-client -- lab client bakawali -m hi` (or `lab up --swarm --publish`)"
        )
    console.print("the transcript: `lab logs`; the statistics: `lab status`; stop: `lab down`")


def _host_port() -> int:
    """LAB_HOST_PORT (as compose reads it for its loopback binding), checked."""
    text = os.environ.get("LAB_HOST_PORT", "12345")
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise typer.BadParameter(f"LAB_HOST_PORT={text!r}: give a TCP port, 1–65535")
    return int(text)


def down(
    volumes: Annotated[
        bool, typer.Option("--volumes", help="also remove the data volume (the kv database)")
    ] = False,
    on_swarm: OnSwarm = False,
) -> None:
    """Remove every container and the network of the lab, a bench's peer too (no images; the
    data volume only with --volumes); on Swarm the stack, and the images it loaded onto other
    nodes."""
    from lab.orchestration import stack

    with user_errors("lab down"):
        if on_swarm:
            stack.require_swarm(deployed=False)  # nothing deployed: nothing to do
        count = stack.down(volumes=volumes)
    what = "network and its data volume" if volumes else "network (its data volume is kept)"
    typer.echo(f"removed {count} container(s) and the lab's {what}")


def status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
    on_swarm: OnSwarm = False,
) -> None:
    """The design, each container's state and address, and the server's live statistics."""
    from lab.orchestration import stack

    with user_errors("lab status"):
        if on_swarm:
            stack.require_swarm()
        report = stack.status()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(f"design [bold]{report['design']}[/], server {report['health']}")
    console.print(_table(report["containers"]))
    if report.get("swarm"):
        tasks = Table("task", "node", "state")
        for task in report["swarm"]["tasks"]:
            tasks.add_row(task["task"], task["node"], task["state"])
        console.print(tasks)
    stats = report["stats"]
    if stats:
        console.print_json(json.dumps(stats))
    else:
        console.print("no statistics: the server did not answer SIGUSR1")


def logs(
    which: Annotated[Which, typer.Argument(help="whose logs")] = Which.all,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep following")] = False,
    on_swarm: OnSwarm = False,
) -> None:
    """The lab's logs: the server's traced socket calls and the clients' exchanges."""
    from lab.orchestration import stack

    with user_errors("lab logs"):
        if on_swarm:
            stack.require_swarm()
        stack.logs(which.value, follow)


def switch(
    design: Annotated[str, typer.Argument(help="the new design", callback=_check_design)],
    service: Annotated[
        str | None,
        typer.Option(
            help="echo or kv (default: the service the server ran; the data volume is kept)",
            callback=_check_service,
        ),
    ] = None,
    on_swarm: OnSwarm = False,
) -> None:
    """Restart the server with another design; the clients keep running, and so does the
    service (and the kv database) unless --service says otherwise."""
    from lab.orchestration import stack

    with user_errors("lab switch"), console.status(f"switching to {design}…"):
        if on_swarm:
            stack.require_swarm()
        server = stack.switch(design, extra_env={"LAB_SERVICE": service} if service else None)
    typer.echo(f"server {server.name} now runs {server.design} ({server.health})")


def exec_client(
    command: Annotated[list[str], typer.Argument(help="[N] -- COMMAND: client N (default 1)")],
    on_swarm: OnSwarm = False,
) -> None:
    """Run a command in a client container: `lab exec-client 2 -- lab client bakawali -m hi`."""
    from lab.orchestration import stack

    number = 1
    if len(command) > 1 and command[0].isdigit():
        number, command = int(command[0]), command[1:]
    with user_errors("lab exec-client"):
        if on_swarm:
            stack.require_swarm()
        code = stack.exec_client(number, command)
    raise typer.Exit(code)
