"""``lab load`` and :mod:`lab.measure`: the load generator, on loopback only.

Every server is a real process started with the ``start_server`` fixture: the lab's designs,
and deliberately broken or slow peers from ``tests/loadpeers.py``. No assertion here times
anything: runs are bounded by ``--requests`` (or a short ``--duration``), and what is checked
is what the loader *recorded* — counts, kinds, and latencies against a server's known delay.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from harness import ALL_DESIGNS, RunningServer, ServerFactory
from typer.testing import CliRunner, Result

from lab.cli.load import load as load_command
from lab.measure import target as target_module
from lab.measure.config import make_config
from lab.measure.errors import TargetNotAllowed
from lab.measure.histogram import LatencyHistogram
from lab.measure.load import run_load
from lab.measure.result import ERROR_KINDS, LoadResult, merge
from lab.measure.summary import summary_lines
from lab.measure.target import is_allowed, parse_routes, resolve_target

PEERS = Path(__file__).with_name("loadpeers.py")
SIZE = 49

# A routing table like a lab client container's: its bridge subnet 172.25.0.0/16 reached
# directly (gateway 0), a default route via 172.25.0.1, and a down route. Hex is host order.
ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010019AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000019AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0
"""

RAW_KEYS = {
    "schema", "target", "config", "start_at", "measure_start", "measure_end", "end",
    "duration_s", "requests", "throughput_rps", "bytes_verified", "connections", "unfinished",
    "unsent", "latency_us", "histogram", "errors", "errors_total", "starved", "loader",
    "loader_bound", "parts",
}  # fmt: skip
LATENCY_KEYS = {"count", "min", "mean", "p50", "p90", "p99", "p99.9", "max"}
CONFIG_KEYS = {
    "host", "port", "workload", "per_connection", "size", "concurrency", "rate", "processes",
    "duration", "requests", "warmup", "start_at", "starve_after", "timeout", "loop",
}  # fmt: skip


def peer(start_server: ServerFactory, kind: str, *args: str) -> RunningServer:
    return start_server(kind, command=[sys.executable, str(PEERS), kind, *args])


def run(port: int, **options: Any) -> LoadResult:
    """A short run: no warm-up, bounded by ``requests`` or a short ``duration``."""
    options.setdefault("warmup", 0.0)
    options.setdefault("duration", 10.0)
    return run_load(make_config("127.0.0.1", port=port, **options))


def assert_clean(result: LoadResult, requests: int) -> None:
    assert result.requests == requests
    assert result.errors_total == 0, result.errors
    assert result.unfinished == 0
    assert result.bytes_verified == requests * SIZE  # every echo compared byte for byte
    latency = result.latency
    assert latency.count == requests
    values = [latency.percentile(p) for p in (50, 90, 99, 99.9)] + [latency.max]
    assert values[0] > 0 and values == sorted(values)


def invoke(*args: str) -> Result:
    app = typer.Typer()
    app.command("load")(load_command)
    app.command("other")(lambda: None)  # two commands: "load" stays a subcommand
    return CliRunner().invoke(app, ["load", *args])


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code not in (0, None), result.stdout
    assert result.stderr.startswith("lab load: error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


# --- against every design ---------------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_a_closed_loop_run_against_each_design_verifies_every_echo(
    start_server: ServerFactory, design: str
) -> None:
    server = start_server(design)
    result = run(server.port, requests=200, concurrency=4, processes=2)
    assert_clean(result, 200)
    assert result.loader_processes == 2 and result.parts == 2
    assert result.throughput > 0
    assert result.starved == 0

    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == RAW_KEYS
    assert set(data["latency_us"]) == LATENCY_KEYS
    assert set(data["config"]) == CONFIG_KEYS
    assert set(data["errors"]) == set(ERROR_KINDS)
    assert data["config"]["start_at"] == data["start_at"] > 0
    assert data["start_at"] <= data["measure_start"] <= data["measure_end"] <= data["end"]
    assert data["target"] == {
        "host": "127.0.0.1", "port": server.port, "address": "127.0.0.1", "family": "ipv4",
    }  # fmt: skip
    assert LatencyHistogram.decode(data["histogram"]).count == 200
    assert LoadResult.from_dict(data).to_dict() == data


def test_the_persistent_workload_carries_k_messages_per_connection(
    start_server: ServerFactory,
) -> None:
    server = start_server("fork")
    result = run(
        server.port,
        workload="persistent",
        per_connection=10,
        requests=200,
        concurrency=4,
        processes=2,
    )
    assert_clean(result, 200)
    # 200 messages, 10 per connection; a slot's last connection may carry fewer.
    assert 200 // 10 <= result.connections <= 200 // 10 + 4


def test_large_messages_echo_whole(start_server: ServerFactory) -> None:
    server = start_server("multi-accept", "--workers", "2")
    result = run(
        server.port, workload="persistent", size="64KiB", requests=40, concurrency=2, processes=1
    )
    assert result.requests == 40 and result.errors_total == 0
    assert result.bytes_verified == 40 * 64 * 1024


def test_every_loader_starts_at_the_shared_absolute_time_and_warm_up_is_not_measured(
    start_server: ServerFactory,
) -> None:
    server = start_server("multi-accept", "--workers", "2")
    start_at = time.time() + 1.0
    result = run(
        server.port, start_at=start_at, warmup=0.3, requests=50, concurrency=4, processes=2
    )
    assert result.config["start_at"] == result.start_at == start_at
    assert result.measure_start == pytest.approx(start_at + 0.3, abs=1e-3)
    assert result.loader_start_lag_s >= 0
    assert_clean(result, 50)
    # Every slot began a request during the warm-up: connections, not measured requests.
    assert result.connections >= 50 + 4


def test_the_name_is_resolved_once_and_each_address_tried_until_one_connects(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server("multi-accept", "--workers", "2")  # listens on 127.0.0.1 only
    calls: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[Any]:
        calls.append(host)
        stream = socket.SOCK_STREAM
        return [
            (socket.AF_INET6, stream, 6, "", ("::1", port, 0, 0)),  # refused: not listening
            (socket.AF_INET, stream, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    config = make_config("lab-server", port=server.port, requests=40, concurrency=4, warmup=0)
    result = run_load(config)
    assert calls == ["lab-server"]  # once per run, not per connection
    assert result.target["address"] == "127.0.0.1"
    assert_clean(result, 40)


# --- what goes wrong is counted by kind -------------------------------------------------------


def test_a_server_that_corrupts_a_byte_yields_mismatches(start_server: ServerFactory) -> None:
    server = peer(start_server, "corrupt")
    result = run(server.port, requests=30, concurrency=2, processes=1)
    assert result.requests == 0
    assert result.errors["mismatch"] == 30
    assert result.errors_total == 30
    assert result.latency.count == 0  # a failed request has no latency


def test_a_server_that_closes_mid_echo_yields_short_reads(start_server: ServerFactory) -> None:
    server = peer(start_server, "half", "--size", str(SIZE))
    result = run(server.port, requests=30, concurrency=2, processes=1)
    assert result.requests == 0
    assert result.errors["short_read"] == 30
    assert result.errors_total == 30


def test_a_server_closing_persistent_connections_yields_closed_idle(
    start_server: ServerFactory,
) -> None:
    server = peer(start_server, "once", "--size", str(SIZE))
    result = run(
        server.port, workload="persistent", per_connection=10, requests=40, concurrency=2,
        processes=1,
    )  # fmt: skip
    assert result.requests > 0  # each connection's first message is echoed
    assert result.errors["closed_idle"] > 0  # …and its second finds it closed
    assert result.errors_total == result.errors["closed_idle"]
    assert result.requests + result.errors_total == 40


# --- open loop: no coordinated omission --------------------------------------------------------


def test_open_loop_latency_includes_the_wait_behind_a_slow_server(
    start_server: ServerFactory,
) -> None:
    service = 0.05  # the server sleeps this long per message, one connection at a time
    server = peer(start_server, "slow", "--size", str(SIZE), "--sleep", str(service))
    # Twice what it can serve (1 / 0.05 = 20 per second): requests queue.
    result = run(server.port, rate=40.0, duration=1.0, concurrency=8, processes=1)
    latency = result.latency
    assert latency.count == result.requests > 0
    # Every request waits at least one service time; a queue builds, so typical requests
    # wait for several others: latency counts from the *intended* send time.
    assert latency.min >= service * 1e6 * 0.99
    assert latency.percentile(50) >= 2 * service * 1e6
    assert latency.percentile(99) >= 2 * service * 1e6
    # Everything due was measured, or is visibly counted as not measured.
    assert result.requests + result.errors_total + result.unfinished + result.unsent == 40


def test_open_loop_sends_at_the_rate_given(start_server: ServerFactory) -> None:
    server = start_server("multi-accept", "--workers", "2")
    result = run(server.port, rate=200.0, duration=1.0, concurrency=8, processes=2)
    # The schedule, not the server's speed, decides how many: 200/s for 1 s.
    assert result.requests + result.errors_total + result.unfinished + result.unsent == 200
    assert result.requests > 0


# --- starvation ---------------------------------------------------------------------------------


def test_persistent_connections_beyond_the_pool_are_reported_starved(
    start_server: ServerFactory,
) -> None:
    server = start_server("multi-accept", "--workers", "2")
    result = run(
        server.port,
        workload="persistent",
        per_connection=1_000_000,  # never let go of a worker
        concurrency=6,
        processes=2,
        duration=1.5,
        starve_after=0.5,
    )
    assert result.starved >= 1  # 2 workers hold 2 connections; the other 4 wait
    assert result.starved <= 6 - 2
    waits = result.starved_wait
    assert waits.count == result.starved
    assert waits.min >= 0.5 * 1e6  # each waited at least --starve-after
    assert result.errors_total == 0  # starved is not an error
    assert result.requests > 0
    assert any(line.startswith(f"starved: {result.starved} connections") for line in
               summary_lines(result))  # fmt: skip


# --- merging results ----------------------------------------------------------------------------


def _part(values: list[int], errors: dict[str, int], start: float, end: float) -> LoadResult:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    return LoadResult(
        start_at=start, measure_start=start, measure_end=end, end=end + 1,
        requests=len(values), bytes_verified=len(values) * SIZE,
        errors={kind: errors.get(kind, 0) for kind in ERROR_KINDS},
        histogram=hist.encode(), loader_processes=1, loader_cpu_s=0.5, loader_wall_s=1.0,
    )  # fmt: skip


def test_merging_results_adds_counts_and_histograms_never_averages() -> None:
    a = _part([100] * 99 + [50_000], {"refused": 2}, 10.0, 20.0)
    b = _part([200] * 100, {"refused": 1, "reset": 4}, 10.5, 21.0)
    merged = merge([LoadResult.from_dict(a.to_dict()), LoadResult.from_dict(b.to_dict())])
    assert merged.requests == 200
    assert merged.errors["refused"] == 3 and merged.errors["reset"] == 4
    assert (merged.measure_start, merged.measure_end) == (10.0, 21.0)
    assert merged.latency == LatencyHistogram.merged([a.latency, b.latency])
    assert merged.latency.percentile(99) == b.latency.percentile(99)  # not their mean
    assert merged.loader_processes == 2 and merged.parts == 2
    assert not merged.loader_bound  # 1 s CPU of 2 s


def test_a_loader_busy_ninety_percent_of_its_time_is_flagged_loader_bound() -> None:
    busy = _part([100], {}, 0.0, 1.0)
    busy.loader_cpu_s, busy.loader_wall_s = 0.95, 1.0
    idle = _part([100], {}, 0.0, 1.0)
    assert merge([busy, busy]).loader_bound
    assert not merge([idle, idle]).loader_bound


# --- the target rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("fe80::1", True),
        ("fe80::1%lo", True),
        ("172.25.0.2", True),  # bakawali, on the container's bridge subnet
        ("172.25.0.1", False),  # the bridge's gateway: a router
        ("172.26.0.2", False),
        ("10.0.0.5", False),  # a route that is down
        ("192.0.2.1", False),  # TEST-NET-1: not local
        ("8.8.8.8", False),
        ("2001:db8::1", False),
        ("fd00::2", False),
        ("0.0.0.0", False),
        ("not-an-ip", False),
    ],
)
def test_only_loopback_and_directly_connected_hosts_are_allowed(
    address: str, allowed: bool
) -> None:
    assert is_allowed(address, parse_routes(ROUTES)) is allowed


@pytest.fixture
def lab_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's routing table replaced by the lab client's (the real one varies)."""
    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    monkeypatch.setattr(target_module, "ROUTE_FILE", routes)


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to create a socket fails the test: nothing may be sent."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a socket was created for a refused target")

    monkeypatch.setattr(socket, "socket", refuse)


@pytest.mark.usefixtures("lab_routes", "no_sockets")
def test_a_non_local_target_is_refused_before_any_packet_is_sent() -> None:
    with pytest.raises(TargetNotAllowed, match="loopback"):
        resolve_target("192.0.2.1", 12345, timeout=2.0)
    result = invoke("192.0.2.1", "--port", "12345")
    assert_one_line_error(result, "refusing to load 192.0.2.1", "directly connected")
    assert result.exit_code == 2


# --- the command --------------------------------------------------------------------------------


def test_json_output_is_one_complete_object(start_server: ServerFactory) -> None:
    server = start_server("multi-accept", "--workers", "2")
    result = invoke(
        "127.0.0.1", "-p", str(server.port), "--requests", "100", "-c", "2", "-P", "1",
        "--warmup", "0", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    data = json.loads(result.stdout)
    assert set(data) == RAW_KEYS
    assert data["requests"] == 100 and data["errors_total"] == 0
    assert data["config"]["concurrency"] == 2 and data["config"]["loop"] == "closed"


def test_the_summary_names_throughput_percentiles_errors_starvation_and_loader(
    start_server: ServerFactory,
) -> None:
    server = start_server("sendmsg")
    result = invoke(
        "127.0.0.1", "-p", str(server.port), "-n", "50", "-c", "2", "-P", "1", "--warmup", "0"
    )
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for fragment in ("requests/s", "p50", "p99.9", "max", "errors: none", "starved: none",
                     "loader_bound: false"):  # fmt: skip
        assert fragment in out, out


def _free_port() -> int:
    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["-c", "0"], ["--concurrency"]),
        (["--rate", "0"], ["--rate"]),
        (["--rate", "nan"], ["--rate"]),
        (["--size", "0"], ["--size"]),
        (["--size", "lots"], ["--size"]),
        (["--size", "2MiB"], ["--size", "1 MiB"]),
        (["--duration", "601"], ["--duration", "600"]),
        (["--duration", "0"], ["--duration"]),
        (["--warmup", "-1"], ["--warmup"]),
        (["--requests", "0"], ["--requests"]),
        (["--starve-after", "0"], ["--starve-after"]),
        (["--timeout", "-1"], ["--timeout"]),
        (["--workload", "bursty"], ["--workload", "persistent"]),
        (["--per-connection", "5"], ["--workload persistent"]),
        (["-w", "persistent", "-k", "0"], ["--per-connection"]),
        (["-P", "4", "-c", "2"], ["--processes", "--concurrency"]),
        (["--processes", "0"], ["--processes"]),
        (["--start-at", "1000"], ["--start-at", "past"]),
        (["--start-at", str(time.time() + 86_400)], ["--start-at"]),
        (["--port", "0"], ["--port"]),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], fragments: list[str]) -> None:
    result = invoke("127.0.0.1", "--port", "12345", *args)
    assert_one_line_error(result, *fragments)
    assert result.exit_code == 2


def test_an_unknown_host_is_a_one_line_error() -> None:
    result = invoke("no-such-host.invalid")
    assert_one_line_error(result, "cannot resolve")
    assert result.exit_code == 6


def test_nothing_listening_at_start_is_a_one_line_error() -> None:
    result = invoke("127.0.0.1", "--port", str(_free_port()))
    assert_one_line_error(result, "refused")
    assert result.exit_code == 3


def test_loader_that_ran_only_a_moment_is_not_judged_loader_bound() -> None:
    from lab.measure.result import is_loader_bound

    assert is_loader_bound(0.95, 1.0)  # saturated for a whole second
    assert not is_loader_bound(0.5, 1.0)
    # started after its window had passed: 0.15 ms of CPU over 0.16 ms of wall says nothing
    assert not is_loader_bound(0.000146, 0.00016)
