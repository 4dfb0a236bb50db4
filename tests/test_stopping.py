"""Stopping under load, and the socket-layer defects found by reading (each pinned here).

A stop drains: what the kernel had queued when SIGTERM came is served, no newcomer is let in
(the backlog shrinks to 0), then the listener closes — so no connection the server accepted is
reset while the grace period lasts. A SIGTERM to the whole process group (systemd's
KillMode=control-group) is an orderly stop too: no worker is replaced or reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time

import pytest
from harness import ALL_DESIGNS, POOL_DESIGNS, ServerFactory, echo_once

from lab.measure.config import make_config
from lab.measure.load import run_load
from lab.sockets.stats import ReportPipe, Stats

MESSAGE = b"This is a test message from a stupid client lol!\0"


def args_for(design: str) -> list[str]:
    return ["--workers", "2", "--max-workers", "2"] if design in POOL_DESIGNS else []


@pytest.mark.parametrize("design", [d for d in ALL_DESIGNS if d != "spawn"])
def test_sigterm_under_steady_load_cuts_no_accepted_connection(
    design: str, start_server: ServerFactory
) -> None:
    # The load outlasts the grace period: a server that kept accepting newcomers while
    # stopping would still hold connections when the deadline cut them.
    server = start_server(design, "--grace", "2", "--backlog", "64", *args_for(design))
    config = make_config(
        "127.0.0.1", port=server.port, concurrency=8, duration=5.0, warmup=0.1, processes=2
    )
    results = []
    loader = threading.Thread(target=lambda: results.append(run_load(config)))
    loader.start()
    time.sleep(1.0)  # mid-run (a point in the load, not a measurement)
    os.kill(server.pid, signal.SIGTERM)
    assert server.wait(30) == 0
    loader.join(60)
    stats = server.final_stats()
    assert "stopped" not in stats["failed"], stats  # nothing cut at a deadline
    assert stats["in_flight"] == 0, stats
    errors = results[0].errors
    # The kernel resets a connection that raced into the queue as the listener closed: one
    # or two at most; later connects are refused (nothing listens) — not resets.
    assert errors["reset"] + errors["short_read"] <= 2, errors


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_sigterm_to_the_process_group_is_an_orderly_stop(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, *args_for(design))
    assert echo_once(server.port) == MESSAGE
    with socket.create_connection(("127.0.0.1", server.port)) as busy:
        busy.sendall(MESSAGE)
        assert busy.recv(100) == MESSAGE  # a connection in flight while the group is stopped
        os.killpg(server.pid, signal.SIGTERM)
        busy.sendall(b"still here")
        assert busy.recv(100) == b"still here"  # served on through the grace period
    assert server.wait(30) == 0
    text = "\n".join(server.lines)
    # no notice about a worker or child: they left because they were told to
    assert not re.search(r"lab: (worker|child) \d+", text), text
    assert "Traceback" not in text, text


def test_spawned_worker_finishes_its_connection_through_a_cgroup_wide_sigterm(
    start_server: ServerFactory,
) -> None:
    server = start_server("spawn")
    with socket.create_connection(("127.0.0.1", server.port)) as busy:
        busy.sendall(MESSAGE)
        assert busy.recv(100) == MESSAGE
        workers = server.descendants()
        assert workers
        for pid in [server.pid, *workers]:  # every process, whatever its process group
            os.kill(pid, signal.SIGTERM)
        busy.sendall(b"still here")
        assert busy.recv(100) == b"still here"
    assert server.wait(30) == 0
    stats = server.final_stats()
    assert stats["completed"] == 1 and stats["failed"] == {}, stats


def test_sendmsg_with_connections_limit_under_concurrent_load_exits_cleanly(
    start_server: ServerFactory,
) -> None:
    # Once: the stop made the channel blocking, and passing a descriptor then read worker
    # messages from it, raising an uncaught TimeoutError (exit 1, no stats line).
    server = start_server("sendmsg", "--workers", "1", "--connections", "5")
    results: list[bytes] = []

    def client() -> None:
        try:
            results.append(echo_once(server.port, timeout=5))
        except OSError:
            results.append(b"")

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert server.wait(30) == 0
    stats = server.final_stats()
    assert stats["accepted"] >= 5 and stats["completed"] >= 5, stats
    assert results.count(MESSAGE) >= 5
    assert not [line for line in server.lines if "Traceback" in line]


def test_sendmsg_stop_serves_everything_queued_behind_a_busy_pool(
    start_server: ServerFactory,
) -> None:
    # Once: at the stop the parent stopped reading the workers' state messages; with hundreds
    # of descriptors queued, the worker filled the channel with them, blocked in its own send,
    # and everything still queued was killed at the deadline instead of served.
    count = 300  # more than the descriptor queue holds: it is full when the stop comes
    server = start_server(
        "sendmsg", "--workers", "1", "--max-workers", "1", "--grace", "30", "--backlog", "512"
    )
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"x")
    assert slow.recv(1) == b"x"  # the only worker is busy with it
    queued = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port))
        with contextlib.suppress(OSError):  # a shed one may be reset already (counted below)
            sock.sendall(MESSAGE)
            sock.shutdown(socket.SHUT_WR)
        queued.append(sock)
    time.sleep(1.0)  # the parent has queued what fits (a pause, not a measurement)
    os.kill(server.pid, signal.SIGTERM)
    slow.close()  # the worker is free: it must now serve them all, then leave on STOP
    served = 0
    for sock in queued:
        sock.settimeout(30)
        got = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                got += chunk
        served += got == MESSAGE
        sock.close()
    assert server.wait(30) == 0
    stats = server.final_stats()
    # With the pool at its maximum, a connection that finds the descriptor queue full is shed
    # (closed at once, counted): every other one is served, none cut by the stop.
    assert stats["failed"] == {} and stats["in_flight"] == 0, stats
    assert served == count - stats["shed"] and stats["completed"] == served + 1, (served, stats)
    assert served > 200  # the queue was full of descriptors when the stop came


def test_worker_cmd_program_gets_no_statistics_descriptor(start_server: ServerFactory) -> None:
    # Once: every --worker-cmd program got the report pipe as descriptor 3, and garbage
    # written there crashed the server.
    probe = "if [ -e /proc/self/fd/3 ]; then echo HAS3; else echo NO3; fi; cat"
    server = start_server("spawn", "--worker-cmd", f"sh -c '{probe}'")
    assert echo_once(server.port, b"hi\n") == b"NO3\n"
    server.stop()
    assert "report_errors" not in server.final_stats()


def test_malformed_report_records_are_skipped_and_counted() -> None:
    pipe = ReportPipe()
    stats = Stats("spawn")
    os.write(
        pipe.write_fd,
        b"garbage\nd 12 completed 5 5\nd x completed 1 1\nd 13 exploded 1 1\n"
        b"\xff\xfe\nd 14 reset 3 -1\nd 15 reset 3 2\n",
    )
    pipe.drain(stats)
    assert (stats.completed, dict(stats.failed), stats.report_errors) == (1, {"reset": 1}, 5)
    assert (stats.bytes_in, stats.bytes_out) == (8, 7)
    pipe.close()


def test_worker_cmd_program_gets_a_socket_without_the_servers_timeouts(
    start_server: ServerFactory,
) -> None:
    # Once: clearing the inherited SO_RCVTIMEO set one clock tick instead of none, and cat
    # failed with EAGAIN at the first pause between messages.
    server = start_server("spawn", "--worker-cmd", "cat", "--idle-timeout", "30")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(b"hello\n")
            assert sock.recv(100) == b"hello\n"
            time.sleep(0.3)  # a pause longer than any clock tick
        sock.sendall(b"again\n")
        assert sock.recv(100) == b"again\n"


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_a_second_sigterm_ends_the_grace_period_at_once(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, "--grace", "60", *args_for(design))
    with socket.create_connection(("127.0.0.1", server.port)) as busy:
        busy.sendall(MESSAGE)
        assert busy.recv(100) == MESSAGE
        os.kill(server.pid, signal.SIGTERM)
        time.sleep(0.3)  # the first one has been handled (a pause, not a measurement)
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(20) == 0  # far inside the 60 s grace period
    assert server.final_stats()["failed"] == {"stopped": 1}
