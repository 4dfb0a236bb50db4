"""Faults injected into a running lab: ``lab fault kill-worker``, ``pause``, ``show``, ``clear``.

Each fault says what it did and how it is undone. Their state lives where Docker keeps it, not
in this process: a paused server is a container in the ``paused`` state, so ``lab fault show``
and ``lab fault clear`` (and ``lab down``, which removes a paused container like any other) see
and undo it even when the command that paused it died before its ``--for`` ran out. A killed
worker needs no undoing: the design's master reaps it and starts another (or, for a design
that forks per connection, the next connection gets a new child).

The server's processes are found inside its container (``ps`` by exec, as the server's own
user, who may signal them): its init (tini, PID 1) runs ``lab serve``, whose children are the
workers. The health checks are execs of their own (parent 0), never counted as workers.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab.orchestration import stack
from lab.orchestration.engine import PROJECT, LabError, client
from lab.sockets.designs import DESIGNS

if TYPE_CHECKING:
    from docker.models.containers import Container

__all__ = ["SIGNALS", "WORKER_DESIGNS", "Active", "clear", "kill_worker", "pause", "show"]

#: What ``kill-worker --signal`` may send.
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "SEGV": signal.SIGSEGV}
#: The designs that serve in worker processes a kill can take away: the process pools and the
#: process per connection. The rest serve in one process (threads, an event loop).
WORKER_DESIGNS = tuple(
    name
    for name, design in DESIGNS.items()
    if design.pool_of == "processes" or design.family == "fork"
)


@dataclass(frozen=True)
class Active:
    """A fault in place now: what, on which container, and how to undo it."""

    fault: str
    container: str
    undo: str


def _processes(server: Container) -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process in the server's container."""
    result = server.exec_run(["ps", "-e", "-o", "pid=,ppid=,args="], demux=False)
    output = result.output if isinstance(result.output, bytes) else b""
    if result.exit_code != 0:
        raise LabError(f"could not list the server's processes: {output.decode(errors='replace')}")
    rows = []
    for line in output.decode(errors="replace").splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def workers(server: Container) -> list[int]:
    """The server's worker processes (in its container's PID namespace): the children of the
    ``lab serve`` that the container's init started."""
    rows = _processes(server)
    masters = [pid for pid, parent, args in rows if parent == 1 and "lab" in args]
    return sorted(pid for pid, parent, _ in rows if parent in masters)


def _running_server(project: str) -> Container:
    server = stack.server_container(client(), project)
    if server.status == "paused":
        raise LabError("the server is paused: `lab fault clear` resumes it")
    if server.status != "running":
        raise LabError(
            f"the server is {server.status}: `lab up` (or `lab switch DESIGN`) starts it"
        )
    return server


def kill_worker(project: str = PROJECT, signal_name: str = "KILL") -> tuple[str, int, str]:
    """Send ``signal_name`` to one worker of the server (the newest); returns (container, the
    worker's pid in the container, the design)."""
    if signal_name not in SIGNALS:
        raise LabError(f"--signal {signal_name!r}: choose {', '.join(SIGNALS)}")
    server = _running_server(project)
    design = stack.member(server).design
    if design not in WORKER_DESIGNS:
        raise LabError(
            f"{design} serves in one process: it has no worker to kill — kill-worker applies "
            f"to {', '.join(WORKER_DESIGNS)} (`lab switch DESIGN`)"
        )
    found = workers(server)
    if not found:
        raise LabError(
            f"{design} has no worker process now (a process per connection has none while no "
            "connection is open): try again under load (`lab bench` in another terminal)"
        )
    pid = found[-1]
    result = server.exec_run(["kill", f"-{signal_name}", str(pid)], demux=False)
    if result.exit_code != 0:
        raise LabError(f"could not signal worker {pid}: it exited meanwhile — try again")
    return str(server.name), pid, design


def pause(project: str = PROJECT, seconds: float | None = None) -> str:
    """Freeze the server's container (every process in it stops: no accept, no reply, its
    sockets' queues fill); with ``seconds``, resume it after that long. Returns its name."""
    server = _running_server(project)
    server.pause()
    if seconds is not None:
        try:
            time.sleep(seconds)
        finally:
            with contextlib.suppress(Exception):
                server.unpause()
        _healthy_again(project)
    return str(server.name)


def _healthy_again(project: str) -> None:
    """Once resumed, until the health probes pass again (missed while it was frozen, they
    may have called it unhealthy): the lab is then as the next command expects it."""
    stack.wait_healthy(client(), project)


def show(project: str = PROJECT) -> list[Active]:
    """The faults in place now (a paused container of the lab)."""
    return [
        Active("pause", str(c.name), "`lab fault clear` (or docker unpause)")
        for c in stack.containers(client(), project)
        if c.status == "paused"
    ]


def clear(project: str = PROJECT) -> list[str]:
    """Undo every fault in place; returns what was undone."""
    undone = []
    for active in show(project):
        container = client().containers.get(active.container)
        container.unpause()
        undone.append(f"resumed {active.container}")
    if undone and stack.find_server(client(), project) is not None:
        _healthy_again(project)
    return undone
