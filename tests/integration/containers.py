"""The lab's containers for the integration tests, the testcontainers way.

* :class:`LabServer` — ``lab serve`` (the image's command) configured by LAB_* variables through
  builders (``with_design``, ``with_workers`` …), locked down as compose.yaml locks it down, and
  ready once it prints ``ready design=<design>``; :meth:`LabServer.stats` asks for live statistics
  (SIGUSR1) and returns the JSON line it prints.
* :class:`LabClient` — an idle container (``sleep infinity``, or ``lab-client-intro`` then idle)
  that the tests run commands in: :meth:`LabClient.run` (bounded, returns exit code and output)
  and :meth:`LabClient.start` (in the background, for a command that must be in progress).
* :class:`Topologies` — a factory of :class:`Topology`: a private, labelled, *internal* network
  (no route out: no traffic leaves the host), the server on it aliased ``bakawali`` and a few
  clients that reach it by that name from their own containers. ``close()`` removes everything
  it started, forcefully, whatever the test did.

Every container and network carries ``org.lab.managed=true`` and ``org.lab.test-run=<RUN_ID>``
(one uuid4 per pytest process), so the session's sweep (:func:`sweep`) removes exactly this run's
objects and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness import wait_until
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import ExecWaitStrategy, LogMessageWaitStrategy

from lab.orchestration.compose import PROJECT_LABEL
from lab.orchestration.engine import LABELS
from lab.orchestration.stack import FAULT_PROJECT_LABEL as FAULT_LABEL

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

RUN_LABEL = "org.lab.test-run"
RUN_ID = str(uuid.uuid4())
ROLE_LABEL = "org.lab.role"
# Compose projects the tests bring up are named labtest-<this run>-<n>; the sweep removes them.
PROJECT_PREFIX = f"labtest-{RUN_ID[:8]}"

SERVER_ALIAS = "bakawali"  # the original chapter's server host name
ECHO_PORT = 12345
HEALTH_PORT = 12346
READY_TIMEOUT = 30.0  # seconds for `ready design=` after the container starts
STATS_TIMEOUT = 10.0  # seconds for the statistics line after SIGUSR1
STATS_PREFIX = '{"event": "stats"'
ORIGINAL_MESSAGE = "This is a test message from a stupid client lol!"  # 49 bytes with --nul
# `timeout` exits 124 when the bound ran out (137 if it had to SIGKILL after --kill-after).
TIMEOUT_EXIT_CODES = (124, 137)


def run_labels(**extra: str) -> dict[str, str]:
    """The labels every object of this test run carries (plus ``extra``)."""
    return {**LABELS, RUN_LABEL: RUN_ID, **extra}


def container_logs(container: Container) -> str:
    """stdout and stderr of a container, interleaved as written."""
    return bytes(container.logs()).decode("utf-8", "replace")


def stats_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(STATS_PREFIX)]


def request_stats(container: Container, timeout: float = STATS_TIMEOUT) -> dict[str, Any]:
    """SIGUSR1 to a lab server's container (tini forwards it), then the NEW statistics line.

    Counts the statistics lines already printed first, so an older line is never taken for the
    answer (comparing timestamps with one-second precision could).
    """
    before = len(stats_lines(container_logs(container)))
    container.kill(signal="SIGUSR1")
    found: list[str] = []

    def answered() -> bool:
        found[:] = stats_lines(container_logs(container))
        return len(found) > before

    if not wait_until(answered, timeout, interval=0.1):
        tail = "\n".join(container_logs(container).splitlines()[-15:])
        raise AssertionError(
            f"no statistics line within {timeout:g} s after SIGUSR1; the server's last lines:\n"
            f"{tail}"
        )
    stats: dict[str, Any] = json.loads(found[-1])
    return stats


class ServerNotReady(AssertionError):
    """The server never printed its ``ready design=`` line; the message says what it printed."""


class LabServer(DockerContainer):
    """``lab serve`` in a container, configured as compose.yaml configures the lab's server."""

    def __init__(self, image: str, design: str = "iterative") -> None:
        super().__init__(
            image,
            hostname=SERVER_ALIAS,
            labels=run_labels(**{ROLE_LABEL: "server"}),
            init=True,  # tini as PID 1 forwards SIGUSR1/SIGTERM to `lab serve`
            cap_drop=["ALL"],
            read_only=True,
            security_opt=["no-new-privileges:true"],
            pids_limit=1200,
        )
        self.with_tmpfs_mount("/tmp")
        self.with_env("LAB_HEALTH_PORT", str(HEALTH_PORT))
        self.design = ""
        self.with_design(design)

    # -- builders -------------------------------------------------------------------------------
    def with_design(self, design: str) -> LabServer:
        self.design = design
        self.with_env("LAB_DESIGN", design)
        # The ready line names the design: a server that fell back to another one never matches.
        ready = re.compile(rf"^ready design={re.escape(design)} ", re.MULTILINE)
        return self.waiting_for(
            LogMessageWaitStrategy(ready).with_startup_timeout(int(READY_TIMEOUT))
        )

    def with_option(self, name: str, value: object) -> LabServer:
        """Any ``lab serve`` option, by its LAB_<NAME> variable (``backlog`` → LAB_BACKLOG)."""
        return self.with_env("LAB_" + name.upper().replace("-", "_"), str(value))

    def with_workers(self, workers: int) -> LabServer:
        return self.with_option("workers", workers)

    def with_trace(self, trace: bool = True) -> LabServer:
        return self.with_option("trace", int(trace))

    def with_grace(self, seconds: float) -> LabServer:
        return self.with_option("grace", seconds)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LabServer:
        try:
            super().start()
        except (TimeoutError, RuntimeError) as exc:
            raise ServerNotReady(
                f"the {self.design} server printed no 'ready design={self.design}' line "
                f"({str(exc).split('. ')[0]}); its last lines:\n{self.tail()}\n"
                "hint: check the LAB_* options it was given (an invalid one makes `lab serve` "
                "exit 2 with a one-line error)"
            ) from exc
        return self

    # -- looking at it --------------------------------------------------------------------------
    def logs(self) -> str:
        return container_logs(self.get_wrapped_container())

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logs().splitlines()[-lines:]) or "(no output)"
        except Exception as exc:  # the container may be gone: the hint must not hide the error
            return f"(logs unavailable: {exc})"

    def stats(self, timeout: float = STATS_TIMEOUT) -> dict[str, Any]:
        """Live statistics: SIGUSR1, then the newest ``{"event": "stats", …}`` line."""
        return request_stats(self.get_wrapped_container(), timeout)

    def kill(self) -> None:
        """SIGKILL every process of the container at once (the container stays, exited)."""
        self.get_wrapped_container().kill()


class LabClient(DockerContainer):
    """An idle client container on the lab's network; tests run ``lab client`` … in it."""

    def __init__(
        self, image: str, server: str = SERVER_ALIAS, dns_timeout: int | None = None
    ) -> None:
        """``dns_timeout``: seconds the resolver waits for Docker's DNS, once (by default glibc
        waits 5 s, twice: on an internal network a name nobody has is never answered)."""
        super().__init__(
            image,
            labels=run_labels(**{ROLE_LABEL: "client"}),
            init=True,  # tini: `sleep infinity` dies at once on SIGTERM
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            # As compose.yaml: many short connections from one container.
            sysctls={"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"},
            dns_opt=[f"timeout:{dns_timeout}", "attempts:1"] if dns_timeout else None,
        )
        self.server = server
        self.with_command(["sleep", "infinity"])
        self.with_env("LAB_SERVER", server)
        # Ready once Docker's DNS answers for the server's name from inside this container.
        self.waiting_for(
            ExecWaitStrategy(["getent", "hosts", server]).with_startup_timeout(int(READY_TIMEOUT))
        )

    def with_intro(self, messages: int = 3) -> LabClient:
        """Run ``lab-client-intro`` (the compose clients' command): N messages, then idle."""
        self.with_env("LAB_INTRO_MESSAGES", str(messages))
        return self.with_command(["lab-client-intro"])

    def run(self, argv: Sequence[str], bound: float = 60.0) -> tuple[int, str]:
        """Run ``argv`` in the container, bounded by ``timeout`` there; (exit code, output).

        stdout and stderr come back merged. Exit 124 means the bound ran out (a hang).
        """
        code, output = self.get_wrapped_container().exec_run(_bounded(argv, bound))
        assert isinstance(output, bytes) and code is not None  # not streamed: ended, all there
        return code, output.decode("utf-8", "replace")

    def start_exec(self, argv: Sequence[str], bound: float = 60.0) -> RunningExec:
        """Start ``argv`` (bounded as :meth:`run`) and return at once; see :class:`RunningExec`."""
        return RunningExec(self.get_wrapped_container(), _bounded(argv, bound))


def _bounded(argv: Sequence[str], bound: float) -> list[str]:
    return ["timeout", "--kill-after=5", f"{bound:g}", *argv]


class RunningExec:
    """A command running in a container while the test does something else."""

    def __init__(self, container: Container, argv: list[str]) -> None:
        assert container.client is not None, "a container from the engine has its client"
        self._api = container.client.api
        self._id: str = self._api.exec_create(container.id, argv, stdout=True, stderr=True)["Id"]
        self._chunks: list[bytes] = []
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for chunk in self._api.exec_start(self._id, stream=True):
                with self._cond:
                    self._chunks.append(chunk)
                    self._cond.notify_all()
        except BaseException as exc:  # reported by result(); a thread cannot raise to the test
            self._error = exc
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether ``text`` appeared in the output within ``timeout`` (or before it ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text not in b"".join(self._chunks).decode("utf-8", "replace"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(remaining, 0.2))
        return True

    def result(self, timeout: float) -> tuple[int, str]:
        """(exit code, output) once it ended; AssertionError if it still runs after ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(
                f"the command still runs after {timeout:g} s (a hang); output so far:\n"
                f"{self.output}"
            )
        if self._error is not None:
            raise self._error
        code = self._api.exec_inspect(self._id)["ExitCode"]
        return int(code), self.output


@dataclass
class Topology:
    """One server (``bakawali``) and its clients on a private network."""

    network: Network
    server: LabServer
    clients: list[LabClient]


class Topologies:
    """Starts topologies; :meth:`close` removes every container and network they made."""

    def __init__(self, image: str) -> None:
        self.image = image
        self._cleanup = contextlib.ExitStack()

    def __call__(
        self,
        design: str,
        clients: int = 3,
        server_options: dict[str, object] | None = None,
        client_dns_timeout: int | None = None,
    ) -> Topology:
        network = Network(
            docker_network_kw={"labels": run_labels(), "internal": True, "driver": "bridge"}
        )
        network.create()
        self._cleanup.callback(_quietly, network.remove)

        server = LabServer(self.image, design).with_network(network)
        server.with_network_aliases(SERVER_ALIAS)
        for name, value in (server_options or {}).items():
            server.with_option(name, value)
        # Registered before start(): a server that never gets ready is removed all the same.
        self._cleanup.callback(_remove, server)
        server.start()

        made = [
            LabClient(self.image, dns_timeout=client_dns_timeout).with_network(network)
            for _ in range(clients)
        ]
        for client in made:
            self._cleanup.callback(_remove, client)
        # Side by side: each has its own engine connection, and each start waits for its DNS.
        with ThreadPoolExecutor(max(1, clients)) as pool:
            started = list(pool.map(LabClient.start, made))
        return Topology(network, server, started)

    def close(self) -> None:
        self._cleanup.close()

    def __enter__(self) -> Topologies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove(container: DockerContainer) -> None:
    # stop() is remove(force=True): SIGKILL and remove, whatever state the container is in.
    _quietly(container.stop)


def _quietly(action: Callable[[], object]) -> None:
    from docker.errors import DockerException

    with contextlib.suppress(DockerException, AssertionError, AttributeError):
        action()


def sweep(engine: docker.DockerClient, projects: Iterable[str] = ()) -> list[str]:
    """Force-remove this run's containers and networks (and those of its compose projects).

    Only objects labelled ``org.lab.test-run=<RUN_ID>``, or ``com.docker.compose.project=P`` for
    a project P this run brought up (all named labtest-<run>-…), are touched. Returns what went.
    """
    labels = [f"{RUN_LABEL}={RUN_ID}"]
    ours = [p for p in projects if p.startswith(PROJECT_PREFIX)]
    labels += [f"{label}={p}" for p in ours for label in (FAULT_LABEL, PROJECT_LABEL)]
    return remove_labelled(engine, labels)


def remove_project(engine: docker.DockerClient, project: str) -> list[str]:
    """Force-remove a compose project's containers and networks (one of this run's only)."""
    if not project.startswith(PROJECT_PREFIX):
        raise ValueError(f"{project!r} is not a project of this test run ({PROJECT_PREFIX}-…)")
    # A network fault's helper first: it shares a client's network namespace.
    return remove_labelled(engine, [f"{FAULT_LABEL}={project}", f"{PROJECT_LABEL}={project}"])


def remove_labelled(engine: docker.DockerClient, labels: Iterable[str]) -> list[str]:
    """Force-remove the containers, then the networks and volumes, carrying any of ``labels``
    (k=v)."""
    from docker.errors import APIError, NotFound

    labels = list(labels)
    removed: list[str] = []
    for label in labels:
        for container in engine.containers.list(
            all=True, filters={"label": label}, ignore_removed=True
        ):
            with contextlib.suppress(NotFound, APIError):
                container.remove(force=True, v=True)
                removed.append(f"container {container.name}")
    for label in labels:
        for network in engine.networks.list(filters={"label": label}):
            with contextlib.suppress(NotFound, APIError):
                network.remove()
                removed.append(f"network {network.name}")
    for label in labels:  # the data volume (the kv database), once no container holds it
        for volume in engine.volumes.list(filters={"label": label}):
            with contextlib.suppress(NotFound, APIError):
                volume.remove(force=True)
                removed.append(f"volume {volume.name}")
    return removed


@contextlib.contextmanager
def bench_backend(engine: docker.DockerClient, project: str, clients: int) -> Iterator[Any]:
    """A :class:`~lab.orchestration.bench.DockerBackend` on ``project`` (a lab of ``clients``
    clients, published on a free loopback port, not the user's 12345); at the end the backend
    closes and the whole project goes, its data volume included."""
    import pytest
    from labcli import free_loopback_port

    from lab.orchestration import compose
    from lab.orchestration.bench import DockerBackend
    from lab.orchestration.engine import LabError

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAB_HOST_PORT", str(free_loopback_port()))
        backend = DockerBackend(project=project, clients=clients)
        try:
            yield backend
        finally:
            backend.close()
            with contextlib.suppress(LabError):
                compose.run(
                    ["down", "--remove-orphans", "--volumes", "--timeout", "0"], project=project
                )
            remove_project(engine, project)
