"""The containerised backend of ``lab bench``: the server in the lab's server container, the
load from every client container at once (one shared start time), the server's cost read from
its container's cgroup and network namespace."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

from lab.measure import probe
from lab.measure.bench import BenchError, ServerSpec
from lab.measure.config import LoadConfig
from lab.measure.result import LoadResult, merge
from lab.orchestration import stack
from lab.orchestration.engine import PROJECT, LabError, client

if TYPE_CHECKING:
    from docker.models.containers import Container

SERVER_HOST = "bakawali"
SERVER_PORT = 12345
START_LEAD = 3.0  # seconds between sending the loaders off and their shared start time


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


def load_argv(config: LoadConfig, start_at: float, share: int, parts: int) -> list[str]:
    """The `lab load` command one client container runs: its share of the concurrency (and of
    the rate and request count), the common start time, JSON out."""
    concurrency = config.concurrency // parts + (1 if share < config.concurrency % parts else 0)
    concurrency = max(1, concurrency)
    argv = [
        "lab",
        "load",
        config.host,
        "--json",
        "--port",
        str(config.port),
        "--workload",
        config.workload,
        "--size",
        str(config.size),
        "--concurrency",
        str(concurrency),
        "--processes",
        str(min(config.processes, concurrency)),
        "--duration",
        str(config.duration),
        "--warmup",
        str(config.warmup),
        "--start-at",
        f"{start_at:.3f}",
        "--starve-after",
        str(config.starve_after),
        "--timeout",
        str(config.timeout),
    ]
    if config.persistent:
        argv += ["--per-connection", str(config.per_connection)]
    if config.rate is not None:
        argv += ["--rate", str(config.rate / parts)]
    if config.requests is not None:
        argv += ["--requests", str(max(1, config.requests // parts))]
    return argv


class DockerBackend:
    name = "docker"

    def __init__(self, project: str = PROJECT, clients: int = 3) -> None:
        self.project = project
        self.clients = clients
        self.engine = client()

    # -- the server ---------------------------------------------------------------------------
    def start(self, server: ServerSpec) -> tuple[str, int]:
        if server.peer:
            raise BenchError(
                f"peers run with --local for now: `lab bench --local --design {server.design}`"
            )
        env = {"LAB_TRACE": "0", **options_env(server.options)}  # tracing would be measured
        running = [c for c in stack.containers(self.engine, self.project) if c.status == "running"]
        if running:
            stack.switch(server.design, self.project, extra_env=env)
        else:
            stack.up(server.design, self.clients, project=self.project, extra_env=env)
        return SERVER_HOST, SERVER_PORT

    def _server(self) -> Container:
        return stack.server_container(self.engine, self.project)

    def _read(self, path: str) -> str | None:
        result = self._server().exec_run(["cat", path], demux=False)
        output = result.output
        if result.exit_code != 0 or not isinstance(output, bytes):
            return None
        return output.decode()

    def stats(self) -> dict[str, Any] | None:
        return stack.server_stats(self.engine, self.project)

    def cpu_seconds(self) -> float:
        return probe.read_cgroup(self._read).cpu_seconds

    def memory_bytes(self) -> int:
        return probe.read_cgroup(self._read).memory_bytes

    def listen_overflows(self) -> int:
        return probe.listen_overflows(self._read("/proc/net/netstat") or "")

    def stop(self) -> None:
        """The lab stays up for the next run (`lab down` removes it)."""

    # -- the loaders ----------------------------------------------------------------------------
    def load(self, config: LoadConfig) -> LoadResult:
        loaders = [
            c
            for c in stack.containers(self.engine, self.project)
            if c.labels.get("com.docker.compose.service") == "client" and c.status == "running"
        ]
        if not loaders:
            raise LabError("no running client containers: `lab up` starts them")
        start_at = time.time() + START_LEAD
        argvs = [load_argv(config, start_at, i, len(loaders)) for i in range(len(loaders))]
        with ThreadPoolExecutor(len(loaders)) as pool:
            outputs = list(pool.map(self._run_loader, loaders, argvs))
        return merge(LoadResult.from_dict(output) for output in outputs)

    @staticmethod
    def _run_loader(container: Container, argv: list[str]) -> dict[str, Any]:
        result = container.exec_run(argv, demux=True)
        # demux=True gives (stdout, stderr), each bytes or None; the stubs do not know that.
        streams = cast(tuple[bytes | None, bytes | None], result.output)
        out, err = streams[0] or b"", streams[1] or b""
        if result.exit_code != 0:
            last = (err or out).decode("utf-8", "replace").strip().splitlines()
            raise LabError(
                f"the loader in {container.name} failed: {last[-1] if last else result.exit_code}"
            )
        data: dict[str, Any] = json.loads(out)
        return data
