"""What is specific to the thread designs (``thread``, ``prethread-accept``, ``thread-pool``):
supervision of a thread that raises, the caps that make clients wait in the backlog, the accept
mutex, and signals kept for the main thread.

Servers are real processes on loopback (``start_server``); the supervisor is also driven in
process with a fake target. Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from itertools import count
from pathlib import Path

import pytest
from harness import (
    ALL_DESIGNS,
    ORIGINAL_MESSAGE,
    RunningServer,
    ServerFactory,
    echo_once,
    recv_exactly,
    stats_when,
    wait_until,
)

from lab.sockets.config import ServerConfig
from lab.sockets.designs import DESIGNS
from lab.sockets.log import Log
from lab.sockets.stats import WORKER_DIED
from lab.sockets.threads import ThreadServer, ThreadServing

MESSAGE = ORIGINAL_MESSAGE
GUARD = 20.0  # a bound against a hang only
# Derived from the classes, never listed by hand: every design whose connections are served by
# threads of the one server process.
THREAD_DESIGNS = [d for d in ALL_DESIGNS if issubclass(DESIGNS[d], ThreadServer)]
THREAD_POOLS = [d for d in THREAD_DESIGNS if DESIGNS[d].pool_of == "threads"]


def args_for(design: str) -> list[str]:
    return ["--workers", "2"] if design in THREAD_POOLS else []


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GUARD)


def held(port: int) -> socket.socket:
    """A connection that got one echo and stays open (it occupies a thread)."""
    sock = connect(port)
    sock.sendall(MESSAGE)
    assert recv_exactly(sock, len(MESSAGE)) == MESSAGE
    return sock


def waiting(port: int) -> socket.socket:
    """A connection that sent a whole message and its FIN, and waits for the echo."""
    sock = connect(port)
    sock.sendall(MESSAGE)
    sock.shutdown(socket.SHUT_WR)
    return sock


def recv_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def nothing_to_read(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
        sock.settimeout(GUARD)
    return False


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on ``port`` (``rx_queue`` of a
    LISTEN socket in /proc/net/tcp is its accept queue's length)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return int(queues.split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


def accepted(server: RunningServer) -> int:
    value = server.stats()["accepted"]
    assert isinstance(value, int)
    return value


# --- supervision: a thread that raises is reported and replaced ---------------------------------


class FakePool(ThreadServer):
    """The supervisor with a fake target: the first thread takes a connection and raises, every
    later one waits until told to go."""

    name = "fake-pool"

    def __init__(self, config: ServerConfig, log: Log) -> None:
        super().__init__(config, log)
        self.starts = count(1)
        self.started = 0
        self.release = threading.Event()
        self.peer, self.mine = socket.socketpair()

    def thread_main(self, state: ThreadServing) -> None:
        self.started = number = next(self.starts)  # next() is atomic: threads start together
        if number == 1:
            state.held = os.dup(self.mine.fileno())
            state.slot.received()
            raise ValueError("boom")
        self.release.wait(GUARD)


def test_a_thread_that_raises_is_reported_once_closed_for_and_replaced() -> None:
    out = io.StringIO()
    server = FakePool(ServerConfig(workers=2), Log(False, out))
    try:
        assert server.maintain_pool() == 2
        assert wait_until(lambda: len(server.ended) == 1, timeout=GUARD)
        crashed = server.ended[0]
        crashed_tid = crashed.tid
        server.reap_threads()

        notices = [line for line in out.getvalue().splitlines() if " lab: " in line]
        assert len(notices) == 1, notices
        assert f"thread {crashed_tid} raised ValueError: boom" in notices[0], notices
        assert "test_threads.py:" in notices[0] and "started a replacement" in notices[0]
        assert len(server.pool) == 2 and crashed not in server.pool  # the replacement runs
        assert wait_until(lambda: server.started == 3, timeout=GUARD)
        # The descriptor it owned was closed for it: our end sees EOF; the connection it held
        # counts as worker_died, once.
        server.mine.close()
        server.peer.settimeout(GUARD)
        assert server.peer.recv(1) == b""
        stats = server.current_stats()
        assert dict(stats.failed) == {WORKER_DIED: 1}
    finally:
        server.release.set()
        assert wait_until(lambda: len(server.ended) == 2, timeout=GUARD)
        server.peer.close()
        server.wake.close()


def test_threads_that_keep_raising_are_replaced_after_a_delay() -> None:
    class AlwaysRaises(ThreadServer):
        name = "always-raises"

        def thread_main(self, state: ThreadServing) -> None:
            raise RuntimeError("broken")

    out = io.StringIO()
    server = AlwaysRaises(ServerConfig(workers=1), Log(False, out))
    server.maintain_pool()

    def reaped_until_delayed() -> bool:
        server.reap_threads()  # each replacement raises at once, maybe within this call
        return server.respawn_at is not None

    assert wait_until(reaped_until_delayed, timeout=GUARD)
    assert not server.pool  # no tight loop: the next one waits
    notices = out.getvalue().splitlines()
    assert len(notices) == AlwaysRaises.CRASH_LIMIT, notices  # one line per thread that raised
    assert all("raised RuntimeError: broken" in line for line in notices), notices
    assert "threads keep dying: replacing in 1 s" in notices[-1], notices
    server.wake.close()


# --- the caps: extra clients wait in the backlog ------------------------------------------------


def test_max_threads_makes_the_extra_client_wait_in_the_backlog_until_one_ends(
    start_server: ServerFactory,
) -> None:
    server = start_server("thread", "--max-threads", "1")
    busy = held(server.port)
    with busy, waiting(server.port) as extra:
        # The extra client's handshake is done by the kernel; nobody accepts it.
        assert wait_until(lambda: accept_queue(server.port) == 1, timeout=GUARD)
        assert accepted(server) == 1
        assert nothing_to_read(extra)
        busy.shutdown(socket.SHUT_WR)
        assert recv_to_eof(busy) == b""
        assert recv_to_eof(extra) == MESSAGE  # served once the first thread ended
    stats = stats_when(server, lambda s: s["completed"] == 2)
    assert (stats["accepted"], stats["completed"], stats["failed"]) == (2, 2, {}), stats
    assert accept_queue(server.port) == 0


def test_thread_pool_queue_holds_its_bound_and_the_rest_wait_in_the_backlog(
    start_server: ServerFactory,
) -> None:
    server = start_server("thread-pool", "--workers", "1")
    ready = next(line for line in server.lines if line.startswith("ready"))
    bound = int(ready.split("queue=")[1].split()[0])
    busy = held(server.port)
    extras = [waiting(server.port) for _ in range(bound + 2)]
    try:
        # One connection in service, `bound` accepted into the queue, two in the backlog.
        assert wait_until(
            lambda: accepted(server) == 1 + bound and accept_queue(server.port) == 2,
            timeout=GUARD,
        ), (accepted(server), accept_queue(server.port))
        assert accepted(server) == 1 + bound
        assert all(nothing_to_read(sock) for sock in extras)
        busy.shutdown(socket.SHUT_WR)
        assert recv_to_eof(busy) == b""
        assert [recv_to_eof(sock) for sock in extras] == [MESSAGE] * len(extras)
    finally:
        busy.close()
        for sock in extras:
            sock.close()
    stats = stats_when(server, lambda s: s["completed"] == 1 + len(extras))
    assert stats["completed"] == 1 + len(extras) and stats["failed"] == {}, stats


# --- the accept mutex ---------------------------------------------------------------------------


def test_accept_mutex_lets_threads_serve_at_once_and_stop_cleanly(
    start_server: ServerFactory,
) -> None:
    server = start_server("prethread-accept", "--workers", "2", "--accept-lock", "mutex")
    assert "accept_lock=mutex" in next(line for line in server.lines if line.startswith("ready"))
    # The lock is held around accept() only: two connections are served at the same time.
    with held(server.port) as first, held(server.port) as second:
        first.sendall(b"one\0")
        second.sendall(b"two\0")
        assert recv_exactly(second, 4) == b"two\0"
        assert recv_exactly(first, 4) == b"one\0"
        per_worker = server.stats()["per_worker"]
        assert isinstance(per_worker, dict)
        assert sorted(per_worker.values()) == [0, 0]  # both threads busy: none ended yet
    assert wait_until(lambda: server.stats()["completed"] == 2, timeout=GUARD)
    for _ in range(4):
        assert echo_once(server.port) == MESSAGE
    # The thread blocked in accept() holds the lock, the other waits for it: both leave.
    assert server.stop(timeout=GUARD) == 0
    stats = server.final_stats()
    assert (stats["completed"], stats["failed"], stats["in_flight"]) == (6, {}, 0), stats
    per_worker = stats["per_worker"]
    assert isinstance(per_worker, dict) and sum(per_worker.values()) == 6
    # Each thread served one of the two held at once, at least.
    assert len(per_worker) == 2 and min(per_worker.values()) >= 1, per_worker


def test_accept_lock_between_processes_is_refused_by_prethread_accept() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "lab.sockets", "--design", "prethread-accept"),
            *("--host", "127.0.0.1", "--port", "0", "--accept-lock", "flock"),
        ],
        capture_output=True,
        text=True,
        timeout=GUARD,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lab serve: error:"), result.stderr
    assert "--accept-lock flock" in lines[0] and "none or mutex" in lines[0], lines
    assert result.stdout == ""


# --- signals stay with the main thread ----------------------------------------------------------


def blocked_signals(pid: int, tid: int) -> int:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


@pytest.mark.parametrize("design", THREAD_DESIGNS)
def test_serving_threads_block_every_signal_and_the_main_thread_none(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, *args_for(design))
    with held(server.port):
        tids = [int(t) for t in os.listdir(f"/proc/{server.pid}/task")]
        others = [t for t in tids if t != server.pid]
        assert others  # the connection's thread, or the pool's
        assert blocked_signals(server.pid, server.pid) & (1 << (signal.SIGTERM - 1)) == 0
        for tid in others:
            mask = blocked_signals(server.pid, tid)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGALRM):
                assert mask & (1 << (signum - 1)), (tid, hex(mask))


# --- stopping: the grace period and a second signal ---------------------------------------------


@pytest.mark.parametrize("design", THREAD_DESIGNS)
def test_a_second_sigterm_shuts_down_what_threads_hold_at_once(
    design: str, start_server: ServerFactory
) -> None:
    server = start_server(design, "--grace", "60", *args_for(design))
    with held(server.port) as busy:
        os.kill(server.pid, signal.SIGTERM)
        time.sleep(0.3)  # the first one has been handled (a pause, not a measurement)
        busy.sendall(b"still here")
        assert recv_exactly(busy, 10) == b"still here"  # served on through the grace period
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(GUARD) == 0  # far inside the 60 s grace period
        assert recv_to_eof(busy) == b""  # shut down by the server
    stats = server.final_stats()
    assert stats["failed"] == {"stopped": 1} and stats["in_flight"] == 0, stats
    assert any("grace period over: shutting down 1 connection(s)" in ln for ln in server.lines)
