"""Faults injected into a running lab: ``lab fault kill-worker``, ``pause``, ``show``, ``clear``.

Each fault says what it did and how it is undone. Their state lives where Docker keeps it, not
in this process: a paused server is a container in the ``paused`` state, so ``lab fault show``
and ``lab fault clear`` (and ``lab down``, which removes a paused container like any other) see
and undo it even when the command that paused it died before its ``--for`` ran out. A killed
worker needs no undoing: the design's master reaps it and starts another (or, for a design
that forks per connection, the next connection gets a new child).

Network faults (``delay``, ``stall``, ``loss``, ``rate``, ``partition``) are made by a helper
container per client (:mod:`lab.orchestration.netagent`: the lab's image, root with only
``NET_ADMIN``, in the client's network namespace). The helper is the fault's state: it labels
itself with what it does, undoes the fault when it stops (SIGTERM, or its own ``--for``) and
stays behind, exited, as the record until ``clear`` (or ``lab down``) removes it. A helper that
was killed before it could undo is found by its exit code, and ``clear`` runs the agent's
idempotent ``clear`` in that client's namespace.

On Docker Swarm (``lab up --swarm``) every fault acts through the engine of the node its
container runs on (the ``--engine`` URLs given at deploy): a helper starts on its client's node,
from the image that client runs. One difference is Swarm's own: a paused server fails its
health checks, and once they have failed ``retries`` times Swarm replaces the task — a new
server (a new address for ``bakawali``) instead of the frozen one resumed. ``pause`` says so
when its ``--for`` is that long or open-ended, and reports which of the two happened.

The server's processes are found inside its container (``ps`` by exec, as the server's own
user, who may signal them): its init (tini, PID 1) runs ``lab serve``, whose children are the
workers. The health checks are execs of their own (parent 0), never counted as workers.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lab.measure.faultbench import WORKER_DESIGNS
from lab.orchestration import stack
from lab.orchestration.engine import MANAGED_LABEL, PROJECT, LabError, client

if TYPE_CHECKING:
    from docker.models.containers import Container

__all__ = [
    "NETWORK_FAULTS",
    "SIGNALS",
    "WORKER_DESIGNS",
    "Active",
    "Injected",
    "Paused",
    "clear",
    "kill_worker",
    "network_fault",
    "pause",
    "show",
]

#: What ``kill-worker --signal`` may send.
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "SEGV": signal.SIGSEGV}


#: The network faults, each with what it is in a few words.
NETWORK_FAULTS = {
    "delay": "added latency (and jitter) on the client's path to the server",
    "stall": "the path stops carrying bytes (connections hang, nothing is lost)",
    "loss": "a share of the packets between the client and the server dropped",
    "rate": "the client's sending side shaped to a bandwidth",
    "partition": "every packet between the client and labnet dropped, both ways",
}
FAULT_LABEL = "org.lab.fault"  # its kind
TARGET_LABEL = "org.lab.fault.target"  # the client container it impairs
SPEC_LABEL = "org.lab.fault.spec"  # what it does, as the user reads it
READY_TIMEOUT = 30.0  # seconds for a helper to say ``fault ready``
KILL_ATTEMPTS = 5  # kill-worker: listings to try when the chosen worker exits first
UNDO_TIMEOUT = 15  # seconds a stopping helper has to undo (a proxy drains for up to 5)


@dataclass(frozen=True)
class Injected:
    """A network fault put in place on one client."""

    fault: str
    client: str
    spec: str
    mechanism: str


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
    # A process per connection may end between the listing and the kill (a short connection):
    # then list again and take the newest then, a few times.
    for _ in range(KILL_ATTEMPTS):
        found = workers(server)
        if not found:
            raise LabError(
                f"{design} has no worker process now (a process per connection has none while "
                "no connection is open): try again under load (`lab bench` in another terminal)"
            )
        pid = found[-1]
        result = server.exec_run(["kill", f"-{signal_name}", str(pid)], demux=False)
        if result.exit_code == 0:
            return str(server.name), pid, design
    raise LabError(f"could not signal a worker: each exited meanwhile ({pid} last) — try again")


@dataclass(frozen=True)
class Paused:
    """What ``pause`` did: the container, and on Swarm what the orchestrator will do or did."""

    container: str
    # On Swarm: after about this many seconds paused its health checks have failed enough for
    # Swarm to replace the task (None: not on Swarm, nothing replaces a paused container).
    replaced_after: float | None = None
    # With --for: Swarm replaced it meanwhile (a new server task serves), not resumed.
    replaced: bool = False


def replacement_after(server: Container) -> float | None:
    """On Swarm, about how long the server can stay paused before Swarm replaces its task:
    its health check's ``retries`` failures, ``interval`` apart (each check of a paused
    container fails at once: an exec into it is refused). None off Swarm."""
    if not stack.on_swarm(server):
        return None
    check = server.attrs.get("Config", {}).get("Healthcheck") or {}
    interval = (check.get("Interval") or 30_000_000_000) / 1e9  # nanoseconds; Docker's default
    return float(check.get("Retries") or 3) * interval


def pause(project: str = PROJECT, seconds: float | None = None) -> Paused:
    """Freeze the server's container (every process in it stops: no accept, no reply, its
    sockets' queues fill); with ``seconds``, resume it after that long."""
    from docker.errors import APIError, NotFound

    server = _running_server(project)
    limit = replacement_after(server)
    server.pause()
    if seconds is None:
        return Paused(str(server.name), limit)
    replaced = False
    try:
        time.sleep(seconds)
    finally:
        try:
            server.unpause()
        except (APIError, NotFound):
            replaced = limit is not None  # Swarm took the task down: no container to resume
    _healthy_again(project)
    return Paused(str(server.name), limit, replaced)


def _healthy_again(project: str) -> None:
    """Once resumed, until the health probes pass again (missed while it was frozen, they
    may have called it unhealthy): the lab is then as the next command expects it."""
    stack.wait_healthy(client(), project)


def _clients(project: str, numbers: Sequence[int]) -> list[Container]:
    found = [
        c
        for c in stack.containers(client(), project)
        if stack.member(c).service == "client" and c.status == "running"
    ]
    if not found:
        raise LabError("no running client containers: `lab up` starts them")
    if not numbers:
        return found
    by_number = {stack.member(c).number: c for c in found}
    missing = [n for n in numbers if n not in by_number]
    if missing:
        raise LabError(
            f"no client {missing[0]}: the lab has clients {', '.join(map(str, sorted(by_number)))}"
        )
    return [by_number[n] for n in numbers]


def network_fault(
    kind: str,
    *,
    clients: Sequence[int] = (),
    seconds: float | None = None,
    delay_ms: float = 0.0,
    jitter_ms: float = 0.0,
    loss_pct: float = 0.0,
    rate_kbit: int = 0,
    project: str = PROJECT,
) -> list[Injected]:
    """Put a network fault on the path between each chosen client (all by default) and the
    server; returns what is in place, and by which mechanism."""
    if kind not in NETWORK_FAULTS:
        raise LabError(f"unknown fault {kind!r}: choose {', '.join(NETWORK_FAULTS)}")
    targets = _clients(project, clients)
    busy = {}
    for helper in _helpers(project):
        if helper.status == "running":
            busy[helper.labels.get(TARGET_LABEL)] = helper
        else:  # the record of a fault that ended: make room for its name (sweep if killed)
            _undo(helper)
    for target in targets:
        if target.name in busy:
            other = busy[target.name].labels.get(FAULT_LABEL, "?")
            raise LabError(f"{target.name} already has a {other} fault: `lab fault clear` first")
    spec = _spec(kind, delay_ms, jitter_ms, loss_pct, rate_kbit)
    argv = ["python3", "-m", "lab.orchestration.netagent", kind, "--port", stack.ECHO_PORT[:-4]]
    argv += ["--delay", f"{delay_ms:g}", "--jitter", f"{jitter_ms:g}"]
    argv += ["--loss", f"{loss_pct:g}", "--rate", str(rate_kbit)]
    if seconds is not None:
        argv += ["--for", f"{seconds:g}"]
    started: list[tuple[Container, Container]] = []
    try:
        for target in targets:
            helper = _run_helper(
                target,
                argv,
                detach=True,
                name=f"{target.name}-fault",
                labels={
                    MANAGED_LABEL: "true",
                    stack.FAULT_PROJECT_LABEL: project,
                    FAULT_LABEL: kind,
                    TARGET_LABEL: str(target.name),
                    SPEC_LABEL: spec,
                },
            )
            started.append((target, helper))
        return [
            Injected(kind, str(target.name), spec, _ready(helper)) for target, helper in started
        ]
    except BaseException:
        for _, helper in started:
            _undo(helper)
        raise


def _run_helper(target: Container, argv: list[str], **how: Any) -> Any:
    """A helper in ``target``'s network namespace, from its own image (by id): root, with
    NET_ADMIN (iptables, tc) as its only capability, and otherwise as bounded as the lab's
    containers — the hardening test's one listed exception. Returns the container (with
    ``detach=True``) or its output (run to its end)."""
    # The target's own engine (the one that listed it): on Swarm, its node's.
    return (target.client or client()).containers.run(
        str(target.attrs["Image"]),
        argv,
        user="0",
        network_mode=f"container:{target.id}",
        cap_drop=["ALL"],
        cap_add=["NET_ADMIN"],
        security_opt=["no-new-privileges"],
        read_only=True,
        tmpfs={"/run": "", "/tmp": ""},  # iptables' lock file is in /run
        pids_limit=32,
        mem_limit="256m",
        **how,
    )


def _spec(kind: str, delay_ms: float, jitter_ms: float, loss_pct: float, rate_kbit: int) -> str:
    if kind == "delay":
        return (
            f"delay {delay_ms:g} ms" + (f" ± {jitter_ms:g} ms" if jitter_ms else "") + " each way"
        )
    if kind == "loss":
        return f"loss {loss_pct:g} %"
    if kind == "rate":
        return f"rate {rate_kbit} kbit/s"
    return kind


def _ready(helper: Container) -> str:
    """Wait for the helper's ``fault ready mechanism=…`` line; returns the mechanism."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = helper.logs().decode(errors="replace")
        for line in text.splitlines():
            if line.startswith("fault ready mechanism="):
                return line.partition("=")[2]
            if line.startswith("fault failed:"):
                raise LabError(f"{helper.name}: {line} — the fault is not in place")
        helper.reload()
        if helper.status == "exited":
            last = text.strip().splitlines()[-1:] or ["(no output)"]
            raise LabError(f"{helper.name} exited before the fault was in place: {last[0]}")
        time.sleep(0.1)
    raise LabError(f"{helper.name} did not put the fault in place in {READY_TIMEOUT:g} s")


def _helpers(project: str) -> list[Container]:
    return stack.fault_helpers(client(), project)


def _undo(helper: Container) -> str:
    """Stop a helper (it undoes its fault), make sure its rules are gone, remove it. Returns
    what was undone."""
    from docker.errors import APIError, NotFound

    target = helper.labels.get(TARGET_LABEL, "?")
    spec = helper.labels.get(SPEC_LABEL, helper.labels.get(FAULT_LABEL, "?"))
    with contextlib.suppress(NotFound, APIError):
        if helper.status in ("running", "created", "restarting"):
            helper.stop(timeout=UNDO_TIMEOUT)
        helper.reload()
        code = helper.attrs.get("State", {}).get("ExitCode", 0)
        if code != 0 and helper.attrs.get("State", {}).get("Status") == "exited":
            _sweep(helper, target)  # killed before it undid: its rules may be in place
        helper.remove(force=True)
    return f"{spec} removed from {target}"


def _sweep(helper: Container, target: str) -> None:
    """Run the agent's ``clear`` in ``target``'s namespace (a short-lived helper, for one that
    died before it could undo; ``helper``'s engine is the target's)."""
    from docker.errors import APIError, NotFound

    try:
        container = (helper.client or client()).containers.get(target)
    except NotFound:
        return  # gone, and its namespace with it
    if container.status != "running":
        return
    with contextlib.suppress(APIError):
        _run_helper(
            container,
            ["python3", "-m", "lab.orchestration.netagent", "clear"],
            remove=True,
            labels={MANAGED_LABEL: "true"},
        )


def show(project: str = PROJECT) -> list[Active]:
    """The faults in place now: a paused container of the lab, a running fault helper."""
    paused = [
        Active("pause", str(c.name), "`lab fault clear` (or docker unpause)")
        for c in stack.containers(client(), project)
        if c.status == "paused"
    ]
    network = [
        Active(
            str(h.labels.get(SPEC_LABEL, h.labels.get(FAULT_LABEL, "?"))),
            str(h.labels.get(TARGET_LABEL, "?")),
            "`lab fault clear` (or `lab down`)",
        )
        for h in _helpers(project)
        if h.status == "running"
    ]
    return paused + network


def clear(project: str = PROJECT) -> list[str]:
    """Undo every fault in place; returns what was undone."""
    undone = clear_network(project)
    for container in stack.containers(client(), project):
        if container.status == "paused":
            container.unpause()  # through the engine that listed it (its node's, on Swarm)
            undone.append(f"resumed {container.name}")
    if any(u.startswith("resumed") for u in undone) and stack.find_server(client(), project):
        _healthy_again(project)
    return undone


def clear_network(project: str = PROJECT) -> list[str]:
    """Undo every network fault (and remove the records of ended ones); returns what was
    undone."""
    undone = []
    for helper in _helpers(project):
        running = helper.status == "running"
        killed = not running and helper.attrs.get("State", {}).get("ExitCode", 0) != 0
        what = _undo(helper)
        if running:
            undone.append(what)
        elif killed:  # it died before undoing: _undo swept its rules
            undone.append(f"{what} (its helper had died: its rules swept)")
    return undone
