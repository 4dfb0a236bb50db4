"""One benchmark: a server (a design or a peer), load against it, and what the server paid.

:func:`bench` runs the same sequence on any :class:`Backend` — local processes on loopback
(:class:`LocalBackend`, here) or the containerised lab (in ``lab.orchestration``):

1. start the server and wait for its ready line;
2. sample its CPU from now on (every :data:`CPU_SAMPLE` seconds, timestamped), and measure
   its CPU while idle for :data:`IDLE_WINDOW` seconds — in a container the health probes and
   the readings themselves cost a little CPU; that rate is subtracted from the run's;
3. read its statistics (SIGUSR1) and the listen-queue overflow counter;
4. run the load, sampling the server's memory meanwhile;
5. read them again (once the server has seen every connection end): the differences are the
   run's — per-worker connection counts, bytes, overflows.

**What a request costs.** A request is one echoed message, for designs and peers alike and in
both workloads (a persistent connection carries ``per_connection`` of them). The CPU divided is
the server's CPU over the loaders' *measured window* (``measure_start`` → ``measure_end``, the
warm-up and the drain left out), interpolated from the samples; the count it is divided by is
the loaders' verified messages of that same window (``LoadResult.requests``). So ``cpu_s_per_1000``
is CPU seconds per 1,000 messages — numerically CPU milliseconds per message — and
``cpu_s_per_1000_connections`` the same per 1,000 connections of ``per_connection`` messages
(equal to it for connect-per-request). The CPU of the whole load run, warm-up and drain
included, is kept beside it as ``run_cpu_s`` (not divided by anything).

**The kv workload** (``--workload kv``) runs the design with ``--service kv`` on a database the
backend provides (:meth:`LocalBackend.kv_database`; a ``--db`` among the options is kept); a
request is one command. After the run the counters its INCRs touched are read through the
server and from the file and judged (:mod:`lab.measure.kvcheck`): ``kv_check`` in the result.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from lab.measure import kvcheck, probe
from lab.measure.config import KV, LoadConfig
from lab.measure.faultbench import FaultError, FaultRun, FaultSpec, FaultTimer, analyse, check_at
from lab.measure.load import START_DELAY, LoaderPool, run_load
from lab.measure.peers import PEERS
from lab.measure.ports import quiet_port
from lab.measure.result import LoadResult

if TYPE_CHECKING:
    from lab.measure.usercmd import LocalCommand

# Seconds of idle CPU measured once per server start, before its first run. In a container the
# idle rate holds the health probes (one every 2 s) and the observing: a second at least. A
# local server has neither, so a backend may declare a shorter ``idle_window``.
IDLE_WINDOW = 1.0
CPU_SAMPLE = 0.05  # seconds between readings of the server's CPU during the run
# Before a run, every connection-tracking table on its path (see probe.Conntrack) must have room
# for the connections the run may open — each entry is held 120 s after its connection closes —
# or the bench waits, up to CONNTRACK_WAIT, for old entries to expire. What a run may open is
# bounded by its length times the ceilings below (above what any server here reaches on two
# cores: the C peers open and close about 25,000 connections a second and echo about 150,000
# messages), and the room asked for never exceeds CONNTRACK_ROOM of the table (a longer run
# than that fits is flagged by its drops).
CONNECTION_RATE_CEILING = 40_000.0
MESSAGE_RATE_CEILING = 400_000.0
CONNTRACK_ROOM = 0.5
CONNTRACK_WAIT = 130.0
READY_TIMEOUT = 20.0
STATS_TIMEOUT = 10.0
SETTLE_TIMEOUT = 2.0  # how long after the load the server may take to see every connection end
_READY = re.compile(r"ready design=(\S+) address=(\S+) port=(\d+) pid=(\d+)")


class BenchError(Exception):
    """A benchmark could not run: one line naming the fix."""


@dataclass(frozen=True)
class ServerSpec:
    """What to run: a design (with its options), a peer (``peer-threading`` …), or a user's
    server: ``command`` set, ``design`` its name (see :mod:`lab.measure.usercmd`)."""

    design: str
    options: tuple[str, ...] = ()  # e.g. ("--workers", "2"), as for `lab serve`
    command: str = ""  # a user's server: its command line, with {port} (and {host})
    mounts: tuple[str, ...] = ()  # a user's server in a container: host paths it sees, read-only

    @property
    def peer(self) -> str | None:
        name = self.design.removeprefix("peer-")
        if self.command or not self.design.startswith("peer-"):
            return None
        return name if name in PEERS else None


@dataclass
class ServerCost:
    """What the server paid for one run (see the module docstring for the CPU window)."""

    cpu_s: float = 0.0  # server CPU over the measured window, idle rate subtracted
    idle_cpu_rate: float = 0.0  # CPU seconds per second while idle (health probes …)
    window_s: float = 0.0  # the measured window's length
    requests: int = 0  # echoed messages measured in that window: what cpu_s is divided by
    cpu_s_per_1000: float | None = None  # CPU seconds per 1,000 messages (= ms per message)
    #: …per 1,000 connections of ``per_connection`` messages (connect-per-request: the same).
    cpu_s_per_1000_connections: float | None = None
    run_cpu_s: float = 0.0  # server CPU over the whole load run (warm-up, drain), idle subtracted
    memory_peak_bytes: int = 0
    memory_mean_bytes: float = 0.0
    listen_overflows: int = 0
    #: Packets the kernel dropped during the run because a connection-tracking table on the
    #: path was full (see probe.Conntrack): a run with any measured the firewall, not the server.
    conntrack_drops: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # the server's statistics delta


@dataclass
class BenchResult:
    backend: str
    server: ServerSpec
    load: dict[str, Any]  # LoadResult.to_dict()
    cost: ServerCost
    kv_check: kvcheck.KvCheck | None = None  # the kv workload's no-lost-update verdict
    fault: FaultRun | None = None  # --fault: what it did to the run

    def to_dict(self) -> dict[str, Any]:
        data = {
            "backend": self.backend,
            "design": self.server.design,
            "server_options": list(self.server.options),
            **server_command(self.server),
            "load": self.load,
            "server": asdict(self.cost),
        }
        if self.kv_check is not None:
            data["kv_check"] = self.kv_check.to_dict()
        if self.fault is not None:
            data["fault"] = self.fault.to_dict()
        return data


def server_command(server: ServerSpec) -> dict[str, Any]:
    """What a result records of a user's server: its command (and mounts); {} otherwise."""
    if not server.command:
        return {}
    recorded: dict[str, Any] = {"server_command": server.command}
    if server.mounts:
        recorded["server_mounts"] = list(server.mounts)
    return recorded


class Backend(Protocol):
    """Where a bench runs. Optional, read with ``getattr``: ``holds_many_servers`` (True:
    several servers can be up at once, each measured apart, so a sweep interleaves its
    repeats; absent: one server at a time), ``generation`` and ``idle_measured`` (see
    :func:`bench`), ``close()`` (after a sweep)."""

    name: str

    def start(self, server: ServerSpec) -> tuple[str, int]:
        """Start the server; returns the (host, port) loaders use."""

    def stats(self) -> dict[str, Any] | None:
        """The server's statistics now (None: it keeps none, e.g. a peer)."""

    def cpu_seconds(self) -> float: ...

    def memory_bytes(self) -> int: ...

    def listen_overflows(self) -> int: ...

    def conntrack(self) -> list[probe.Conntrack]:
        """The connection-tracking tables on the path between loaders and server (one per
        network namespace that tracks; none where nothing does)."""

    def load(self, config: LoadConfig) -> LoadResult: ...

    def stop(self) -> None:
        """After one run (a backend may keep the server for the next; see ``close``)."""


def bench(
    backend: Backend,
    server: ServerSpec,
    config: LoadConfig,
    fault: FaultSpec | None = None,
    fault_at: float = 0.0,
) -> BenchResult:
    """Run ``config`` against ``server`` on ``backend``; the server is stopped at the end.

    With ``fault``, the backend (then an :class:`~lab.measure.faultbench.Injector`) injects
    it ``fault_at`` seconds into the measured window, the loaders record their series, and
    the result says what the fault did (:func:`lab.measure.faultbench.analyse`)."""
    server = serving(server, config, backend)
    if fault is not None:
        if not hasattr(backend, "inject"):
            raise BenchError(f"the {backend.name} backend cannot inject faults")
        try:
            check_at(fault_at, config.duration)
        except FaultError as exc:
            raise BenchError(str(exc)) from None
        config = replace(config, series=True)
    host, port = backend.start(server)
    timer: FaultTimer | None = None
    try:
        config = _retarget(config, host, port)
        tables = _room_for_a_run(backend, connections_at_most(config))
        with CpuTrace(backend.cpu_seconds) as cpu:
            # The idle rate is measured under the same observation as the run (both samplers
            # running), so what observing costs the server is subtracted with it — once per
            # server start: a sweep's later runs on the same server reuse it (a backend that
            # keeps several servers keeps one for each, under that server's start number).
            generation = getattr(backend, "generation", None)
            cached = getattr(backend, "idle_measured", None)
            if generation is not None and cached is not None and cached[0] == generation:
                idle_rate = float(cached[1])
            else:
                with probe.Sampler(backend.memory_bytes):
                    idle_start = time.time()
                    time.sleep(getattr(backend, "idle_window", IDLE_WINDOW))
                    idle_end = time.time()
                idle_rate = cpu.between(idle_start, idle_end) / max(idle_end - idle_start, 1e-9)
                if generation is not None:
                    backend.idle_measured = (generation, idle_rate)  # type: ignore[attr-defined]
            before = backend.stats()
            overflows = backend.listen_overflows()
            with probe.Sampler(backend.memory_bytes) as memory:
                load_start = time.time()
                if fault is not None:
                    timer = FaultTimer(backend, fault, fault_at, config.warmup)  # type: ignore[arg-type]
                    result = backend.load(config, at_start=timer.arm)  # type: ignore[call-arg]
                    timer.finish()
                else:
                    result = backend.load(config)
                load_end = time.time()
        after = _settled_stats(backend)
        window = max(0.0, result.measure_end - result.measure_start)
        window_cpu = cpu.between(result.measure_start, result.measure_end) - idle_rate * window
        run_cpu = cpu.between(load_start, load_end) - idle_rate * (load_end - load_start)
        cost = ServerCost(
            cpu_s=max(0.0, window_cpu),
            idle_cpu_rate=idle_rate,
            window_s=window,
            requests=result.requests,
            run_cpu_s=max(0.0, run_cpu),
            memory_peak_bytes=memory.peak,
            memory_mean_bytes=memory.mean,
            listen_overflows=backend.listen_overflows() - overflows,
            conntrack_drops=_dropped(tables, backend.conntrack()),
            stats=probe.stats_delta(before, after) if before and after else {},
        )
        if result.requests:
            cost.cpu_s_per_1000 = cost.cpu_s / result.requests * 1000
            cost.cpu_s_per_1000_connections = cost.cpu_s_per_1000 * config.per_connection
        verdict = None
        if result.kv_incr is not None:
            verdict = kvcheck.check(result.kv_incr, _kv_readings(backend, server, config, result))
        load = result.to_dict()
        run = None
        if fault is not None and timer is not None:
            run = analyse(
                load, fault, timer.injected_at, timer.undone_at, timer.said, timer.error,
                in_flight=config.concurrency,
            )  # fmt: skip
        return BenchResult(backend.name, server, load, cost, verdict, run)
    finally:
        if timer is not None:
            timer.finish()  # (again: idempotent) a load that failed leaves no fault behind
        backend.stop()


def connections_at_most(config: LoadConfig) -> int:
    """The most connections ``config`` can open: its length at the rate ceilings (or at its
    open-loop rate) — for a run of ``requests`` messages, the warm-up's and those — plus one per
    connection slot (each loader's last connections)."""
    seconds = config.warmup + config.duration
    rate = config.rate or MESSAGE_RATE_CEILING
    messages = seconds * rate
    if config.requests is not None:  # bounded by its count, not by its --duration limit
        messages = min(messages, config.warmup * rate + config.requests)
    connections = min(seconds * CONNECTION_RATE_CEILING, messages / config.per_connection)
    return int(connections) + config.concurrency * config.processes


def serving(server: ServerSpec, config: LoadConfig, backend: Backend) -> ServerSpec:
    """The server as the workload needs it: the kv workload a design serving ``--service kv``
    (on the backend's database unless the options name one), echo a design that echoes. A
    user's server is taken as it is; a peer only echoes."""
    if server.command:
        return server
    options = server.options
    service = options[options.index("--service") + 1] if "--service" in options[:-1] else "echo"
    if config.workload != KV:
        if service != "echo":
            raise BenchError(
                f"the {config.workload} workload sends echoes, and --service {service} does not "
                "echo: use --workload kv, or drop --service"
            )
        return server
    if server.peer:
        raise BenchError(
            f"{server.design} only echoes: the kv workload needs one of the lab's designs"
        )
    if "--service" not in options:
        options = (*options, "--service", "kv")
    elif service != "kv":
        raise BenchError(f"--service {service} does not speak kv: drop it for --workload kv")
    if "--db" not in options:
        database = getattr(backend, "kv_database", None)
        if database is not None:
            options = (*options, "--db", database())
    return replace(server, options=tuple(options))


def database_of(server: ServerSpec) -> str | None:
    """The ``--db`` path among a design's options, if any."""
    options = server.options
    return options[options.index("--db") + 1] if "--db" in options[:-1] else None


def _kv_readings(
    backend: Backend, server: ServerSpec, config: LoadConfig, result: LoadResult
) -> list[kvcheck.Reading]:
    """The run's counters read through the server and from the database file (by the backend,
    which knows how to reach both; a user's server is read through itself only)."""
    assert result.kv_incr is not None
    # The counters of the run that was measured: a backend that ran the load again (a late
    # start) gave that run a tag of its own.
    tag = str(result.kv_incr["tag"])
    indices = sorted(int(i) for i in result.kv_incr["counters"])
    read = getattr(backend, "kv_readings", None)
    if read is not None:
        readings: list[kvcheck.Reading] = read(server, tag, indices)
        return readings
    return [kvcheck.read_through_server(config.host, config.port, tag, indices)]


def _room_for_a_run(backend: Backend, needed: int) -> list[probe.Conntrack]:
    """The path's connection-tracking tables once each has room for ``needed`` entries (or
    :data:`CONNTRACK_ROOM` of it, if less), after waiting up to :data:`CONNTRACK_WAIT` for old
    entries to expire; a run that starts without room shows its drops in ``conntrack_drops``."""
    deadline = time.monotonic() + CONNTRACK_WAIT
    said = False
    while True:
        tables = backend.conntrack()
        full = [t for t in tables if t.room < min(needed, t.limit * CONNTRACK_ROOM)]
        if not full or time.monotonic() > deadline:
            return tables
        if not said:
            said = True
            print(
                f"lab: waiting for room in the kernel's connection-tracking table "
                f"({full[0].entries:,} of {full[0].limit:,} entries; a closed connection's "
                "entry stays 120 s) — raise net.netfilter.nf_conntrack_max to wait less",
                file=sys.stderr,
            )
        time.sleep(1.0)


def _dropped(before: list[probe.Conntrack], after: list[probe.Conntrack]) -> int:
    """Packets dropped for a full table between two readings of the same tables."""
    if len(before) != len(after):
        return 0
    return sum(max(0, b.drops - a.drops) for a, b in zip(before, after, strict=True))


def _settled_stats(backend: Backend) -> dict[str, Any] | None:
    """The server's statistics once it has seen every connection end (a connection's bytes are
    counted when it ends, and the loaders' last closes may still be on their way), or as they
    are after :data:`SETTLE_TIMEOUT`. Read after the measured window: these reads cost nothing
    that is measured."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        stats = backend.stats()
        if not stats or not stats.get("in_flight") or time.monotonic() > deadline:
            return stats
        time.sleep(CPU_SAMPLE)


class CpuTrace(probe.Periodic):
    """The server's CPU read every ``interval`` seconds in a thread, each reading stamped with
    the UNIX time, so the CPU of any window of the run can be read afterwards (:meth:`between`,
    interpolated linearly between the readings around each end). One reading is taken on entry
    and one on exit, so the trace brackets everything done inside the ``with``."""

    bracket = True

    def __init__(self, read: Callable[[], float], interval: float = CPU_SAMPLE) -> None:
        self.read = read
        self.interval = interval
        self.samples: list[tuple[float, float]] = []

    def tick(self) -> None:
        began = time.time()
        try:
            value = self.read()
        except Exception:  # a reading that failed (the server just exited …) is left out
            return
        self.samples.append(((began + time.time()) / 2, value))

    @property
    def first(self) -> float:
        return self.samples[0][0] if self.samples else 0.0

    @property
    def last(self) -> float:
        return self.samples[-1][0] if self.samples else 0.0

    def at(self, when: float) -> float:
        """The CPU reading at UNIX time ``when`` (clamped to the trace's ends)."""
        samples = self.samples
        if not samples:
            return 0.0
        if when <= samples[0][0]:
            return samples[0][1]
        for (t0, v0), (t1, v1) in itertools.pairwise(samples):
            if when <= t1:
                return v0 + (v1 - v0) * (when - t0) / (t1 - t0) if t1 > t0 else v1
        return samples[-1][1]

    def between(self, start: float, end: float) -> float:
        """CPU seconds used from ``start`` to ``end`` (UNIX times)."""
        return max(0.0, self.at(end) - self.at(start))


def _retarget(config: LoadConfig, host: str, port: int) -> LoadConfig:
    from dataclasses import replace

    return replace(config, host=host, port=port)


class _LocalServer:
    """One server of a :class:`LocalBackend` as a local process (a design, a peer, or a user's
    server), and what is kept per server: its port, its output, its start number (bench()
    measures idle once per start) and that idle measurement."""

    def __init__(self, spec: ServerSpec, generation: int) -> None:
        self.spec = spec
        self.generation = generation
        self.idle_measured: tuple[int, float] | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.user: LocalCommand | None = None  # a user's server (then proc is None)
        self.port = 0
        self.lines: list[str] = []  # its output (stdout and stderr), line by line
        self._cond = threading.Condition()

    def start(self, pin: bool) -> None:
        """Start it on a free loopback port below the ephemeral range (lab.measure.ports) and
        wait until it is ready; one that fails to start is stopped again (:class:`BenchError`,
        or the user server's own error)."""
        server = self.spec
        if server.command:
            from lab.measure.usercmd import LocalCommand

            user = LocalCommand(server.command, pin=pin)
            self.port = user.start("127.0.0.1")  # stopped again if it fails to
            self.user = user
            return
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
        command += ["--host", "127.0.0.1", "--port", str(quiet_port())]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            # --pin: the server (and every process it starts) on core 0, the loaders on core 1
            preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pin else None,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        try:
            line = self.wait_for(_READY, READY_TIMEOUT, 0)
        except BaseException:
            self.stop()
            raise
        match = _READY.search(line)
        assert match is not None
        self.port = int(match.group(3))

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float, start: int) -> str:
        """The first line of its output from index ``start`` on that matches ``pattern``."""
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

    def alive(self) -> bool:
        if self.user is not None:
            return self.user.running()
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.user is not None:
            return self.user.pid
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any] | None:
        if self.user is not None:
            return None  # a user's server keeps no statistics of ours (and SIGUSR1 may kill it)
        start = len(self.lines)  # its earlier statistics lines are not this reading
        os.kill(self.pid, signal.SIGUSR1)
        line = self.wait_for(re.compile(r'^\{"event": "stats"'), STATS_TIMEOUT, start)
        data: dict[str, Any] = json.loads(line)
        return data if "completed" in data else None

    def stop(self) -> None:
        if self.user is not None:
            user, self.user = self.user, None
            user.stop()
            return
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # it exited a moment ago
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class LocalBackend:
    """Servers as local processes on loopback; CPU and memory from the measured server's own
    process tree in /proc.

    With ``keep`` (a sweep) every server, once started, runs on until :meth:`close`, each on
    its own ephemeral port: a sweep can interleave its designs' repeats and still start each
    server once (:attr:`holds_many_servers`). The readings — CPU, memory, statistics — are of
    the server the last :meth:`start` chose, and of it alone: the others idle meanwhile.
    Without ``keep`` every run stops its server."""

    name = "local"
    #: Several servers can be up at once, each measured on its own: a sweep interleaves.
    holds_many_servers = True
    #: No health probes here: the idle rate is the server's own timers and the observing.
    idle_window = 0.25

    def __init__(self, pin: bool = False, keep: bool = False) -> None:
        self.pin = pin and (os.cpu_count() or 1) >= 2
        # keep: a sweep — every server runs on between its runs, and the loader processes stay
        # up (close() ends both); otherwise every run stops the server.
        self.keep = keep
        self.pool = LoaderPool() if keep else None
        self.servers: dict[ServerSpec, _LocalServer] = {}  # those up, one per spec
        self.current: _LocalServer | None = None  # the one being measured
        self.started: list[ServerSpec] = []  # every server start, in order
        self._kv_dir: str | None = None  # kv_database()'s folder, once made

    # -- choosing the server ------------------------------------------------------------------
    def start(self, server: ServerSpec) -> tuple[str, int]:
        """The server of this spec, started the first time it is asked for (or again if it
        died), and from now on the one measured; returns its address."""
        self.current = None  # until this one answers, no reading may go to another
        found = self.servers.pop(server, None)
        if found is not None and found.alive():
            self.servers[server] = self.current = found
            return "127.0.0.1", found.port
        if found is not None:
            found.stop()  # it died: whatever of its session is left goes with it
        self.started.append(server)
        launched = _LocalServer(server, generation=len(self.started))
        launched.start(self.pin)  # one that fails to start is not kept
        self.servers[server] = self.current = launched
        return "127.0.0.1", launched.port

    def _server(self) -> _LocalServer:
        if self.current is None:
            raise BenchError("no server is running: start one first")
        return self.current

    @property
    def generation(self) -> int:
        """The measured server's start number: bench() measures idle once per server start."""
        return self._server().generation

    @property
    def idle_measured(self) -> tuple[int, float] | None:
        """The measured server's idle rate, as bench() measured it (its start number, rate)."""
        return self._server().idle_measured

    @idle_measured.setter
    def idle_measured(self, value: tuple[int, float]) -> None:
        self._server().idle_measured = value

    @property
    def port(self) -> int:
        return self._server().port

    @property
    def pid(self) -> int:
        return self._server().pid

    @property
    def lines(self) -> list[str]:
        """The measured server's output, line by line."""
        return self._server().lines

    # -- reading it ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any] | None:
        return self._server().stats()

    def cpu_seconds(self) -> float:
        return probe.tree_cpu_seconds(self.pid)

    def memory_bytes(self) -> int:
        return probe.tree_rss_bytes(self.pid)

    def listen_overflows(self) -> int:
        return probe.listen_overflows(probe.local_file("/proc/net/netstat") or "")

    def conntrack(self) -> list[probe.Conntrack]:
        table = probe.local_conntrack()  # loopback: loaders and server share this namespace
        return [table] if table is not None else []

    def kv_database(self) -> str:
        """The kv workload's database when the options name none: one file for this backend's
        life (a sweep's designs all serve the same keys, as in the containers), removed by
        :meth:`close` (or after the run, without ``keep``)."""
        if self._kv_dir is None:
            self._kv_dir = tempfile.mkdtemp(prefix="lab-kv-")
        return os.path.join(self._kv_dir, "kv.sqlite")

    def kv_readings(
        self, server: ServerSpec, tag: str, indices: list[int]
    ) -> list[kvcheck.Reading]:
        readings = [kvcheck.read_through_server("127.0.0.1", self.port, tag, indices)]
        path = database_of(server)
        if path is not None:
            readings.append(kvcheck.read_file(path, tag))
        return readings

    def load(
        self, config: LoadConfig, at_start: Callable[[float], None] | None = None
    ) -> LoadResult:
        if at_start is not None:  # a fault bench: the start time is ours, to tell the timer
            config = replace(config, start_at=time.time() + START_DELAY)
            at_start(config.start_at or 0.0)
        if not self.pin:
            return run_load(config, pool=self.pool)
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {1})  # the loader processes inherit it
        try:
            return run_load(config, pool=self.pool)
        finally:
            os.sched_setaffinity(0, mask)

    # -- faults (lab bench --fault) --------------------------------------------------------------
    def inject(self, fault: FaultSpec) -> str:
        """kill-worker: signal the server's newest child; pause: SIGSTOP its process group
        (the server was started in a session of its own). The network faults and a switch
        need the containers (checked before: faultbench.check_applies)."""
        server = self._server()
        if server.proc is None:
            raise BenchError("--fault runs on the lab's designs, not on your server")
        if fault.kind == "kill-worker":
            children = probe.children_of(server.pid)
            if not children:
                raise BenchError("no worker process at that moment (none had a connection)")
            signum = getattr(signal, f"SIG{fault.value or 'KILL'}")
            os.kill(children[-1], signum)
            return f"SIG{fault.value or 'KILL'} to worker {children[-1]}"
        if fault.kind == "pause":
            os.killpg(server.pid, signal.SIGSTOP)
            return f"SIGSTOP to the server's process group {server.pid}"
        raise BenchError(f"--fault {fault.kind} needs the containers: drop --local")

    def undo(self, fault: FaultSpec) -> None:
        if fault.kind == "pause" and self.current is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._server().pid, signal.SIGCONT)

    # -- stopping -----------------------------------------------------------------------------
    def stop(self) -> None:
        """After a run: its server stops, unless this backend keeps it for a sweep."""
        if not self.keep and self.current is not None:
            server, self.current = self.current, None
            self.servers.pop(server.spec, None)
            server.stop()
            self._remove_kv_database()

    def close(self) -> None:
        """After a sweep: every server and the kept loader processes end."""
        self.current = None
        servers, self.servers = list(self.servers.values()), {}
        for server in servers:
            server.stop()
        if self.pool is not None:
            self.pool.close()
        self._remove_kv_database()

    def _remove_kv_database(self) -> None:
        if self._kv_dir is not None:
            shutil.rmtree(self._kv_dir, ignore_errors=True)
            self._kv_dir = None
