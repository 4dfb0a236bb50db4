"""The echo service, end to end, on every server design: real processes on loopback only.

Each test starts its server(s) with the ``start_server`` fixture (a process group killed at
teardown) and talks to it from outside: the chapter's original C client, ``lab client``, raw
sockets, ``nc`` and ``socat``. Statistics come from the server itself (SIGUSR1 → JSON line).

Waits are bounds (``wait_until``, socket timeouts), never measurements: a slow machine makes a
test slower, not red.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

import pytest
from cprograms import build
from harness import (
    ALL_DESIGNS,
    ANY_IDLE_WORKER,
    CONCURRENT_DESIGNS,
    ORIGINAL_MESSAGE,
    POOL_DESIGNS,
    RunningServer,
    ServerFactory,
    echo_once,
    processes_in_group,
    wait_until,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lab.cli.app import app
from lab.sockets.designs import DESIGNS

CHAPTER_MESSAGE = ORIGINAL_MESSAGE[:-1].decode()  # without its NUL: `--nul` adds it
LOOPBACK = "127.0.0.1"
# A guard against hangs only (pytest-timeout is the backstop), never a performance assertion.
GUARD = 30.0
# Two workers for the pool designs, whatever the CPU count: a silent client then holds one and
# the other stays free (with one worker a held connection blocks the pool by design).
POOL_ARGS = ("--workers", "2")
# A pool that grows (sendmsg): workers added under load retire after --worker-idle; keep them
# longer than GUARD, so that a descriptor a worker should not hold (and that delays a client's
# EOF) cannot be hidden by that worker retiring and releasing it before the client's timeout.
GROWING_ARGS = ("--worker-idle", "120")


# --- helpers ----------------------------------------------------------------------------------


def extra_args(design: str) -> tuple[str, ...]:
    args = POOL_ARGS if design in POOL_DESIGNS else ()
    return args + GROWING_ARGS if DESIGNS[design].grows else args


Stats = dict[str, Any]


def failed(stats: Stats) -> dict[str, int]:
    value = stats["failed"]
    assert isinstance(value, dict)
    return value


def wait_for_stats(
    server: RunningServer, predicate: Callable[[Stats], bool], timeout: float = GUARD
) -> Stats:
    """Poll the server's statistics until ``predicate(stats)``; return the last ones seen (the
    caller asserts on them, so a timeout shows what the server said last)."""
    seen: list[Stats] = [server.stats()]

    def ready() -> bool:
        if predicate(seen[-1]):
            return True
        seen.append(server.stats())
        return bool(predicate(seen[-1]))

    wait_until(ready, timeout=timeout, interval=0.1)
    return seen[-1]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def connect(port: int, host: str = LOOPBACK, timeout: float = GUARD) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def chunked_exchange(sock: socket.socket, payload: bytes, chunks: list[int]) -> bytes:
    """Send ``payload`` in pieces of the sizes in ``chunks`` (cycled), then shut down our
    sending side, while a thread reads the echo up to the server's EOF at the same time: a
    payload larger than the socket buffers cannot deadlock, and a short or long echo shows at
    once (no waiting for bytes that will never come)."""
    received = bytearray()
    problems: list[BaseException] = []

    def reader() -> None:
        try:
            while chunk := sock.recv(1 << 20):
                received.extend(chunk)
        except BaseException as exc:  # reported by the caller
            problems.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        offset = 0
        for size in cycle(chunks):
            if offset >= len(payload):
                break
            sock.sendall(payload[offset : offset + size])
            offset += size
        sock.shutdown(socket.SHUT_WR)
    finally:
        thread.join(GUARD * 2)
    assert not thread.is_alive(), "the echo reader is still waiting"
    if problems:
        raise problems[0]
    return bytes(received)


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs (and handshake ACKs) dropped because an accept queue was
    full. A counter for this whole network namespace: other sockets may raise it too."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        if header.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=True))
            return int(fields["ListenOverflows"])
    raise AssertionError("no TcpExt line in /proc/net/netstat")


def vm_rss_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # it ended meanwhile
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def group_peak_rss(server: RunningServer) -> int:
    """The largest resident set among the server's processes (parent, children, workers)."""
    return max((vm_rss_bytes(pid) for pid in processes_in_group(server.pid)), default=0)


def peer_closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closed or reset the connection within ``timeout`` — seen by poll()
    alone, without reading (reading would let a stalled echo make progress again)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLERR | select.POLLHUP)
    mask = select.POLLRDHUP | select.POLLERR | select.POLLHUP

    def closed() -> bool:
        return any(events & mask for _, events in poller.poll(0))

    return wait_until(closed, timeout=timeout, interval=0.05)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in our receive buffer (FIONREAD): what the server sent and we did not read."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", buf)[0]
    return value


@contextlib.contextmanager
def process(cmd: list[str], stdin: bytes | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A client program in its own session; its whole group is killed on the way out."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(GUARD)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_client(cmd: list[str], stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    with process(cmd, stdin) as proc:
        out, err = proc.communicate(stdin, timeout=GUARD)
        return proc.returncode, out, err


def host_tool(name: str, package: str) -> str:
    """A client program the tests need: missing is a failure, not a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: this test uses it as a real client of the echo service. "
            f"Install it (Debian: apt-get install {package}; `make host-tools` does it)",
            pytrace=False,
        )
    return path


# --- the original exchange --------------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_original_c_client_exchange_succeeds(design: str, start_server: ServerFactory) -> None:
    comclient = build("comclient")
    server = start_server(design)
    code, out, err = run_client([str(comclient), LOOPBACK, str(server.port)])
    text = out.decode()
    assert code == 0, (text, err)
    lines = text.splitlines()
    assert "49 bytes sent." in lines
    assert "49 bytes received." in lines
    assert f'The sent message: "{CHAPTER_MESSAGE}" successfully received' in text


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_lab_client_with_nul_gets_its_49_bytes_back(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design)
    result = CliRunner().invoke(
        app,
        ["client", LOOPBACK, "--port", str(server.port), "--nul", "-m", CHAPTER_MESSAGE],
        env={"LAB_PORT": None, "LAB_MESSAGE": None, "LAB_TIMEOUT": None},
    )
    assert result.exit_code == 0, result.output
    assert "49 bytes sent." in result.stdout.splitlines()
    assert "49 bytes received." in result.stdout.splitlines()


def test_iterative_two_connection_session_exits_by_itself(start_server: ServerFactory) -> None:
    server = start_server("iterative", "--connections", "2")
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert echo_once(server.port, b"second\0exchange") == b"second\0exchange"
    assert server.wait(GUARD) == 0
    stats = server.final_stats()
    assert stats["accepted"] == 2
    assert stats["completed"] == 2
    assert failed(stats) == {}


# --- the backlog: delayed, not refused --------------------------------------------------------


def test_iterative_full_backlog_delays_connections_instead_of_refusing(
    start_server: ServerFactory,
) -> None:
    backlog = 1
    # Linux queues up to backlog + 1 completed connections; these are well beyond that.
    extra = backlog + 1 + 3
    server = start_server("iterative", "--backlog", str(backlog))
    address = (LOOPBACK, server.port)
    waiting: list[socket.socket] = []
    with connect(server.port) as first:
        try:
            # The first client is being served (its echo came back) and sends nothing more.
            first.sendall(b"first")
            assert recv_exactly(first, 5) == b"first"

            before = listen_overflows()
            for _ in range(extra):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                waiting.append(sock)
                sock.setblocking(False)
                code = sock.connect_ex(address)
                assert code in (0, errno.EINPROGRESS), os.strerror(code)
            # The queue overflowed: the kernel dropped SYNs (the clients will retransmit them).
            assert wait_until(lambda: listen_overflows() > before, timeout=10), (
                "ListenOverflows did not increase although the accept queue was full"
            )
            for sock in waiting:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                assert code == 0, f"a waiting connection failed: {os.strerror(code)}"

            # The first client finishes; the server then serves the waiting ones in turn.
            first.shutdown(socket.SHUT_WR)
            assert first.recv(1) == b""

            results: dict[int, bytes | BaseException] = {}

            def finish(index: int, sock: socket.socket) -> None:
                payload = b"queued client %d\0" % index * (index + 1)
                try:
                    poller = select.poll()
                    poller.register(sock, select.POLLOUT)
                    # A dropped SYN is retried after about 1, 3, 7 … s: generous bound.
                    if not poller.poll(GUARD * 1000):
                        raise TimeoutError("connect() still pending")
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                    sock.settimeout(GUARD)
                    # One segment, and nothing more until its echo is back: with SYN cookies
                    # (Linux's default once a SYN queue overflows) a connection whose handshake
                    # ACK was dropped for want of room is rebuilt from a retransmission of this
                    # first segment; a later one (a FIN sent at once) would not carry a valid
                    # cookie and the kernel would answer it with a reset.
                    sock.sendall(payload)
                    echoed = recv_exactly(sock, len(payload))
                    sock.shutdown(socket.SHUT_WR)
                    if sock.recv(1) != b"":
                        raise ValueError("data after the echo")
                    results[index] = echoed if echoed == payload else ValueError(echoed)
                except BaseException as exc:
                    results[index] = exc

            threads = [
                threading.Thread(target=finish, args=(i, sock), daemon=True)
                for i, sock in enumerate(waiting)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(GUARD * 2)
            problems = {i: r for i, r in results.items() if isinstance(r, BaseException)}
            refused = [i for i, r in problems.items() if isinstance(r, ConnectionRefusedError)]
            assert not refused, f"connections refused instead of delayed: {refused}"
            assert len(results) == extra and not problems, problems
        finally:
            for sock in waiting:
                sock.close()

    stats = wait_for_stats(server, lambda s: s["completed"] == 1 + extra)
    assert stats["accepted"] == stats["completed"] == 1 + extra
    assert failed(stats) == {}


# --- many clients at once ---------------------------------------------------------------------


@pytest.mark.parametrize("design", CONCURRENT_DESIGNS)
def test_fifty_concurrent_clients_all_get_their_exact_bytes_back(
    design: str, start_server: ServerFactory
) -> None:
    clients, exchanges = 50, 4
    server = start_server(design, *extra_args(design))
    all_connected = threading.Barrier(clients)
    errors: list[str] = []
    totals = [0] * clients

    def client(index: int) -> None:
        rng = random.Random(index)
        try:
            with connect(server.port) as sock:
                # Every client is connected before any sends: 50 connections open at once.
                all_connected.wait(GUARD)
                for _ in range(exchanges):
                    payload = b"\0" + rng.randbytes(rng.randint(0, 8000)) + b"\0"
                    sock.sendall(payload)
                    echoed = recv_exactly(sock, len(payload))
                    if echoed != payload:
                        errors.append(f"client {index}: echo differs ({len(echoed)} bytes)")
                        return
                    totals[index] += len(payload)
                sock.shutdown(socket.SHUT_WR)
                try:
                    if sock.recv(1) != b"":
                        errors.append(f"client {index}: data after the echo")
                except TimeoutError:
                    errors.append(
                        f"client {index}: all echoed, but the server's end never closed "
                        f"(no EOF within {GUARD:g} s of our FIN)"
                    )
        except Exception as exc:
            errors.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GUARD * 2)
    assert not any(thread.is_alive() for thread in threads), "a client is still running"
    assert not errors, errors

    stats = wait_for_stats(server, lambda s: s["completed"] == clients)
    assert stats["accepted"] == stats["completed"] == clients
    assert failed(stats) == {}
    assert stats["in_flight"] == 0
    assert stats["bytes_in"] == stats["bytes_out"] == sum(totals)


@pytest.mark.parametrize("design", ["fork", "spawn"])
def test_statistics_count_each_connection_once_when_many_children_end_together(
    design: str, start_server: ServerFactory
) -> None:
    # A process per connection: 50 connections are echoed, then all closed at once, so their
    # processes end (and report) together, in rounds. Each must be counted once, as completed.
    rounds, clients = 20 if design == "fork" else 2, 50
    server = start_server(design)
    for _ in range(rounds):
        socks = [connect(server.port) for _ in range(clients)]
        try:
            for index, sock in enumerate(socks):
                sock.sendall(b"burst %d\0" % index)
            for index, sock in enumerate(socks):
                expected = b"burst %d\0" % index
                assert recv_exactly(sock, len(expected)) == expected
            for sock in socks:
                sock.shutdown(socket.SHUT_WR)
            for sock in socks:
                assert sock.recv(1) == b""
        finally:
            for sock in socks:
                sock.close()
    total = rounds * clients
    stats = wait_for_stats(server, lambda s: s["completed"] >= total)
    assert (stats["accepted"], stats["completed"], failed(stats)) == (total, total, {})
    assert stats["in_flight"] == 0


# --- payloads ---------------------------------------------------------------------------------


def _seeded_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Hypothesis draws binaries of a few KB at most; large ones are built from a seed and a size.
PAYLOADS = st.one_of(
    st.binary(min_size=1, max_size=200_000),
    st.builds(_seeded_bytes, st.integers(0, 2**32), st.integers(1, 200_000)),
)
CHUNKS = st.lists(st.integers(1, 70_000), min_size=1, max_size=8)
LARGEST = (bytes(range(256)) * 800)[:200_000]


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_persistent_connection_echoes_random_payloads_in_random_chunks(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, *extra_args(design))  # one server for every example

    @settings(
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=PAYLOADS, chunks=CHUNKS)
    @example(payload=LARGEST, chunks=[1, 65_536, 7, 100])
    @example(payload=b"\0", chunks=[1])
    def round_trip(payload: bytes, chunks: list[int]) -> None:
        with connect(server.port, timeout=10) as sock:
            # A persistent connection: a first message, then the payload after it.
            sock.sendall(b"first\0")
            assert recv_exactly(sock, 6) == b"first\0"
            assert chunked_exchange(sock, payload, chunks) == payload

    round_trip()


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_all_256_byte_values_round_trip(design: str, start_server: ServerFactory) -> None:
    server = start_server(design)
    payload = bytes(range(256)) + bytes(range(255, -1, -1))  # NULs at both ends too
    assert echo_once(server.port, payload) == payload


# --- misbehaving clients ----------------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_client_reset_mid_stream_costs_only_its_own_connection(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, *extra_args(design))
    # A bystander held open only where it cannot hold up the rude client (any idle worker
    # serves it); iterative serves one at a time, and reuseport may hash both to one worker.
    bystander = connect(server.port) if design in ANY_IDLE_WORKER else None
    try:
        if bystander is not None:
            bystander.sendall(b"before\0")
            assert recv_exactly(bystander, 7) == b"before\0"

        rude = connect(server.port)
        try:
            rude.setblocking(False)
            block = bytes(range(256)) * 256  # 64 KiB
            # Send without reading: the server echoes into our receive buffer until it is full,
            # then waits to write (mid-stream); we stop when nothing more fits.
            sent = 0
            poller = select.poll()
            poller.register(rude, select.POLLOUT)
            deadline = time.monotonic() + GUARD
            while sent < 64 << 20 and time.monotonic() < deadline:
                try:
                    sent += rude.send(block)
                except BlockingIOError:
                    if not poller.poll(200) and unread_bytes(rude) > 0:
                        break
            assert wait_until(lambda: unread_bytes(rude) > 0, timeout=GUARD), (
                "the server echoed nothing"
            )
        finally:
            # SO_LINGER 0: close() sends RST instead of FIN.
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rude.close()

        assert echo_once(server.port) == ORIGINAL_MESSAGE
        expected_completed = 1
        if bystander is not None:
            bystander.sendall(b"after\0")
            assert recv_exactly(bystander, 6) == b"after\0"
            bystander.shutdown(socket.SHUT_WR)
            assert bystander.recv(1) == b""
            expected_completed += 1
    finally:
        if bystander is not None:
            bystander.close()

    stats = wait_for_stats(
        server,
        lambda s: failed(s).get("reset", 0) >= 1 and s["completed"] == expected_completed,
    )
    assert failed(stats) == {"reset": 1}
    assert stats["completed"] == expected_completed
    assert stats["accepted"] == expected_completed + 1


def test_iterative_drops_a_silent_client_after_idle_timeout_and_serves_the_next(
    start_server: ServerFactory,
) -> None:
    server = start_server("iterative", "--idle-timeout", "1")
    with connect(server.port) as silent:
        # The silent client is the one being served (accepted) before the other connects.
        wait_for_stats(server, lambda s: s["accepted"] == 1)
        payload = b"waited\0for the silent one"
        assert echo_once(server.port, payload, timeout=GUARD) == payload
        # By the time that echo came back, the server had already closed the silent connection
        # (it sent nothing, so a FIN is waiting): the other client was served after it.
        silent.setblocking(False)
        assert silent.recv(1) == b""
    stats = wait_for_stats(server, lambda s: s["completed"] == 1)
    assert failed(stats) == {"idle_timeout": 1}
    assert stats["accepted"] == 2


@pytest.mark.parametrize("design", ANY_IDLE_WORKER)
def test_silent_client_does_not_delay_others_on_concurrent_designs(
    design: str, start_server: ServerFactory
) -> None:
    # The idle timeout (60 s) is far beyond the other client's timeout (10 s): if the silent
    # client held the server up, the echo would time out.
    server = start_server(design, "--idle-timeout", "60", *extra_args(design))
    with connect(server.port) as silent:
        wait_for_stats(server, lambda s: s["accepted"] == 1)
        for index in range(3):
            payload = b"not delayed %d\0" % index
            assert echo_once(server.port, payload, timeout=10) == payload
        stats = wait_for_stats(server, lambda s: s["completed"] == 3)
        assert stats["accepted"] == 4
        assert stats["in_flight"] == 1  # the silent one, still open
        assert failed(stats) == {}
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # no EOF, no reset: it is still being served
            silent.recv(1)


@pytest.mark.parametrize("design", ["iterative", "fork"])
def test_non_reading_client_is_cut_after_idle_timeout_with_bounded_memory(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, "--idle-timeout", "1")
    limit = 20 << 20
    block = os.urandom(64 * 1024)
    peak_rss = group_peak_rss(server)
    with connect(server.port) as sock:
        sock.setblocking(False)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        sent = 0
        # Send, never read: up to `limit` bytes, or until send() stays blocked for 2 s, or
        # until the server cuts the connection.
        while sent < limit:
            try:
                sent += sock.send(block)
            except BlockingIOError:
                if not poller.poll(2000):
                    break
            except (ConnectionResetError, BrokenPipeError):
                break
            peak_rss = max(peak_rss, group_peak_rss(server))
        assert sent > 0
        assert peer_closed(sock, timeout=GUARD), "the server kept the stalled connection open"
    assert peak_rss < 200 << 20, f"a server process grew to {peak_rss >> 20} MiB"
    stats = wait_for_stats(server, lambda s: failed(s).get("idle_timeout", 0) == 1)
    assert failed(stats) == {"idle_timeout": 1}
    # The server is fine afterwards.
    assert echo_once(server.port) == ORIGINAL_MESSAGE


# --- other clients: nc and socat --------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_netcat_as_client_gets_the_echo(design: str, start_server: ServerFactory) -> None:
    nc = host_tool("nc", "netcat-openbsd")
    server = start_server(design)
    # -N: shut down the sending side at the end of stdin, then read the echo up to the
    # server's EOF (-q1 alone would close after a fixed second, whatever the server did).
    code, out, err = run_client([nc, "-N", LOOPBACK, str(server.port)], b"hello\n")
    assert (code, out) == (0, b"hello\n"), err


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_socat_as_client_gets_the_echo(design: str, start_server: ServerFactory) -> None:
    socat = host_tool("socat", "socat")
    server = start_server(design)
    # -t: after stdin's end, wait up to that long for the echo (it ends earlier at the EOF).
    code, out, err = run_client(
        [socat, "-t", "10", "-", f"TCP:{LOOPBACK}:{server.port}"], b"hello\n"
    )
    assert (code, out) == (0, b"hello\n"), err


# --- IPv6 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_echo_over_ipv6_loopback(design: str, start_server: ServerFactory) -> None:
    command = [sys.executable, "-m", "lab.sockets", "--design", design, "--host", "::1"]
    server = start_server(design, command=[*command, "--port", "0", *extra_args(design)])
    assert server.host == "::1"
    payload = b"over six\0" + bytes(range(256))
    assert echo_once(server.port, payload, host="::1") == payload


# --- the trace --------------------------------------------------------------------------------

TRACE_LINES = [
    "socket() is OK",
    "bind() is OK",
    "listen() is OK",
    "accept() is OK",
    "The message from client: This is a test message from a stupid client lol!\\0",
    "send() is OK",
]


def test_trace_shows_the_original_socket_calls_in_order(start_server: ServerFactory) -> None:
    server = start_server("iterative", "--trace")
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    server.wait_for_line(r"send\(\) is OK")
    prefix = f"[{server.pid}] "
    positions = []
    for text in TRACE_LINES:
        matching = [i for i, line in enumerate(server.lines) if line == prefix + text]
        assert matching, f"no line {prefix + text!r} in:\n" + "\n".join(server.lines)
        positions.append(matching[0])
    assert positions == sorted(positions), server.lines


def test_no_trace_lines_without_trace(start_server: ServerFactory) -> None:
    server = start_server("iterative")
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    # Once the connection counts as completed, everything it would have printed is out.
    wait_for_stats(server, lambda s: s["completed"] == 1)
    for text in TRACE_LINES:
        assert not any(text in line for line in server.lines), server.lines
