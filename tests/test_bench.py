"""`lab bench --local`: a design or a peer under load, and what it cost the server — structure
and correctness of the result, never its speed."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import ALL_DESIGNS, POOL_DESIGNS, wait_until
from typer.testing import CliRunner

from lab.cli.app import app
from lab.measure.bench import CpuTrace, LocalBackend, ServerSpec, bench, connections_at_most
from lab.measure.config import make_config
from lab.measure.probe import Conntrack, local_conntrack
from lab.sockets.designs import DESIGNS

runner = CliRunner()
TINY = {"concurrency": 4, "duration": 0.5, "warmup": 0.2, "processes": 1}


def tiny_config(**overrides: object) -> object:
    return make_config("127.0.0.1", port=1, **{**TINY, **overrides})  # type: ignore[arg-type]


def assert_complete(result: dict[str, object], design: str) -> None:
    load, server = result["load"], result["server"]
    assert isinstance(load, dict) and isinstance(server, dict)
    assert result["design"] == design and result["backend"] == "local"
    assert load["requests"] > 0 and load["errors_total"] == 0
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        assert load["latency_us"][key] > 0, key
    assert load["histogram"]  # encoded, so runs can be merged later
    assert server["cpu_s"] > 0 and server["cpu_s_per_1000"] > 0
    # A request is one echoed message: the CPU of the measured window over the messages the
    # loaders verified in that window, for designs and peers alike.
    assert server["requests"] == load["requests"]
    assert server["cpu_s_per_1000"] == pytest.approx(server["cpu_s"] / load["requests"] * 1000)
    assert server["window_s"] == pytest.approx(load["duration_s"])
    assert server["memory_peak_bytes"] > 0


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_local_bench_reports_load_and_server_cost_for_every_design(design: str) -> None:
    spec = ServerSpec(design, ("--workers", "2") if design in POOL_DESIGNS else ())
    result = bench(LocalBackend(), spec, tiny_config()).to_dict()  # type: ignore[arg-type]
    assert_complete(result, design)
    stats = result["server"]["stats"]
    # The server's own count agrees with the loader's: every connection it saw completed.
    assert stats["completed"] >= result["load"]["requests"]
    assert stats["failed"] == {}
    if design in POOL_DESIGNS:
        assert sum(stats["per_worker"].values()) == stats["completed"]


@pytest.mark.parametrize("peer", ["peer-threading", "peer-asyncio"])
def test_local_bench_measures_a_peer_beside_the_designs(peer: str) -> None:
    result = bench(LocalBackend(), ServerSpec(peer), tiny_config()).to_dict()  # type: ignore[arg-type]
    assert_complete(result, peer)
    assert result["server"]["stats"] == {}  # a peer keeps no statistics of ours


def test_bench_command_prints_json_with_every_field() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "--local",
            "--design",
            "fork",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--concurrency",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert_complete(json.loads(result.output), "fork")


def test_bench_command_unknown_design_is_one_line() -> None:
    result = runner.invoke(app, ["bench", "--local", "--design", "nope"])
    assert result.exit_code == 2
    assert "unknown design 'nope'" in result.output and "Traceback" not in result.output


# --- CPU per request is CPU per message ----


def test_cpu_trace_reads_any_window_between_its_readings() -> None:
    trace = CpuTrace(lambda: 0.0)
    trace.samples = [(100.0, 1.0), (101.0, 2.0), (103.0, 6.0)]
    assert trace.at(100.5) == pytest.approx(1.5)
    assert trace.between(100.5, 102.0) == pytest.approx(4.0 - 1.5)
    assert trace.between(90.0, 200.0) == pytest.approx(5.0)  # clamped to the trace's ends
    assert (trace.first, trace.last) == (100.0, 103.0)


def test_cpu_trace_brackets_its_block_and_skips_failed_readings() -> None:
    readings: list[float | Exception] = [1.0, 2.0, OSError("the server is gone")]

    def read() -> float:
        value = readings.pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    with CpuTrace(read, interval=3600) as trace:  # no reading in between: on entry, on exit
        pass
    assert [v for _, v in trace.samples] == [1.0, 2.0]
    trace.tick()  # a failed reading is left out
    assert len(trace.samples) == 2


def persistent_bench(per_connection: int, **overrides: object) -> dict[str, object]:
    config = tiny_config(workload="persistent", per_connection=per_connection, **overrides)
    spec = ServerSpec("multi-accept", ("--workers", "2"))
    return bench(LocalBackend(), spec, config).to_dict()  # type: ignore[arg-type]


def test_cpu_per_message_does_not_depend_on_messages_per_connection() -> None:
    """100 or 1,000 messages per connection: the CPU of one message barely changes. A
    connection's setup (~100 µs) spread over 100 messages of ~8 µs adds about an eighth, and a
    shared machine adds as much again to one run of a pair, so ratios up to ~1.3 are honest.
    Divided by connections instead, the two would differ tenfold: the bound of 2 sits far from
    both. The two runs of a pair go side by side, so a busy machine slows both alike; the median
    of three pairs' ratios is judged."""
    ratios = []
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            few, many = pool.map(
                lambda k: persistent_bench(k, concurrency=2, duration=1.5, warmup=0.3)["server"],
                (100, 1000),
            )
        assert isinstance(few, dict) and isinstance(many, dict)
        ratios.append(few["cpu_s_per_1000"] / many["cpu_s_per_1000"])
        # per connection: the same CPU, per 100 or 1,000 messages
        for cost, k in ((few, 100), (many, 1000)):
            assert cost["cpu_s_per_1000_connections"] == pytest.approx(cost["cpu_s_per_1000"] * k)
    assert 1 / 2 <= statistics.median(ratios) <= 2, ratios


def test_cpu_per_message_is_divided_by_the_servers_own_count_of_messages() -> None:
    """No warm-up and a fixed number of requests: every message of the run is in the measured
    window, so the count the CPU is divided by must be what the server itself echoed — its
    bytes_in over the message size — and not its count of connections."""
    size, requests, k = 49, 20_000, 100
    result = persistent_bench(k, warmup=0.0, requests=requests, duration=30.0, size=size)
    load, cost = result["load"], result["server"]
    assert isinstance(load, dict) and isinstance(cost, dict)
    assert load["errors_total"] == 0 and load["unfinished"] == 0
    stats = cost["stats"]
    echoed, remainder = divmod(stats["bytes_in"], size)
    assert remainder == 0 and stats["bytes_out"] == stats["bytes_in"]
    assert echoed == requests == load["requests"] == cost["requests"]
    # The server's connections: the loaders' and the one that checked the target first —
    # far fewer than messages, so a figure per connection would be K times this one.
    assert stats["completed"] == load["connections"] + 1 <= echoed / k + 5
    assert cost["cpu_s_per_1000"] == pytest.approx(cost["cpu_s"] / echoed * 1000)
    # The whole run's CPU over the server's count gives the same figure (within the CPU
    # clock's ticks and the connections' setup and teardown outside the window).
    whole = cost["run_cpu_s"] / echoed * 1000
    assert 1 / 1.5 <= cost["cpu_s_per_1000"] / whole <= 1.5, (cost["cpu_s_per_1000"], whole)


# --- listen-queue overflows ------------------------------------------------------------------


def netstat_listen_overflows() -> int:
    """TcpExt ListenOverflows, parsed here (not with the lab's probe) from /proc/net/netstat."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    headers = [line.split() for line in lines if line.startswith("TcpExt:")]
    header, values = headers[0], headers[1]
    return int(values[header.index("ListenOverflows")])


def test_iterative_server_beyond_its_backlog_overflows_the_listen_queue() -> None:
    """The iterative server with a backlog of 1 and 32 connections at once: the kernel's listen
    queue overflows, and the bench's count is no more than the kernel's own over a window that
    encloses the bench's (other processes on the machine may add to the kernel's counter)."""
    assert DESIGNS["iterative"].default_backlog > 1  # so --backlog 1 is a real change
    before = netstat_listen_overflows()
    result = bench(
        LocalBackend(),
        ServerSpec("iterative", ("--backlog", "1")),
        tiny_config(concurrency=32, duration=1.0, warmup=0.2),  # type: ignore[arg-type]
    ).to_dict()
    kernel = netstat_listen_overflows() - before
    overflows = result["server"]["listen_overflows"]
    assert 0 < overflows <= kernel, (overflows, kernel)
    assert result["load"]["requests"] > 0  # it served, one at a time


# --- a sweep's backend keeps several servers -------------------------------------------------


def test_servers_kept_together_are_each_measured_alone() -> None:
    """Two servers up at once on one backend, each on its own port and in its own process tree:
    a run is measured on its own server only — its statistics and CPU — while the other idles,
    and asking for a server again reuses it (started once) unless it died."""
    from lab.measure import probe

    backend = LocalBackend(keep=True)
    pool, forking = ServerSpec("multi-accept", ("--workers", "2")), ServerSpec("fork")
    try:
        first = bench(backend, pool, tiny_config()).to_dict()  # type: ignore[arg-type]
        pool_port, pool_pid = backend.port, backend.pid
        backend.start(forking)
        fork_port, fork_pid = backend.port, backend.pid
        assert fork_port != pool_port and fork_pid != pool_pid
        assert not set(probe.process_tree(pool_pid)) & set(probe.process_tree(fork_pid))

        # The pool idles while fork is measured: its statistics and CPU do not move with it.
        backend.start(pool)
        pool_before, pool_cpu = backend.stats(), backend.cpu_seconds()
        second = bench(backend, forking, tiny_config()).to_dict()  # type: ignore[arg-type]
        assert (backend.port, backend.pid) == (fork_port, fork_pid)
        assert backend.start(pool) == ("127.0.0.1", pool_port) and backend.pid == pool_pid
        pool_after, pool_idle_cpu = backend.stats(), backend.cpu_seconds() - pool_cpu
        assert pool_before and pool_after
        assert pool_after["completed"] == pool_before["completed"]  # fork's load was fork's
        assert pool_idle_cpu < second["server"]["run_cpu_s"]  # an idle tree, not fork's
        for result, design in ((first, "multi-accept"), (second, "fork")):
            assert_complete(result, design)
            stats = result["server"]["stats"]
            assert stats["design"] == design and stats["completed"] >= result["load"]["requests"]
        assert backend.started == [pool, forking]  # each started once

        # A server that died is started again when next asked for.
        backend.start(forking)
        os.killpg(fork_pid, signal.SIGKILL)
        assert wait_until(lambda: not backend.servers[forking].alive())
        backend.start(forking)
        again = backend.pid
        assert again != fork_pid and backend.started == [pool, forking, forking]
        assert backend.stats() is not None
    finally:
        backend.close()
    assert not backend.servers  # close() stopped both, and reaped them
    assert not any(Path(f"/proc/{pid}").exists() for pid in (pool_pid, again))


def test_a_local_server_listens_below_the_ephemeral_range() -> None:
    """A server's port is never one the loaders' connections take as their source port (so
    no TIME_WAIT entry of theirs can hold its four numbers: lab.measure.ports)."""
    from lab.measure.ports import ephemeral_low, quiet_port

    backend = LocalBackend()
    _host, port = backend.start(ServerSpec("iterative"))
    try:
        assert 1024 <= port < ephemeral_low()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
    finally:
        backend.stop()
    ports = {quiet_port() for _ in range(20)}
    assert all(1024 <= p < ephemeral_low() for p in ports) and len(ports) > 1  # spread, not one


class _Tables(LocalBackend):
    """A local backend whose connection-tracking readings are scripted: one per call, the last
    repeated."""

    def __init__(self, *readings: Conntrack) -> None:
        super().__init__()
        self.readings = list(readings)
        self.reads = 0

    def conntrack(self) -> list[Conntrack]:
        self.reads += 1
        return [self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]]


def test_a_bench_waits_for_room_in_a_full_conntrack_table_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A table with less room than a run needs drops the run's SYNs: wait until it has room."""
    full, roomy = Conntrack(250_000, 262_144, 7), Conntrack(10_000, 262_144, 7)
    backend = _Tables(full, full, roomy)
    result = bench(backend, ServerSpec("multi-accept"), tiny_config()).to_dict()  # type: ignore[arg-type]
    assert backend.reads == 4  # full, full, roomy — and once more after the run
    assert result["server"]["conntrack_drops"] == 0
    assert result["load"]["requests"] > 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "connection-tracking" in x]
    assert "250,000 of 262,144 entries" in line and "nf_conntrack_max" in line


def test_a_bench_records_the_packets_a_full_conntrack_table_dropped_during_it() -> None:
    before, after = Conntrack(1_000, 262_144, 5), Conntrack(2_000, 262_144, 12)
    backend = _Tables(before, after)
    result = bench(backend, ServerSpec("multi-accept"), tiny_config()).to_dict()  # type: ignore[arg-type]
    assert result["server"]["conntrack_drops"] == 12 - 5


def test_a_local_bench_reads_this_namespaces_conntrack_table() -> None:
    """On loopback the loaders and the server share one namespace: its table, or none."""
    tables, table = LocalBackend().conntrack(), local_conntrack()
    assert [t.limit for t in tables] == ([table.limit] if table is not None else [])


def test_a_run_that_fits_in_what_is_left_of_the_table_does_not_wait(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tiny run needs a few thousand entries: a table three-quarters full has room for it."""
    backend = _Tables(Conntrack(199_108, 262_144, 0))
    bench(backend, ServerSpec("multi-accept"), tiny_config())  # type: ignore[arg-type]
    assert backend.reads == 2  # once before the run, once after: no waiting
    assert "connection-tracking" not in capsys.readouterr().err


def test_a_run_of_a_fixed_number_of_requests_needs_room_for_those_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """3,000 requests, 50 a connection, no warm-up: 60 connections and one per slot — not what
    its 30 s --duration limit could open (a bench in CI once waited 74 s for room it did not
    need, in a table the tests before it had filled)."""
    config = tiny_config(
        workload="persistent", per_connection=50, requests=3000, duration=30.0, warmup=0.0
    )
    assert connections_at_most(config) == 3000 // 50 + config.concurrency * config.processes  # type: ignore[arg-type]
    backend = _Tables(Conntrack(262_000, 262_144, 0))  # 144 entries left
    bench(backend, ServerSpec("multi-accept"), config)  # type: ignore[arg-type]
    assert backend.reads == 2  # before and after: no waiting
    assert "connection-tracking" not in capsys.readouterr().err


@pytest.mark.parametrize("workload", ["connect-per-request", "persistent"])
def test_the_connections_a_run_may_open_bound_what_the_server_accepted(workload: str) -> None:
    """The bound the bench waits for is checked against the server's own count of accepts."""
    extra = {"per_connection": 100} if workload == "persistent" else {}
    config = tiny_config(workload=workload, **extra)
    result = bench(LocalBackend(), ServerSpec("multi-accept"), config).to_dict()  # type: ignore[arg-type]
    accepted = result["server"]["stats"]["accepted"]
    assert 0 < accepted <= connections_at_most(config)  # type: ignore[arg-type]
    if workload == "persistent":  # a hundred messages a connection: far fewer connections
        assert (
            connections_at_most(config)
            < connections_at_most(  # type: ignore[arg-type]
                tiny_config(workload="connect-per-request")  # type: ignore[arg-type]
            )
            / 4
        )
