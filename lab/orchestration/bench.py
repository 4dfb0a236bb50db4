"""The containerised backend of ``lab bench``: the server in the lab's server container, the
load from every client container at once (one shared start time), the server's cost read from
its container's cgroup and network namespace — from the host (:mod:`lab.orchestration.readings`).

A bench leaves the lab as it found it: :meth:`DockerBackend.close` (at the end of a sweep, or
when the process exits) puts back the server that ran before, or removes a lab it started.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lab.measure import kvcheck, probe
from lab.measure.bench import BenchError, ServerSpec, database_of
from lab.measure.config import KV, LoadConfig
from lab.measure.faultbench import NETWORK, FaultSpec
from lab.measure.result import LoadResult, merge
from lab.orchestration import stack
from lab.orchestration.compose import PROJECT_LABEL, SERVICE_LABEL
from lab.orchestration.engine import LABELS, PROJECT, LabError, client, engine_has_migrate_req
from lab.orchestration.loaders import LateStart, LoaderSession
from lab.orchestration.readings import ContainerReader
from lab.orchestration.stack import DATA_DIR
from lab.sockets.config import DEFAULT_DB

if TYPE_CHECKING:
    from docker.models.containers import Container

SERVER_HOST = "bakawali"
SERVER_PORT = 12345
# Seconds between sending the loaders off and their shared start time, tried in turn.
START_LEADS = (0.3, 2.0, 8.0)


def peer_sysctls() -> dict[str, str]:
    """A container in the server's place gets the server's sysctls (compose.yaml and, where the
    kernel has it, images/compose.migrate-req.yaml): no SYN cookies, reuseport's queues moved."""
    sysctls = {"net.ipv4.tcp_syncookies": "0"}
    if engine_has_migrate_req():
        sysctls["net.ipv4.tcp_migrate_req"] = "1"
    return sysctls


def describe() -> dict[str, Any]:
    """What a containerised run records of its environment: engine, compose, image."""
    from lab.orchestration import compose, swarm
    from lab.orchestration.images import ensure_images

    engine = client()
    images = ensure_images()
    found = {
        "docker": engine.version().get("Version"),
        "compose": compose.version(),
        "image": images.lab,
        "image_id": engine.images.get(images.lab).id,
    }
    if swarm.deployed(engine, PROJECT):
        found["swarm"] = placement(engine, PROJECT)
    return found


def placement(engine: Any, project: str) -> dict[str, str]:
    """Where a Swarm lab runs, for a report: its nodes and the node of each task."""
    from lab.orchestration import swarm

    return {
        "nodes": ", ".join(f"{n.hostname} ({n.role})" for n in swarm.nodes(engine)),
        "tasks": ", ".join(
            f"{t['task']} on {t['node']}" for t in swarm.placements(engine, project)
        ),
    }


def options_env(options: tuple[str, ...]) -> dict[str, str]:
    """``("--workers", "2")`` → ``{"LAB_WORKERS": "2"}``: containers take options as env."""
    env: dict[str, str] = {}
    items = list(options)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise BenchError(f"server option {flag!r}: give options as --name value")
        value = items.pop(0) if items and not items[0].startswith("--") else "1"
        env["LAB_" + flag[2:].replace("-", "_").upper()] = value
    return env


def share_config(config: LoadConfig, start_at: float, share: int, parts: int) -> LoadConfig:
    """One client container's share of a load: of the concurrency (and of the rate and the
    request count), with the common start time."""
    concurrency = max(
        1, config.concurrency // parts + (1 if share < config.concurrency % parts else 0)
    )
    return dataclasses.replace(
        config,
        concurrency=concurrency,
        processes=min(config.processes, concurrency),
        start_at=start_at,
        rate=config.rate / parts if config.rate is not None else None,
        requests=max(1, config.requests // parts) if config.requests is not None else None,
    )


@dataclass(frozen=True)
class _Found:
    """The lab as a bench found it: its server (container id, design, the settings to make it
    again) and its containers' CPU sets (--pin changes them) — or no server at all (the bench
    starts the lab)."""

    server_id: str | None
    design: str
    settings: dict[str, str]
    cpusets: dict[str, str]  # container id → its CpusetCpus ("" for every CPU)


class DockerBackend:
    name = "docker"

    def __init__(self, project: str = PROJECT, clients: int = 3, pin: bool = False) -> None:
        self.project = project
        self.clients = clients
        # --pin: the server's container on core 0, the loaders' on core 1 (two cores or more)
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.engine = client()
        self.peer: Container | None = None
        self.peer_name = ""
        self.peer_options: tuple[str, ...] = ()  # the options the running peer was given
        self.peer_spec: ServerSpec | None = None  # what the running peer (or user server) is
        self._current: tuple[str, dict[str, str]] | None = None  # design and env now running
        self._found: _Found | None = None  # the lab before the first start; None once restored
        self._reader: ContainerReader | None = None  # of the server now running
        self._notes: set[str] = set()
        self._sessions: dict[str, LoaderSession] = {}  # container id → its load service
        self.generation = 0  # counts server starts (bench() measures idle once per start)

    # -- the server ---------------------------------------------------------------------------
    def start(self, server: ServerSpec) -> tuple[str, int]:
        """Reuse what already runs when it is what is asked for (a sweep runs one design many
        times); otherwise switch the server (or put a peer in its place)."""
        # Tracing would be measured. The service is always said (a switch otherwise keeps the
        # one the server it replaces ran: a kv run's server would serve the next echo run).
        env = {"LAB_TRACE": "0", "LAB_SERVICE": "echo", "LAB_DB": "", **options_env(server.options)}
        self._remember()
        self._reader = None  # the server may change: read whichever runs after this
        if (server.peer or server.command) and self._on_swarm():
            raise LabError(
                f"{server.design}: peers and --server-cmd run in the compose lab only (on Swarm "
                "the server is a service's task): bench the lab's designs, or `lab down` and "
                "`lab up`"
            )
        if server.peer or server.command:
            # another peer or user server, or other options: restart
            if self.peer is None or self.peer_spec != server:
                self._remove_peer()
                if server.command:
                    self._start_user(server)
                else:
                    self._start_peer(server.peer or "", server.options)
                self.peer_spec = server
                self.generation += 1
            return SERVER_HOST, SERVER_PORT
        self._remove_peer()
        running = [c for c in stack.containers(self.engine, self.project) if c.status == "running"]
        if not running:
            self._up(server.design, env)
            self.generation += 1
        elif self._current != (server.design, env) or not self._server_running():
            stack.switch(server.design, self.project, extra_env=env)
            self.generation += 1
        self._current = (server.design, env)
        self._apply_pinning()
        return SERVER_HOST, SERVER_PORT

    def _on_swarm(self) -> bool:
        server = stack.find_server(self.engine, self.project)
        return server is not None and stack.on_swarm(server)

    def _up(self, design: str, env: dict[str, str] | None = None) -> None:
        """Start the lab, and wait until its clients' introductory exchanges are over: they
        would otherwise reach the server (or the peer put in its place) during the bench."""
        stack.up(design, self.clients, project=self.project, extra_env=env)
        stack.wait_for_introductions(self.project)

    def _apply_pinning(self) -> None:
        if not self.pin or self._on_swarm():  # a task's CPU set is the node's business
            return
        for container in stack.containers(self.engine, self.project):
            if container.status == "running":
                service = stack.service_of(container)
                container.update(cpuset_cpus="1" if service == "client" else "0")

    def _server_running(self) -> bool:
        return stack.server_container(self.engine, self.project).status == "running"

    def _start_peer(self, peer: str, options: tuple[str, ...] = ()) -> None:
        """A peer takes the server's place: the compose server stops, and the peer runs in a
        container of the same image, hardening and network, under the alias ``bakawali``.
        The next design's start recreates the compose server."""
        # the spec's options (e.g. --workers for the C pools) as for a local peer
        command = ["python3", "-m", "lab.measure.peers", peer, "--port", str(SERVER_PORT)]
        container = self._in_servers_place(f"peer_{peer}", [*command, *options])
        self.peer, self.peer_name, self.peer_options = container, peer, options
        self._apply_pinning()
        self._current = None  # the compose server is stopped: a design must switch it back
        deadline = time.monotonic() + 30
        while b"ready design=" not in container.logs():
            container.reload()
            if container.status == "exited" or time.monotonic() > deadline:
                self._remove_peer()
                raise LabError(f"the peer {peer} did not start in its container")
            time.sleep(0.2)

    def _start_user(self, server: ServerSpec) -> None:
        """A user's server takes the server's place as a peer does: its command (``{port}`` →
        12345, ``{host}`` → 0.0.0.0) in a container of the lab image, the ``--mount`` paths
        read-only at the same paths; ready once something listens on the port."""
        from lab.measure import usercmd

        words = usercmd.substitute(usercmd.parse_command(server.command), SERVER_PORT, "0.0.0.0")
        container = self._in_servers_place(
            f"user_{server.design}",
            words,
            volumes={path: {"bind": path, "mode": "ro"} for path in server.mounts},
            working_dir=usercmd.working_dir(server.mounts),
        )
        self.peer, self.peer_name, self.peer_options = container, server.design, ()
        self._apply_pinning()
        self._current = None
        try:
            _wait_listening(container, server.command, words[0])
        except usercmd.UserServerError:
            self._remove_peer()
            raise

    def _in_servers_place(self, what: str, command: list[str], **extra: Any) -> Container:
        """A started container in the server's place: the compose server stops, and this runs
        from the same image, with its hardening, on its network under the alias ``bakawali``."""
        running = [c for c in stack.containers(self.engine, self.project) if c.status == "running"]
        if not running:
            self._up("iterative")
        server = stack.server_container(self.engine, self.project)
        image = str(server.attrs["Config"]["Image"])
        network = next(iter(server.attrs["NetworkSettings"]["Networks"]))
        server.stop(timeout=20)
        # Created on labnet with its alias, so it is on labnet only (as the compose server), not
        # first on Docker's default bridge and then connected.
        endpoint = self.engine.api.create_endpoint_config(aliases=[SERVER_HOST])
        container = self.engine.containers.create(
            image,
            command,
            name=f"{self.project}_{what}",
            hostname=SERVER_HOST,
            init=True,
            labels={
                **LABELS,
                "org.lab.role": "peer",
                PROJECT_LABEL: self.project,
                SERVICE_LABEL: "peer",
            },
            cap_drop=["ALL"],
            read_only=True,
            tmpfs={"/tmp": ""},
            security_opt=["no-new-privileges:true"],
            pids_limit=1200,
            mem_limit=int(server.attrs["HostConfig"].get("Memory") or 0) or None,
            sysctls=peer_sysctls(),
            network=network,
            networking_config={network: endpoint},
            **{key: value for key, value in extra.items() if value is not None},
        )
        container.start()
        return container

    def _remove_peer(self) -> None:
        if self.peer is not None:
            with contextlib.suppress(Exception):  # already gone is fine
                if self.peer_spec is not None and self.peer_spec.command:
                    self.peer.stop(timeout=10)  # a user's server: SIGTERM, SIGKILL after 10 s
                self.peer.remove(force=True)
            self.peer = None
            self.peer_spec = None

    def _server(self) -> Container:
        if self.peer is not None:
            return self.peer
        return stack.server_container(self.engine, self.project)

    def reader(self) -> ContainerReader:
        """How the running server is read: from the host, or by exec (noted once a sweep)."""
        if self._reader is None:
            self._reader = ContainerReader(self._server(), note=self._note_once)
        return self._reader

    def _note_once(self, line: str) -> None:
        if line not in self._notes:
            self._notes.add(line)
            print(line, file=sys.stderr)

    def stats(self) -> dict[str, Any] | None:
        if self.peer is not None:
            return None  # a peer keeps no statistics of ours
        return stack.server_stats(self.engine, self.project)

    def cpu_seconds(self) -> float:
        return self.reader().cgroup().cpu_seconds

    def memory_bytes(self) -> int:
        return self.reader().cgroup().memory_bytes

    def listen_overflows(self) -> int:
        return probe.listen_overflows(self.reader().netstat())

    def conntrack(self) -> list[probe.Conntrack]:
        """The host's table (Docker's bridge sends the containers' packets through the host's
        netfilter) and the server container's own (Docker's DNS rules load it there)."""
        server = probe.conntrack(
            self.reader().net_file("stat/nf_conntrack"), probe.local_file(probe.CONNTRACK_MAX)
        )
        return [t for t in (probe.local_conntrack(), server) if t is not None]

    def kv_readings(
        self, server: ServerSpec, tag: str, indices: list[int]
    ) -> list[kvcheck.Reading]:
        """The kv run's counters through the server, from a client container (where
        ``bakawali`` resolves), and from the database file, in the server's container (on the
        lab's data volume; a user's server: through itself only)."""
        clients = [
            c
            for c in stack.containers(self.engine, self.project)
            if stack.service_of(c) == "client" and c.status == "running"
        ]
        spread = ",".join(map(str, indices))
        through = ["server", SERVER_HOST, str(SERVER_PORT), tag, spread]
        readings = [_kv_exec(clients[0] if clients else None, "server", through)]
        if not server.command:
            path = database_of(server) or f"{DATA_DIR}/{DEFAULT_DB}"
            readings.append(_kv_exec(self._server(), "file", ["file", path, tag]))
        return readings

    def stop(self) -> None:
        """Nothing: the next run may reuse what runs (`close` ends a sweep)."""

    # -- leaving the lab as it was found --------------------------------------------------------
    def _remember(self) -> None:
        """Before the first change: note the lab as it is, to put it back in :meth:`close` —
        which also runs when the process exits, for a caller that never calls it (``lab
        bench``) or a sweep cut short."""
        if self._found is not None:
            return
        found = stack.containers(self.engine, self.project)
        server = next((c for c in found if stack.service_of(c) == "server"), None)
        self._found = _Found(
            server_id=server.id if server is not None else None,
            design=stack.member(server).design if server is not None else "",
            settings=stack.server_settings(server) if server is not None else {},
            cpusets={
                str(c.id): str(c.attrs.get("HostConfig", {}).get("CpusetCpus") or "") for c in found
            },
        )
        # A peer a killed bench left behind would answer for bakawali beside our server.
        stack.remove_foreign(self.engine, self.project)
        atexit.register(self.close)

    def close(self) -> None:
        """After a run or a sweep: the loaders' services end and the lab is as it was found: the
        peer goes; the server that ran before is back (its design and settings, healthy) and
        the clients are unpinned; a lab the bench started is removed. If that fails, one line
        on stderr says what was left."""
        atexit.unregister(self.close)
        self._close_sessions()
        self._remove_peer()
        self._reader, self._current = None, None
        found, self._found = self._found, None
        if found is None:
            return
        try:
            self._restore(found)
        except (LabError, OSError) as exc:
            try:
                left = stack.summary(stack.containers(self.engine, self.project))
            except Exception:  # the engine itself is gone: the error says enough
                left = "unknown"
            what = f"`lab switch {found.design}`" if found.design else "`lab down`"
            print(
                f"lab: could not put the lab back as it was ({exc}); it is left with: {left} — "
                f"{what} puts it right",
                file=sys.stderr,
            )

    def _restore(self, found: _Found) -> None:
        from docker.errors import APIError, NotFound

        now = stack.containers(self.engine, self.project)
        if not now:
            return  # taken down meanwhile (`lab down`): that is the newer wish
        if found.server_id is None:
            stack.down(self.project, timeout=5)  # the bench started the lab: it goes
            return
        server = next((c for c in now if stack.service_of(c) == "server"), None)
        if server is None or server.id != found.server_id or server.status != "running":
            stack.switch(found.design, self.project, extra_env=found.settings)
        every_cpu = f"0-{max(1, int(self.engine.info().get('NCPU') or 1)) - 1}"
        for container in stack.containers(self.engine, self.project):
            was = found.cpusets.get(str(container.id))
            if was is not None and container.attrs["HostConfig"].get("CpusetCpus", "") != was:
                # An empty CpusetCpus means "no change" to `docker update`: say every CPU.
                with contextlib.suppress(NotFound, APIError):
                    container.update(cpuset_cpus=was or every_cpu)

    # -- the loaders ----------------------------------------------------------------------------
    # -- faults (lab bench --fault) -------------------------------------------------------------
    def inject(self, fault: FaultSpec) -> str:
        """Through ``lab fault``'s machinery (lab.orchestration.faults); a switch as ``lab
        switch`` does it, keeping this bench's settings for the server."""
        from lab.orchestration import faults

        if self.peer is not None:
            raise LabError("--fault runs on the lab's designs, not on a peer or your server")
        if fault.kind == "kill-worker":
            _, pid, design = faults.kill_worker(self.project, fault.value or "KILL")
            return f"SIG{fault.value or 'KILL'} to worker {pid} of {design}"
        if fault.kind == "pause":
            stack.server_container(self.engine, self.project).pause()
            return "paused the server's container (docker pause)"
        if fault.kind == "switch":
            env = self._current[1] if self._current else {}
            stack.switch(fault.value, self.project, extra_env=env)
            self._current = None  # another design runs now: the next start switches back
            self._reader = None
            return f"switched the server to {fault.value} (lab switch: the old one drains)"
        injected = faults.network_fault(
            fault.kind,
            clients=[fault.client] if fault.client else (),
            delay_ms=float(fault.value or 0) if fault.kind == "delay" else 0.0,
            jitter_ms=float(fault.extra or 0),
            loss_pct=float(fault.value or 0) if fault.kind == "loss" else 0.0,
            rate_kbit=int(float(fault.value or 0)) if fault.kind == "rate" else 0,
            project=self.project,
        )
        return "; ".join(f"{i.spec} on {i.client}, by {i.mechanism}" for i in injected)

    def undo(self, fault: FaultSpec) -> None:
        from lab.orchestration import faults

        if fault.kind == "pause":
            server = stack.find_server(self.engine, self.project)
            if server is not None:
                server.reload()
                if server.status == "paused":
                    server.unpause()
        elif fault.kind in NETWORK:
            faults.clear_network(self.project)

    def load(
        self, config: LoadConfig, at_start: Callable[[float], None] | None = None
    ) -> LoadResult:
        loaders = [
            c
            for c in stack.containers(self.engine, self.project)
            if stack.service_of(c) == "client" and c.status == "running"
        ]
        if not loaders:
            raise LabError("no running client containers: `lab up` starts them")
        # The loaders start at one shared time, chosen ahead by a lead that covers starting
        # `lab load` in every container. On a busy machine that can take longer: a loader that
        # began later than the warm-up allows missed part of the window, so run again with a
        # longer lead (bounded). One that began so late that the start time had passed refuses
        # to run at all: the same, try a longer lead.
        sessions = [self._session(container) for container in loaders]
        timeout = config.warmup + config.duration + 60.0
        for attempt, lead in enumerate(START_LEADS):
            start_at = time.time() + lead
            if attempt and config.workload == KV:
                # The run before was thrown away, but its INCRs committed: counters of its own.
                config = dataclasses.replace(config, tag=secrets.token_hex(4))
            if at_start is not None:
                at_start(start_at)  # a fault bench's timer follows the start
            configs = [share_config(config, start_at, i, len(loaders)) for i in range(len(loaders))]
            try:
                with ThreadPoolExecutor(len(loaders)) as pool:
                    outputs = list(pool.map(lambda s, c: s.run(c, timeout), sessions, configs))
            except LateStart:
                if lead == START_LEADS[-1]:
                    raise
                continue
            except LabError:
                self._close_sessions()  # a service in an unknown state: start afresh next time
                raise
            result = merge(LoadResult.from_dict(output) for output in outputs)
            # A run of a fixed count of requests measures every one of them however late a
            # loader began: running it again would only send the server the count again.
            # Nor is a fault bench's: its fault was injected into this run, once.
            if (
                result.loader_start_lag_s <= config.warmup
                or config.requests is not None
                or at_start is not None
            ):
                break
        return result

    def _session(self, container: Container) -> LoaderSession:
        """The load service of ``container``, started on its first load (see loaders.py)."""
        session = self._sessions.get(str(container.id))
        if session is None:
            session = self._sessions[str(container.id)] = LoaderSession(
                container.client or self.engine, container
            )
        return session

    def _close_sessions(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions = {}


def _kv_exec(container: Container | None, source: str, args: list[str]) -> kvcheck.Reading:
    """A :class:`~lab.measure.kvcheck.Reading` made in ``container`` (its JSON line)."""
    if container is None:
        return kvcheck.Reading(source, error="no running container to read it from")
    result = container.exec_run(["python3", "-m", "lab.measure.kvcheck", *args], demux=False)
    code, output = result.exit_code, result.output
    text = output.decode("utf-8", "replace").strip() if isinstance(output, bytes) else ""
    try:
        data = json.loads(text.splitlines()[-1])
        return kvcheck.Reading(str(data["source"]), data["stored"], data["error"])
    except (IndexError, ValueError, KeyError, TypeError):
        last = text.splitlines()[-1] if text else f"exit code {code}"
        return kvcheck.Reading(source, error=f"could not read it in {container.name}: {last}")


def _wait_listening(container: Container, command: str, program: str) -> None:
    """Until the user's server in ``container`` listens on :data:`SERVER_PORT` on an address the
    clients reach: its network namespace's TCP tables, read from the host (or by exec). Its
    exit, listening on loopback only, or the timeout is a one-line
    :class:`~lab.measure.usercmd.UserServerError`."""
    from lab.measure import usercmd

    reader = ContainerReader(container, note=lambda _line: None)
    state: dict[str, str | None] = {"seen": None}

    def accepts() -> bool:
        try:
            tables = [reader.net_file(name) or "" for name in ("tcp", "tcp6")]
        except Exception:  # it exited meanwhile (exec into a stopped container): asked next
            return False
        state["seen"] = usercmd.listening(tables, SERVER_PORT)
        return state["seen"] == "any"

    def exit_code() -> int | None:
        container.reload()
        if container.status in ("exited", "dead"):
            return int(container.attrs.get("State", {}).get("ExitCode") or 0)
        return None

    def on_exit(code: int | None) -> usercmd.UserServerError:
        lines = container.logs(stdout=False, stderr=True).decode(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        if code in (126, 127) or ("exec" in last and "No such file" in last):
            return usercmd.UserServerError(
                f"the server command's program {program!r} is not in the lab image: use one it "
                "has (python3, socat, bash …), or mount yours with --mount PATH"
            )
        return usercmd.exited(command, code, last)

    try:
        usercmd.wait_accepting(
            accepts,
            exit_code,
            on_exit,
            usercmd.never_accepted(command, SERVER_PORT, usercmd.READY_TIMEOUT),
            usercmd.READY_TIMEOUT,
        )
    except usercmd.UserServerError:
        if state["seen"] == "loopback":
            raise usercmd.UserServerError(
                f"{command!r} listens on port {SERVER_PORT} of loopback only, which the client "
                "containers cannot reach: make it listen on {host} (0.0.0.0)"
            ) from None
        raise
