"""What is particular to the event-loop designs (``select``, ``asyncio`` on asyncio's loop or
uvloop's): partial writes and the bounded output of a client that does not read, many idle
connections, the idle timeout kept by the loop, the stop, descriptor exhaustion, and ``--loop``.

Waits are bounded polls and socket timeouts (hang guards); the only numbers compared with a
bound are memory and CPU time, which a slow machine does not inflate.
"""

from __future__ import annotations

import importlib.util
import os
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    EVENT_LOOPS,
    ORIGINAL_MESSAGE,
    RunningServer,
    ServerFactory,
    closing_all,
    cpu_seconds,
    echo_once,
    fd_count,
    recv_exactly,
    require,
    server_command,
    stats_when,
    wait_until,
)

GUARD = 20.0  # a bound on any blocking client call: a hang guard, never a measurement
REPO = Path(__file__).resolve().parent.parent
Stats = dict[str, Any]
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

# Every event loop, and asyncio on uvloop's loop too.
LOOPS = [pytest.param(d, [], id=d) for d in EVENT_LOOPS]
if "asyncio" in EVENT_LOOPS:
    LOOPS.append(pytest.param("asyncio", ["--loop", "uvloop"], id="asyncio-uvloop"))


def start(factory: ServerFactory, design: str, loop_args: list[str], *args: str) -> RunningServer:
    if "uvloop" in loop_args:
        require(HAVE_UVLOOP, "uvloop is not installed (make venv installs it: lab[dev])")
    return factory(design, *loop_args, *args)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GUARD)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stats_until(
    server: RunningServer, predicate: Callable[[Stats], bool], timeout: float = GUARD
) -> Stats:
    """Ask for statistics until ``predicate`` holds (bounded); returns the last ones."""
    last: Stats = {}

    def check() -> bool:
        nonlocal last
        last = server.stats()
        return bool(predicate(last))

    assert wait_until(check, timeout, interval=0.1), f"statistics never matched: {last}"
    return last


def send_until_stalled(sock: socket.socket, payload: bytes) -> int:
    """Send ``payload`` without reading until send() stays blocked for a second (or it is all
    sent); returns how much the kernel took."""
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    sent = 0
    while sent < len(payload):
        try:
            sent += sock.send(payload[sent : sent + 65536])
        except BlockingIOError:
            if not poller.poll(1000):
                break
    sock.setblocking(True)
    return sent


# --- partial writes and bounded output -----------------------------------------------------------


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_client_that_sends_without_reading_is_not_read_and_gets_every_byte_back_in_order(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args)
    baseline = rss(server.pid)
    payload = random.Random(1).randbytes(16 << 20)
    with connect(server.port) as rude, connect(server.port) as other:
        # The server echoes into our receive buffer until it is full, holds the rest of one
        # read, stops reading us, and then TCP's flow control stops our sends.
        sent = send_until_stalled(rude, payload)
        assert 0 < sent < len(payload), "16 MiB went in without being read: nothing stopped us"
        # Meanwhile another client is served through the same loop, and its reads fill the
        # same buffer the held echo was read into (a server that left the rest of an echo as a
        # view of that buffer would send this client's bytes to the first one).
        others = random.Random(2)
        for _ in range(8):
            message = others.randbytes(65536)
            other.sendall(message)
            assert recv_exactly(other, len(message)) == message
        grown = rss(server.pid) - baseline
        assert grown < 8 << 20, f"the server grew by {grown >> 20} MiB holding an unread echo"
        # Now read: every byte comes back, in order (the partial writes were completed).
        assert recv_exactly(rude, sent) == payload[:sent]
        rude.shutdown(socket.SHUT_WR)
        assert rude.recv(1) == b""
        other.shutdown(socket.SHUT_WR)
        assert other.recv(1) == b""
    stats = stats_until(server, lambda s: s["completed"] == 2)
    assert stats["failed"] == {}, stats
    assert stats["bytes_in"] == stats["bytes_out"] == sent + 8 * 65536


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_stalled_client_is_cut_after_idle_timeout_with_bounded_memory(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args, "--idle-timeout", "1")
    baseline = rss(server.pid)
    with connect(server.port) as rude:
        assert send_until_stalled(rude, os.urandom(16 << 20)) > 0
        assert rss(server.pid) - baseline < 8 << 20
        # No progress either way for --idle-timeout: the loop's timer closes it.
        stats = stats_until(server, lambda s: s["failed"].get("idle_timeout") == 1)
    assert stats["failed"] == {"idle_timeout": 1}, stats
    assert echo_once(server.port) == ORIGINAL_MESSAGE


# --- many connections ----------------------------------------------------------------------------


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_many_idle_connections_cost_nothing_while_others_are_served(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args, "--backlog", "512")
    idle = [connect(server.port) for _ in range(400)]
    with closing_all(idle):
        stats_until(server, lambda s: s["in_flight"] == len(idle))
        cpu_before = cpu_seconds(server.pid)
        time.sleep(2.0)  # idle for a while (a span for the CPU bound below, no assertion on time)
        cpu_idle = cpu_seconds(server.pid) - cpu_before
        assert cpu_idle < 0.3, f"{cpu_idle:.2f} s of CPU in 2 s with only idle connections"
        for i in range(100):
            payload = b"served %d\0" % i
            assert echo_once(server.port, payload) == payload
        # Every idle one is still open and still served.
        for i, sock in enumerate(idle):
            sock.sendall(b"%d" % i)
        for i, sock in enumerate(idle):
            assert recv_exactly(sock, len(b"%d" % i)) == b"%d" % i
    stats = stats_until(server, lambda s: s["in_flight"] == 0)
    assert stats["completed"] == 100 + len(idle), stats
    assert stats["failed"] == {}, stats


# --- the idle timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_idle_timeout_closes_a_silent_connection_but_not_one_that_keeps_talking(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args, "--idle-timeout", "2")
    with connect(server.port) as silent, connect(server.port) as talker:
        stats_until(server, lambda s: s["accepted"] == 2)
        # The talker sends every 0.2 s, far inside the timeout, until the silent one is closed.
        rounds = 0
        silent.setblocking(False)
        while True:
            talker.sendall(b"tick\n")
            assert recv_exactly(talker, 5) == b"tick\n"
            rounds += 1
            try:
                if silent.recv(1) == b"":
                    break
            except BlockingIOError:
                pass
            assert rounds < GUARD / 0.2, "the silent connection was never closed"
            time.sleep(0.2)
        talker.sendall(b"still here\n")
        assert recv_exactly(talker, 11) == b"still here\n"
        talker.shutdown(socket.SHUT_WR)
        assert talker.recv(1) == b""
    stats = stats_until(server, lambda s: s["completed"] == 1)
    assert stats["failed"] == {"idle_timeout": 1}, stats


# --- stopping ------------------------------------------------------------------------------------


def refused(port: int, accepted: list[int] | None = None) -> bool:
    """Whether a connect is refused; one that got in (the stop not yet handled) is closed at
    once and counted in ``accepted``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=GUARD).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # the listener closed mid-handshake: stopping, never accepted
        return False
    if accepted is not None:
        accepted.append(1)
    return False


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_sigterm_lets_open_connections_finish_and_refuses_newcomers(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args)
    half = len(ORIGINAL_MESSAGE) // 2
    socks = [connect(server.port) for _ in range(3)]
    with closing_all(socks):
        for sock in socks:
            sock.sendall(ORIGINAL_MESSAGE[:half])
            assert recv_exactly(sock, half) == ORIGINAL_MESSAGE[:half]
        os.kill(server.pid, signal.SIGTERM)
        probes: list[int] = []
        assert wait_until(lambda: refused(server.port, probes), GUARD), "still accepting"
        assert server.proc.poll() is None, "the server left with connections open"
        for sock in socks:
            sock.sendall(ORIGINAL_MESSAGE[half:])
            sock.shutdown(socket.SHUT_WR)
            assert recv_exactly(sock, len(ORIGINAL_MESSAGE)) == ORIGINAL_MESSAGE[half:]
            assert sock.recv(1) == b""
        assert server.wait(GUARD) == 0
    stats = server.final_stats()
    # The connections in flight, and a probe that got in before the stop was handled; one that
    # raced into the queue as the listener closed is the kernel's to reset, never accepted
    # (docs/server.md: "one or two at most").
    assert 3 <= stats["completed"] <= 3 + len(probes), (stats, probes)
    assert (stats["failed"], stats["in_flight"], stats["accepted"]) == ({}, 0, stats["completed"])


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_a_second_sigterm_closes_what_is_left_at_once(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args, "--grace", "60")
    with connect(server.port) as busy:
        busy.sendall(ORIGINAL_MESSAGE)
        assert recv_exactly(busy, len(ORIGINAL_MESSAGE)) == ORIGINAL_MESSAGE
        os.kill(server.pid, signal.SIGTERM)
        assert wait_until(lambda: refused(server.port), GUARD)
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(GUARD) == 0  # far inside the 60 s grace period
        assert busy.recv(1) == b""
    assert server.final_stats()["failed"] == {"stopped": 1}


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_connections_limit_serves_n_then_exits(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args, "--connections", "2")
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert server.wait(GUARD) == 0
    stats = server.final_stats()
    assert (stats["accepted"], stats["completed"]) == (2, 2), stats


# --- the health port -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_health_probes_are_answered_in_the_loop_and_counted_apart(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    health = free_port()
    server = start(start_server, design, loop_args, "--health-port", str(health))
    with connect(server.port) as held:  # a connection in hand does not delay the probes
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", health), timeout=GUARD) as probe:
                assert probe.recv(16) == b"ok\n"
    stats = stats_until(server, lambda s: s["completed"] == 1)
    assert (stats["health_probes"], stats["accepted"]) == (3, 1), stats


# --- out of descriptors --------------------------------------------------------------------------


def lowest_free(pid: int) -> int:
    numbers = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(numbers) + 1)) - numbers)


@pytest.mark.parametrize(("design", "loop_args"), LOOPS)
def test_descriptor_exhaustion_sheds_without_spinning_serves_the_open_ones_and_recovers(
    design: str, loop_args: list[str], start_server: ServerFactory
) -> None:
    server = start(start_server, design, loop_args)
    with connect(server.port) as open_one:
        open_one.sendall(b"before")
        assert recv_exactly(open_one, 6) == b"before"
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = lowest_free(server.pid)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, hard))
        cpu_before = cpu_seconds(server.pid)
        clients: list[socket.socket] = []
        with closing_all(clients):
            end = time.monotonic() + 3.0  # keep connecting for a while (no assertion on time)
            while time.monotonic() < end:
                sock = connect(server.port)
                sock.sendall(ORIGINAL_MESSAGE)
                clients.append(sock)
                time.sleep(0.1)
            cpu_used = cpu_seconds(server.pid) - cpu_before
            assert cpu_used < 1.0, f"{cpu_used:.2f} s of CPU in 3 s: accept() is spinning"
            # The connection it already had is served on.
            open_one.sendall(b"during")
            assert recv_exactly(open_one, 6) == b"during"
            stats = server.stats()
            assert stats["shed"] >= 1, stats
            notices = [line for line in server.lines if "accept() failed with EMFILE" in line]
            assert len(notices) == 1, notices
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit + 64, hard))
        assert echo_once(server.port) == ORIGINAL_MESSAGE
        server.wait_for_line(r"accept\(\) recovered; \d+ connection\(s\) shed")
    assert server.proc.poll() is None
    assert wait_until(lambda: fd_count(server.pid) <= limit, GUARD)


# --- --loop --------------------------------------------------------------------------------------


def test_uvloop_serves_the_echo_when_installed(start_server: ServerFactory) -> None:
    require(HAVE_UVLOOP, "uvloop is not installed (make venv installs it: lab[dev])")
    server = start_server("asyncio", "--loop", "uvloop")
    assert server.wait_for_line(r"^ready ").endswith("loop=uvloop")
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert stats_when(server, lambda s: s["completed"] == 1)["completed"] == 1
    assert server.stop() == 0


def run_server(*args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = server_command("asyncio", *args)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [command[0], *python_flags, *command[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=GUARD,
        check=False,
    )


def test_loop_uvloop_without_uvloop_installed_is_a_one_line_usage_error() -> None:
    # -S: no site-packages on the path, so uvloop is really not importable (the server itself
    # needs only the standard library, found through PYTHONPATH).
    hidden = subprocess.run([sys.executable, "-S", "-c", "import uvloop"], capture_output=True)
    assert hidden.returncode != 0
    result = run_server("--loop", "uvloop", python_flags=("-S",))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lab serve: error: --loop uvloop: uvloop is not installed")
    assert "pip install" in lines[0] and "--loop asyncio" in lines[0]
    assert "ready" not in result.stdout


@pytest.mark.parametrize(
    ("design", "args", "words"),
    [
        ("asyncio", ("--loop", "trio"), ("--loop 'trio'", "asyncio or uvloop")),
        ("select", ("--loop", "uvloop"), ("--loop uvloop", "--design asyncio")),
    ],
)
def test_a_loop_it_cannot_run_is_a_one_line_usage_error(
    design: str, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    result = subprocess.run(
        server_command(design, *args), capture_output=True, text=True, timeout=GUARD, check=False
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr


def test_signals_reach_the_uvloop_loop_through_the_servers_own_pipe(
    start_server: ServerFactory,
) -> None:
    """uvloop points the wake-up fd at its own self-pipe when it starts running; the server
    points it back, so SIGUSR1 and SIGTERM are handled while the loop sleeps."""
    require(HAVE_UVLOOP, "uvloop is not installed (make venv installs it: lab[dev])")
    server = start_server("asyncio", "--loop", "uvloop")
    for _ in range(3):
        assert server.stats()["accepted"] == 0
    assert server.stop(timeout=GUARD) == 0
    assert server.final_stats()["accepted"] == 0
