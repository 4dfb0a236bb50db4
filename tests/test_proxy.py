"""The impairment proxy (lab.sockets.proxy) on loopback, against threaded upstream servers.

Loopback has no ``SO_ORIGINAL_DST``: every proxy here has a fixed upstream (``destination``, or
``--to`` for the process). Most tests run a :class:`Proxy` in a thread, stopped through a pipe
the way ``main()`` stops it on SIGTERM; the stall test runs the real process and its drain.
No assertion bounds how long anything took from above: a delay is checked as a lower bound,
"nothing arrived" as a short wait that slowness cannot fail.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.sockets.proxy import CHUNK, HOLD_MAX, Direction, Impairment, Link, Proxy

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TIMEOUT = 20.0  # on every socket and wait: only so that a failure cannot hang the run
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
MESSAGE = b"This is a test message from a stupid client lol!\0"  # 49 bytes


# -- byte helpers ----------------------------------------------------------------------------
def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read until ``n`` bytes arrived or the peer closed (then fewer)."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(CHUNK, n - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(CHUNK):
        data += chunk
    return bytes(data)


def first_difference(got: bytes, want: bytes) -> int | None:
    """Where two byte strings first differ (a length counts), None if equal: a readable failure
    for megabytes, where pytest's own diff would not be."""
    if got == want:
        return None
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return i
    return min(len(got), len(want))


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=TIMEOUT)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {TIMEOUT:.0f} s: {what}"
        time.sleep(0.01)


class Sender(threading.Thread):
    """``sendall(data)`` (then a half-close) in a thread, so that the caller reads meanwhile."""

    def __init__(self, sock: socket.socket, data: bytes, half_close: bool = True) -> None:
        super().__init__(daemon=True)
        self.sock, self.data, self.half_close = sock, data, half_close
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.sock.sendall(self.data)
            if self.half_close:
                self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the sender is still blocked"
        if self.error is not None:
            raise self.error


# -- the upstream servers --------------------------------------------------------------------
class Upstream:
    """A threaded server on 127.0.0.1, port 0: each connection is given to ``handler`` in a
    thread of its own. It counts what it accepted and what it received (independent figures)."""

    def __init__(self, handler: Callable[[socket.socket, Upstream], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server((HOST, 0))
        host, port = self.listener.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self.lock = threading.Lock()
        self.accepted = 0
        self.received_bytes = 0  # as it arrives
        self.received: list[bytes] = []  # each connection's whole stream, once it ended
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            with conn:
                self.handler(conn, self)
        except OSError as exc:
            with self.lock:
                self.errors.append(exc)

    def recv(self, conn: socket.socket, n: int = CHUNK) -> bytes:
        data = conn.recv(n)
        with self.lock:
            self.received_bytes += len(data)
        return data

    def ended(self, stream: bytes) -> None:
        with self.lock:
            self.received.append(stream)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self.listener.close()


def echo(conn: socket.socket, server: Upstream) -> None:
    """Echo each read as it comes; close (FIN) after the client's FIN."""
    stream = bytearray()
    while data := server.recv(conn):
        stream += data
        conn.sendall(data)
    server.ended(bytes(stream))


def reply_after_eof(conn: socket.socket, server: Upstream) -> None:
    """Read to the client's FIN, only then answer (all of it, back), then close."""
    stream = bytearray()
    while data := server.recv(conn):
        stream += data
    server.ended(bytes(stream))
    conn.sendall(b"after EOF: " + bytes(stream))


def reset_after_request(conn: socket.socket, server: Upstream) -> None:
    """Read the 49-byte request, then reset the connection instead of answering."""
    server.ended(recv_exactly(conn, len(MESSAGE)))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    conn.close()


@contextlib.contextmanager
def upstream(handler: Callable[[socket.socket, Upstream], None] = echo) -> Iterator[Upstream]:
    server = Upstream(handler)
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, f"the upstream server failed: {server.errors}"


# -- the proxy, in-process -------------------------------------------------------------------
class Running:
    """``proxy.run(stop_fd=…)`` in a thread; :meth:`stop` writes to the pipe (as main()'s
    SIGTERM handler does) and waits; :meth:`start` goes on with a pipe of its own."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.thread: threading.Thread | None = None
        self.pipe = (-1, -1)
        self.error: BaseException | None = None
        self.start()

    def start(self) -> None:
        self.pipe = os.pipe()
        self.thread = threading.Thread(target=self._run, args=(self.pipe[0],), daemon=True)
        self.thread.start()

    def _run(self, stop_fd: int) -> None:
        try:
            self.proxy.run(stop_fd=stop_fd)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        if self.thread is None:
            return
        os.write(self.pipe[1], b"x")
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the proxy did not stop"
        self.thread = None
        for fd in self.pipe:
            os.close(fd)  # closing the read end takes it out of the proxy's epoll set too
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def proxying(
    destination: tuple[str, int], impairment: Impairment | None = None, proxy: Proxy | None = None
) -> Iterator[Running]:
    if proxy is None:
        proxy = Proxy(0, impairment or Impairment())
    proxy.destination = destination
    running = Running(proxy)
    try:
        yield running
    finally:
        running.stop()
        proxy.close()


def the_link(proxy: Proxy) -> Link:
    """The proxy's only connection, once it has accepted it."""
    wait_until(lambda: bool(proxy.by_fd), "the proxy accepted the connection")
    links = {id(link): link for link in dict(proxy.by_fd).values()}
    assert len(links) == 1
    return next(iter(links.values()))


# -- the tests -------------------------------------------------------------------------------
def test_bytes_pass_unchanged_both_ways() -> None:
    payload = random.Random(1).randbytes(6 << 20)
    with upstream(echo) as server, proxying(server.address) as running:
        with connect(running.proxy.port) as client:
            sender = Sender(client, payload)  # then a half-close: the echo ends with a FIN
            echoed = read_to_eof(client)
            sender.finish()
        wait_until(lambda: len(server.received) == 1, "the upstream saw the client's FIN")
    assert first_difference(server.received[0], payload) is None  # client → server intact
    assert first_difference(echoed, payload) is None  # and server → client


class WatchedJitter(Impairment):
    """Delay and jitter as usual, remembering each due time drawn, per direction."""

    def __init__(self, delay_ms: float, jitter_ms: float) -> None:
        super().__init__(delay_ms, jitter_ms)
        self.direction = "up"
        self.draws: dict[str, list[float]] = {"up": [], "down": []}

    def due(self, now: float) -> float:
        due = super().due(now)
        self.draws[self.direction].append(due)
        return due


class TellingProxy(Proxy):
    """Tells its WatchedJitter which direction each read (hence each draw) is for."""

    def __init__(self, watch: WatchedJitter) -> None:
        super().__init__(0, watch)
        self.watch = watch

    def _read(self, link: Link, direction: Direction) -> None:
        self.watch.direction = "up" if direction is link.up else "down"
        super()._read(link, direction)


def overtaking(draws: list[float]) -> int:
    """How many chunks jitter drew due before a chunk read ahead of them: each one a chunk a
    scheduler that went by due time alone would have written out of order."""
    count, latest = 0, float("-inf")
    for due in draws:
        if due < latest:
            count += 1
        latest = max(latest, due)
    return count


def test_jitter_never_reorders_the_byte_stream() -> None:
    watch = WatchedJitter(delay_ms=20, jitter_ms=20)
    records = [b"record %06d\n" % i for i in range(20_000)]
    with (
        upstream(echo) as server,
        proxying(server.address, proxy=TellingProxy(watch)) as running,
        connect(running.proxy.port) as client,
    ):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        echoed: list[bytes] = []
        reader = threading.Thread(target=lambda: echoed.append(read_to_eof(client)))
        reader.start()
        sent = 0
        # At least 2,000 records one write each, and on until jitter has drawn overtaking due
        # times in both directions (the test would prove nothing without them).
        while sent < 2_000 or not all(overtaking(list(d)) for d in watch.draws.values()):
            assert sent < len(records), "jitter never drew an overtaking due time"
            client.sendall(records[sent])
            sent += 1
            if sent % 4 == 0:
                time.sleep(0.001)  # spread the writes over many reads of the proxy
        client.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT)
        assert not reader.is_alive()
    stream = b"".join(records[:sent])
    assert first_difference(server.received[0], stream) is None  # in order, client → server
    assert first_difference(echoed[0], stream) is None  # and back
    assert overtaking(watch.draws["up"]) > 0 and overtaking(watch.draws["down"]) > 0


def test_the_delay_is_applied_each_way() -> None:
    stamps: dict[str, float] = {}

    def timed_echo(conn: socket.socket, server: Upstream) -> None:
        request = recv_exactly(conn, len(MESSAGE))
        stamps["request in"] = time.monotonic()
        server.ended(request)
        stamps["reply out"] = time.monotonic()
        conn.sendall(request)
        read_to_eof(conn)

    with (
        upstream(timed_echo) as server,
        proxying(server.address, Impairment(delay_ms=150)) as running,
        connect(running.proxy.port) as client,
    ):
        start = time.monotonic()
        client.sendall(MESSAGE)
        reply = recv_exactly(client, len(MESSAGE))
        end = time.monotonic()
    assert reply == MESSAGE
    assert stamps["request in"] - start >= 0.150  # client → server
    assert end - stamps["reply out"] >= 0.150  # server → client
    assert end - start >= 2 * 0.150


def test_a_half_close_travels_and_the_answer_after_it_comes_back() -> None:
    request = random.Random(4).randbytes(100_000)
    with upstream(reply_after_eof) as server, proxying(server.address) as running:
        with connect(running.proxy.port) as client:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)  # the server answers only once it sees this FIN
            answer = read_to_eof(client)  # all of it, then b"": the server's FIN came back
            assert client.recv(1) == b""
        assert server.received == [request]
        assert first_difference(answer, b"after EOF: " + request) is None
        # Both FINs forwarded: the proxy has closed its two sockets (no reset needed).
        wait_until(lambda: not running.proxy.by_fd, "the proxy closed the finished link")
        assert running.proxy.links == 1


def test_a_reset_by_the_server_resets_the_client() -> None:
    with (
        upstream(reset_after_request) as server,
        proxying(server.address) as running,
        connect(running.proxy.port) as client,
    ):
        client.sendall(MESSAGE)
        with pytest.raises(ConnectionResetError):
            client.recv(CHUNK)  # not b"" (a FIN), not a timeout
        assert server.received == [MESSAGE]  # the request got there: the reset came after
        wait_until(lambda: not running.proxy.by_fd, "the proxy closed the reset link")


def test_an_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as nobody:  # bound, never listening: a connect() to it is refused
        nobody.bind((HOST, 0))
        host, port = nobody.getsockname()[:2]
        with proxying((host, port)) as running:
            # The reset may come before a blocking connect() has returned: then connect()
            # reports it (SO_ERROR), else recv() does; either way not a hang to the timeout.
            with pytest.raises(ConnectionResetError), connect(running.proxy.port) as client:
                client.recv(CHUNK)
            assert running.proxy.links == 1
            wait_until(lambda: not running.proxy.by_fd, "the proxy dropped the failed link")


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, "the proxy printed nothing"
    return proc.stdout.readline()


def test_a_stall_holds_the_bytes_and_the_drain_delivers_them_intact() -> None:
    payload = random.Random(7).randbytes(200_000)
    with upstream(echo) as server:
        command = [sys.executable, "-m", "lab.sockets.proxy", "--port", "0", "--stall"]
        command += ["--to", f"{server.address[0]}:{server.address[1]}"]
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
            try:
                ready = re.fullmatch(r"proxy ready port=(\d+)\n", read_line(proc))
                assert ready, "no ready line"
                with connect(int(ready[1])) as client:
                    client.sendall(payload)
                    readable, _, _ = select.select([client], [], [], 0.5)
                    assert not readable, "bytes came back through a stalled proxy"
                    assert server.received_bytes == 0, "bytes went upstream while stalled"
                    proc.send_signal(signal.SIGTERM)  # the drain lifts the stall
                    echoed = recv_exactly(client, len(payload))
                    client.shutdown(socket.SHUT_WR)
                    assert client.recv(1) == b""  # the FIN went through and came back
                out, _ = proc.communicate(timeout=TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert first_difference(echoed, payload) is None
    assert server.received == [payload]
    assert proc.returncode == 0
    assert out.splitlines() == ["proxy done links=1"]


def test_a_client_that_never_reads_backs_up_into_socket_buffers_not_the_proxy() -> None:
    # Loopback's autotuned socket buffers took ~18 MiB before the sender blocked (measured):
    # 8 MiB would never make the proxy hold back, so the client offers up to 64 MiB.
    payload = memoryview(random.Random(8).randbytes(64 << 20))
    bound = HOLD_MAX + CHUNK  # a direction reads (up to CHUNK) only while it holds < HOLD_MAX
    with (
        upstream(echo) as server,
        proxying(server.address) as running,
        connect(running.proxy.port) as client,
    ):
        client.setblocking(False)
        link = the_link(running.proxy)
        sent = 0
        most = {"up": 0, "down": 0}
        deadline = time.monotonic() + TIMEOUT
        while True:
            _, writable, _ = select.select([], [client], [], 0.2)
            if writable:
                sent += client.send(payload[sent : sent + CHUNK])
            elif not (link.up.reading() or link.down.reading()):
                # The sender is blocked and the proxy reads neither side: each direction
                # holds HOLD_MAX or more (the only way out of this loop but a failure).
                break
            most["up"] = max(most["up"], link.up.held)
            most["down"] = max(most["down"], link.down.held)
            assert sent < len(payload), "the whole payload went in: nothing backed up"
            assert time.monotonic() < deadline, "the sender never blocked"
        running.stop()  # the proxy's state holds still now
        assert link.up.held <= bound and link.down.held <= bound
        assert most["up"] <= bound and most["down"] <= bound  # nor at any time we looked
        running.start()  # and holding back lost nothing
        client.settimeout(TIMEOUT)
        client.shutdown(socket.SHUT_WR)
        echoed = read_to_eof(client)
    assert server.received_bytes == sent
    assert first_difference(echoed, bytes(payload[:sent])) is None


def test_concurrent_connections_each_get_their_own_echo() -> None:
    count = 50
    rng = random.Random(9)
    messages = [b"connection %02d: " % i + rng.randbytes(2_000) for i in range(count)]
    with (
        upstream(echo) as server,
        proxying(server.address, Impairment(delay_ms=20, jitter_ms=10)) as running,
        contextlib.ExitStack() as stack,
    ):
        # All connected before any is used: 50 links open in the proxy at once.
        clients = [stack.enter_context(connect(running.proxy.port)) for _ in range(count)]
        for client, message in zip(clients, messages, strict=True):
            client.sendall(message)
        echoes = [recv_exactly(c, len(m)) for c, m in zip(clients, messages, strict=True)]
        for client in clients:
            client.shutdown(socket.SHUT_WR)
        assert all(client.recv(1) == b"" for client in clients)
        wait_until(lambda: len(server.received) == count, "every upstream connection ended")
        wait_until(lambda: not running.proxy.by_fd, "the proxy closed every link")
        assert running.proxy.links == count == server.accepted
    assert echoes == messages
    assert sorted(server.received) == sorted(messages)  # each server connection got one whole


REPLY = b"reply sent before the reset"


def reply_then_reset(conn: socket.socket, server: Upstream) -> None:
    server.ended(recv_exactly(conn, len(MESSAGE)))
    conn.sendall(REPLY)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    conn.close()


def test_bytes_the_server_sent_before_resetting_still_reach_the_client() -> None:
    # Once: the reset was passed on at once and the delayed reply queued before it was lost.
    with (
        upstream(reply_then_reset) as server,
        proxying(server.address, Impairment(delay_ms=50)) as running,
        connect(running.proxy.port) as client,
    ):
        client.sendall(MESSAGE)
        assert recv_exactly(client, len(REPLY)) == REPLY  # what came first comes first …
        with pytest.raises(ConnectionResetError):  # … then the reset, as the server sent it
            while client.recv(100):
                pass


class CountingPoller:
    def __init__(self, inner: select.epoll) -> None:
        self.inner, self.polls = inner, 0

    def poll(self, timeout: float = -1.0) -> list[tuple[int, int]]:
        self.polls += 1
        return self.inner.poll(timeout)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_the_drain_waits_in_epoll_instead_of_spinning_on_the_stop_pipe() -> None:
    # Once: the stop pipe stayed registered, unread, and every turn of the drain woke at once.
    with upstream() as server:
        proxy = Proxy(0, Impairment())
        proxy.destination = server.address
        stop_r, stop_w = os.pipe()
        thread = threading.Thread(target=proxy.run, kwargs={"stop_fd": stop_r})
        thread.start()
        with connect(proxy.port):  # an idle link for the drain to carry
            the_link(proxy)
            os.write(stop_w, b"x")  # what main()'s SIGTERM handler does
            thread.join(20)
            counting = CountingPoller(proxy.poller)
            proxy.poller = counting  # type: ignore[assignment]
            proxy.drain(1.0)  # carries the idle link 1 s, in run() slices of 0.1 s
        proxy.close()
        os.close(stop_r)
        os.close(stop_w)
    assert counting.polls < 100, counting.polls  # ~10 turns; spinning made it ~400,000
