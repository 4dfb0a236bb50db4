"""One benchmark: a server (a design or a peer), load against it, and what the server paid.

:func:`bench` runs the same sequence on any :class:`Backend` — local processes on loopback
(:class:`LocalBackend`, here) or the containerised lab (in ``lab.orchestration``):

1. start the server and wait for its ready line;
2. measure its CPU while idle for :data:`IDLE_WINDOW` seconds — in a container the health
   probes cost a little CPU; that rate is subtracted from the run's;
3. read its statistics (SIGUSR1), CPU and the listen-queue overflow counter;
4. run the load, sampling the server's memory meanwhile;
5. read them again: the differences are the run's — CPU seconds per 1,000 requests served,
   per-worker connection counts, overflows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from lab.measure import probe
from lab.measure.config import LoadConfig
from lab.measure.load import run_load
from lab.measure.peers import PEERS
from lab.measure.result import LoadResult

IDLE_WINDOW = 1.0  # seconds of idle CPU measured before the run
READY_TIMEOUT = 20.0
STATS_TIMEOUT = 10.0
_READY = re.compile(r"ready design=(\S+) address=(\S+) port=(\d+) pid=(\d+)")


class BenchError(Exception):
    """A benchmark could not run: one line naming the fix."""


@dataclass(frozen=True)
class ServerSpec:
    """What to run: a design (with its options) or a peer (``peer-threading`` …)."""

    design: str
    options: tuple[str, ...] = ()  # e.g. ("--workers", "2"), as for `lab serve`

    @property
    def peer(self) -> str | None:
        name = self.design.removeprefix("peer-")
        return name if self.design.startswith("peer-") and name in PEERS else None


@dataclass
class ServerCost:
    cpu_s: float = 0.0  # server CPU over the run, idle rate subtracted
    idle_cpu_rate: float = 0.0  # CPU seconds per second while idle (health probes …)
    cpu_s_per_1000: float | None = None  # per 1,000 connections/requests the server served
    memory_peak_bytes: int = 0
    memory_mean_bytes: float = 0.0
    listen_overflows: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # the server's statistics delta


@dataclass
class BenchResult:
    backend: str
    server: ServerSpec
    load: dict[str, Any]  # LoadResult.to_dict()
    cost: ServerCost

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "design": self.server.design,
            "server_options": list(self.server.options),
            "load": self.load,
            "server": asdict(self.cost),
        }


class Backend(Protocol):
    name: str

    def start(self, server: ServerSpec) -> tuple[str, int]:
        """Start the server; returns the (host, port) loaders use."""

    def stats(self) -> dict[str, Any] | None:
        """The server's statistics now (None: it keeps none, e.g. a peer)."""

    def cpu_seconds(self) -> float: ...

    def memory_bytes(self) -> int: ...

    def listen_overflows(self) -> int: ...

    def load(self, config: LoadConfig) -> LoadResult: ...

    def stop(self) -> None:
        """After one run (a backend may keep the server for the next; see ``close``)."""


def bench(backend: Backend, server: ServerSpec, config: LoadConfig) -> BenchResult:
    """Run ``config`` against ``server`` on ``backend``; the server is stopped at the end."""
    host, port = backend.start(server)
    try:
        config = _retarget(config, host, port)
        cpu_idle_start = backend.cpu_seconds()
        time.sleep(IDLE_WINDOW)
        idle_rate = max(0.0, (backend.cpu_seconds() - cpu_idle_start) / IDLE_WINDOW)
        before = backend.stats()
        overflows = backend.listen_overflows()
        cpu_start, started = backend.cpu_seconds(), time.monotonic()
        with probe.Sampler(backend.memory_bytes) as memory:
            result = backend.load(config)
        cpu = backend.cpu_seconds() - cpu_start - idle_rate * (time.monotonic() - started)
        after = backend.stats()
        cost = ServerCost(
            cpu_s=max(0.0, cpu),
            idle_cpu_rate=idle_rate,
            memory_peak_bytes=memory.peak,
            memory_mean_bytes=memory.mean,
            listen_overflows=backend.listen_overflows() - overflows,
            stats=probe.stats_delta(before, after) if before and after else {},
        )
        served = cost.stats.get("completed") or result.connections * config.per_connection
        cost.cpu_s_per_1000 = cost.cpu_s / served * 1000 if served else None
        return BenchResult(backend.name, server, result.to_dict(), cost)
    finally:
        backend.stop()


def _retarget(config: LoadConfig, host: str, port: int) -> LoadConfig:
    from dataclasses import replace

    return replace(config, host=host, port=port)


class LocalBackend:
    """The server as a local process on loopback; CPU and memory from its tree in /proc."""

    name = "local"

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def start(self, server: ServerSpec) -> tuple[str, int]:
        if server.peer:
            command = [sys.executable, "-m", "lab.measure.peers", server.peer, *server.options]
        else:
            command = [
                sys.executable,
                "-m",
                "lab.sockets",
                "--design",
                server.design,
                *server.options,
            ]
        command += ["--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            # --pin: the server (and every process it starts) on core 0, the loaders on core 1
            preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if self.pin else None,
        )
        start = len(self.lines)  # a backend serves a whole sweep: skip earlier servers' lines
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        line = self._wait_for(_READY, READY_TIMEOUT, start)
        match = _READY.search(line)
        assert match is not None
        return "127.0.0.1", int(match.group(3))

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_for(self, pattern: re.Pattern[str], timeout: float, start: int) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if pattern.search(line):
                        return line
                assert self.proc is not None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    last = self.lines[-1] if self.lines else "no output"
                    raise BenchError(f"the server did not answer in time: {last}")
                self._cond.wait(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any] | None:
        start = len(self.lines)
        os.kill(self.pid, signal.SIGUSR1)
        line = self._wait_for(re.compile(r'^\{"event": "stats"'), STATS_TIMEOUT, start)
        data: dict[str, Any] = json.loads(line)
        return data if "completed" in data else None

    def cpu_seconds(self) -> float:
        return probe.tree_cpu_seconds(self.pid)

    def memory_bytes(self) -> int:
        return probe.tree_rss_bytes(self.pid)

    def listen_overflows(self) -> int:
        return probe.listen_overflows(probe.local_file("/proc/net/netstat") or "")

    def load(self, config: LoadConfig) -> LoadResult:
        if not self.pin:
            return run_load(config)
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {1})  # the loader processes inherit it
        try:
            return run_load(config)
        finally:
            os.sched_setaffinity(0, mask)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
