"""A server's life as seen from outside: stopping, draining, dying workers, a pool that grows
and shrinks, descriptor exhaustion, statistics.

Every server is a real process (``python -m lab.sockets``) in its own session on loopback,
started by the ``start_server`` fixture, which kills its whole process group at teardown. Waits
are bounded polls (``wait_until``), never timing assertions; the one number compared with a
bound is CPU time (test of descriptor exhaustion), which a slow machine does not inflate.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import (
    ALL_DESIGNS,
    ANY_IDLE_WORKER,
    ORIGINAL_MESSAGE,
    POOL_DESIGNS,
    PROCESS_POOLS,
    SERIAL_DESIGNS,
    RunningServer,
    ServerFactory,
    closing_all,
    cpu_seconds,
    echo_once,
    fd_count,
    recv_exactly,
    wait_until,
    zombies_of,
)

from lab.sockets.designs import DESIGNS
from lab.sockets.supervise import ChildProcesses

MESSAGE = ORIGINAL_MESSAGE  # 49 bytes, NUL included
HALF = len(MESSAGE) // 2
GUARD = 20.0  # a bound on any single blocking client call: guards against a hang only
STATS_LINE = '{"event": "stats"'

# A fixed pool of two. The sendmsg pool grows when it believes no worker is idle, and that
# belief can be stale (worker messages not yet read), so tests about something else than the
# pool's size pin it with --max-workers.
TWO_WORKERS = ["--workers", "2", "--max-workers", "2"]

# Options that make later connections queue while one is in flight, as each design declares.
ONE_AT_A_TIME = SERIAL_DESIGNS


# --- helpers ------------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GUARD)


def recv_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def in_flight(port: int) -> socket.socket:
    """A connection that is being served: half a message sent and its echo received."""
    sock = connect(port)
    sock.sendall(MESSAGE[:HALF])
    assert recv_exactly(sock, HALF) == MESSAGE[:HALF]
    return sock


def finish(sock: socket.socket) -> bytes:
    """Complete an :func:`in_flight` connection; returns the whole echo."""
    sock.sendall(MESSAGE[HALF:])
    sock.shutdown(socket.SHUT_WR)
    return MESSAGE[:HALF] + recv_to_eof(sock)


def held(port: int) -> socket.socket:
    """A connection that sent a whole message, got its echo, and stays open."""
    sock = connect(port)
    sock.sendall(MESSAGE)
    assert recv_exactly(sock, len(MESSAGE)) == MESSAGE
    return sock


def closed_by_server(sock: socket.socket) -> bool | None:
    """True if the server closed (EOF) or reset the connection, None if it is still open with
    nothing to read; raises if data arrived (a shed connection must never be answered)."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)
    assert data == b"", f"a shed connection received data: {data!r}"
    return True


def closed_by_server_blocking(sock: socket.socket) -> bool:
    """Wait (bounded by the socket timeout) until the server closes or resets the connection."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def poll_stats(
    server: RunningServer,
    predicate: Callable[[dict[str, object]], bool],
    timeout: float = 10.0,
) -> dict[str, object]:
    """Ask for statistics until ``predicate`` holds (bounded); returns the last ones."""
    last: dict[str, object] = {}

    def check() -> bool:
        nonlocal last
        last = server.stats()
        return predicate(last)

    assert wait_until(check, timeout, interval=0.2), f"statistics never matched: {last}"
    return last


def stats_lines(server: RunningServer) -> list[str]:
    return [line for line in server.lines if line.startswith(STATS_LINE)]


def assert_no_traceback(server: RunningServer) -> None:
    assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines[-40:])


def workers_of(server: RunningServer) -> list[int]:
    return server.descendants()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@contextlib.contextmanager
def tracking(server: RunningServer) -> Iterator[set[int]]:
    """Every process seen below the server while the block runs (sampled). Spawned workers
    run in their own process group, so an empty server group alone does not prove them gone."""
    seen: set[int] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.update(server.descendants())
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join(GUARD)


def leftovers(server: RunningServer, seen: set[int]) -> list[int]:
    """Processes still alive from the server's group or from those seen below it."""
    return sorted(set(server.group_members()) | {pid for pid in seen if alive(pid)})


# --- 1. stopping an idle server -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_idle_server_stops_on_signal_with_exit_0_and_final_stats(
    start_server: ServerFactory, design: str, signum: int
) -> None:
    args = TWO_WORKERS if design in POOL_DESIGNS else []
    server = start_server(design, *args)
    assert echo_once(server.port) == MESSAGE

    assert server.stop(signum, timeout=10) == 0
    stats = server.final_stats()
    assert len(stats_lines(server)) == 1
    assert stats["design"] == design
    assert stats["accepted"] == 1
    assert stats["completed"] == 1
    assert stats["in_flight"] == 0
    assert server.group_members() == []
    assert_no_traceback(server)


# --- 2. SIGTERM drains: in flight and queued connections are all served --------------------------


@pytest.mark.parametrize("design", list(SERIAL_DESIGNS))
def test_sigterm_serves_in_flight_and_queued_connections(
    start_server: ServerFactory, design: str
) -> None:
    server = start_server(design, *ONE_AT_A_TIME[design])
    with tracking(server) as seen:
        echoes = serve_in_flight_and_queued_through_sigterm(server)
        assert server.wait(15) == 0
    assert [echoes.get(i) for i in range(4)] == [MESSAGE] * 4
    stats = server.final_stats()
    assert stats["accepted"] == 4, stats
    assert stats["completed"] == 4, stats
    assert stats["failed"] == {}, stats
    assert leftovers(server, seen) == []


def serve_in_flight_and_queued_through_sigterm(server: RunningServer) -> dict[int, bytes]:
    """One connection in flight and three queued behind it; SIGTERM; then the first one
    finishes. Returns every echo by connection index (0 is the one in flight)."""
    first = in_flight(server.port)
    queued = []
    for _ in range(3):
        sock = connect(server.port)
        sock.sendall(MESSAGE)
        sock.shutdown(socket.SHUT_WR)
        queued.append(sock)
    with closing_all([first, *queued]):
        echoes: dict[int, bytes] = {}

        def read(index: int, sock: socket.socket) -> None:
            echoes[index] = recv_to_eof(sock)

        readers = [
            threading.Thread(target=read, args=(i, s), daemon=True) for i, s in enumerate(queued)
        ]
        for reader in readers:
            reader.start()
        os.kill(server.pid, signal.SIGTERM)
        time.sleep(0.3)  # let the server act on it first (ordering only; no assertion on time)
        assert server.proc.poll() is None, "the server left with a connection in flight"
        first_echo = finish(first)
        for reader in readers:
            reader.join(GUARD)
    return {0: first_echo, **{i + 1: echo for i, echo in echoes.items()}}


# --- 3. the grace period ends what never finishes ----------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_grace_period_ends_a_connection_that_never_finishes(
    start_server: ServerFactory, design: str
) -> None:
    args = ["--workers", "1"] if design in POOL_DESIGNS else []
    server = start_server(design, "--grace", "1", *args)
    with tracking(server) as seen, in_flight(server.port) as sock:
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(15) == 0
        sock.settimeout(GUARD)
        assert closed_by_server_blocking(sock)
    stats = server.final_stats()
    assert stats["failed"] == {"stopped": 1}, stats
    assert stats["completed"] == 0, stats
    assert leftovers(server, seen) == []


# --- 4. a worker killed by SIGKILL is replaced --------------------------------------------------


@pytest.mark.parametrize("design", PROCESS_POOLS)
def test_killed_worker_is_reported_and_replaced(start_server: ServerFactory, design: str) -> None:
    server = start_server(design, *TWO_WORKERS)
    for _ in range(6):
        assert echo_once(server.port) == MESSAGE
    before = poll_stats(server, lambda s: s["completed"] == 6)
    per_worker: dict[str, int] = before["per_worker"]  # type: ignore[assignment]
    workers = workers_of(server)
    assert len(workers) == 2
    victim = next(int(pid) for pid, count in per_worker.items() if count > 0)
    assert victim in workers

    start = len(server.lines)
    os.kill(victim, signal.SIGKILL)
    server.wait_for_line(rf"worker {victim} killed by SIGKILL", start=start)
    assert wait_until(lambda: victim not in workers_of(server) and len(workers_of(server)) == 2), (
        workers_of(server)
    )
    poll_stats(server, lambda s: s["workers_alive"] == 2)
    replacement = set(workers_of(server)) - set(workers)
    assert len(replacement) == 1

    for _ in range(4):
        assert echo_once(server.port) == MESSAGE
    after = poll_stats(server, lambda s: s["completed"] == 10)
    assert after["per_worker"][str(victim)] == per_worker[str(victim)]  # type: ignore[index]
    assert after["failed"] == {}
    assert server.proc.poll() is None


# --- 5. SIGKILL of the server leaves no process behind ------------------------------------------


@pytest.mark.parametrize("design", [*PROCESS_POOLS, "fork"])
def test_sigkilled_server_leaves_no_worker_or_child(
    start_server: ServerFactory, design: str
) -> None:
    # A long grace and idle timeout: a process that outlives its server "gracefully" would
    # linger far beyond the bound below, so only a prompt exit passes.
    args = TWO_WORKERS if design in POOL_DESIGNS else []
    server = start_server(design, "--grace", "30", "--idle-timeout", "30", *args)
    with in_flight(server.port):
        assert len(server.group_members()) >= 2
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: not server.group_members(), timeout=10), (
            f"still alive after the server was SIGKILLed: {server.group_members()}"
        )
    server.wait(10)
    assert_no_traceback(server)


# --- 6. the sendmsg pool grows under load and shrinks back --------------------------------------


def test_sendmsg_pool_grows_to_max_workers_and_shrinks_back(start_server: ServerFactory) -> None:
    server = start_server("sendmsg", "--workers", "1", "--max-workers", "4", "--worker-idle", "1")
    assert len(workers_of(server)) == 1
    with closing_all([held(server.port) for _ in range(4)]):
        stats = poll_stats(server, lambda s: s["workers_alive"] == 4)
        assert stats["in_flight"] == 4
        assert len(workers_of(server)) == 4
    stats = poll_stats(server, lambda s: s["workers_alive"] == 1, timeout=15)
    assert wait_until(lambda: len(workers_of(server)) == 1), workers_of(server)
    assert stats["completed"] == 4
    assert len(stats["per_worker"]) == 4  # type: ignore[arg-type]  # one connection each
    assert echo_once(server.port) == MESSAGE


# --- 7. sendmsg at --max-workers with a full queue sheds ----------------------------------------


def test_sendmsg_at_max_workers_with_full_queue_sheds(start_server: ServerFactory) -> None:
    server = start_server("sendmsg", "--workers", "1", "--max-workers", "1", "--backlog", "1024")
    busy = in_flight(server.port)
    clients: list[socket.socket] = []
    with closing_all([busy]), closing_all(clients):
        for _ in range(600):
            sock = connect(server.port)
            clients.append(sock)
            with contextlib.suppress(OSError):  # a shed one may be reset already
                sock.sendall(MESSAGE)
                sock.shutdown(socket.SHUT_WR)
        stats = poll_stats(server, lambda s: s["accepted"] == 601)
        shed = stats["shed"]
        assert isinstance(shed, int)
        assert 0 < shed < 600, stats
        # Every shed connection was closed by the server; every other one waits in the queue.
        closed: set[int] = set()

        def all_shed_seen() -> bool:
            closed.update(
                i for i, s in enumerate(clients) if i not in closed and closed_by_server(s)
            )
            return len(closed) >= shed

        assert wait_until(all_shed_seen), f"{len(closed)} of {shed} shed clients saw a close"
        assert len(closed) == shed
        assert server.proc.poll() is None

        assert finish(busy) == MESSAGE
        busy.close()
        for i, sock in enumerate(clients):
            if i not in closed:
                assert recv_to_eof(sock) == MESSAGE
        assert echo_once(server.port) == MESSAGE
    stats = poll_stats(server, lambda s: s["completed"] == 602 - shed)
    assert stats["shed"] == shed
    assert server.proc.poll() is None


# --- 8. spawn with an inetd-style worker program ------------------------------------------------


def test_spawn_worker_cmd_cat_echoes_text_and_binary(start_server: ServerFactory) -> None:
    server = start_server("spawn", "--worker-cmd", "cat")
    binary = bytes(range(256)) * 64
    assert echo_once(server.port) == MESSAGE
    assert echo_once(server.port, binary) == binary
    stats = poll_stats(server, lambda s: s["completed"] == 2)
    assert stats["failed"] == {}
    assert wait_until(lambda: not zombies_of(server.pid))


def test_spawn_worker_cmd_not_on_path_is_a_one_line_usage_error() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "lab.sockets", "--design", "spawn"),
            *("--host", "127.0.0.1", "--port", "0"),
            *("--worker-cmd", "no-such-program-lab-test --flag"),
        ],
        capture_output=True,
        text=True,
        timeout=GUARD,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lab serve: error:")
    assert "no-such-program-lab-test" in lines[0] and "PATH" in lines[0]
    assert "ready" not in result.stdout


# --- 9. no descriptor or zombie leaks after many connections -------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_descriptors_and_zombies_return_to_baseline_after_1000_connections(
    start_server: ServerFactory, design: str
) -> None:
    args = ["--workers", "2", "--worker-idle", "1"] if design in POOL_DESIGNS else []
    server = start_server(design, *args)
    # A worker sets itself up after "ready" is printed: take the baseline once the descriptor
    # counts have stopped changing.
    baseline = settled_fd_counts([server.pid, *workers_of(server)])

    def client(count: int) -> int:
        return sum(echo_once(server.port) == MESSAGE for _ in range(count))

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(client, [250] * 4)) == 1000

    def at_baseline() -> bool:
        return all(fd_count(pid) == n for pid, n in baseline.items()) and not zombies_of(server.pid)

    assert wait_until(at_baseline, timeout=20), (
        {pid: (n, fd_count(pid)) for pid, n in baseline.items()},
        zombies_of(server.pid),
    )
    # Settled: every accepted connection is accounted for (once, we check next).
    stats = poll_stats(server, lambda s: s["in_flight"] <= 0)  # type: ignore[operator]
    assert stats["accepted"] == 1000, stats
    assert (stats["completed"], stats["failed"], stats["in_flight"]) == (1000, {}, 0), stats
    assert not [line for line in server.lines if "while serving" in line]


# --- 10. descriptor exhaustion: back off, shed, log once, recover -------------------------------


def settled_fd_counts(pids: list[int]) -> dict[int, int]:
    """Each process's descriptor count, once two looks 0.2 s apart agree."""
    previous: dict[int, int] = {}
    for _ in range(50):
        now = {pid: fd_count(pid) for pid in pids}
        if now == previous:
            return now
        previous = now
        time.sleep(0.2)
    raise AssertionError(f"descriptor counts never settled: {previous}")


def lowest_free(numbers: list[int]) -> int:
    return min(set(range(len(numbers) + 1)) - set(numbers))


def fd_numbers(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


# The pools whose workers call accept() (as each design declares): there the limit is set on
# the workers, not on the supervising parent.
WORKERS_ACCEPT = [d for d in PROCESS_POOLS if getattr(DESIGNS[d], "workers_accept", False)]
# The designs with no child process (one process, its threads or its event loop accept and
# serve): there the limit is set on the server itself.
ONE_PROCESS = [d for d in ALL_DESIGNS if not issubclass(DESIGNS[d], ChildProcesses)]
# The designs whose parent accepts and hands the connection on (a child per connection, a
# descriptor to a worker): there the limit is set on the parent.
PARENT_ACCEPTS = [d for d in ALL_DESIGNS if d not in ONE_PROCESS and d not in WORKERS_ACCEPT]


@pytest.mark.parametrize("design", [*ONE_PROCESS, *WORKERS_ACCEPT, *PARENT_ACCEPTS])
def test_descriptor_exhaustion_sheds_without_spinning_and_recovers(
    start_server: ServerFactory, design: str
) -> None:
    # A backlog deep enough that connecting never waits for SYN retransmits. One worker (process
    # or thread); a blocking accept() gives up after --idle-timeout (see below).
    args = ["--workers", "1"] if design in POOL_DESIGNS else []
    args += ["--idle-timeout", "1", "--backlog", "128"]

    def acceptors(server: RunningServer) -> list[int]:
        if design not in WORKERS_ACCEPT:
            return [server.pid]
        workers = workers_of(server)
        settled_fd_counts(workers)  # each worker has set itself up
        return workers

    # Once it is set up, no descriptor to spare: each acceptor's limit (which counts descriptor
    # numbers) becomes the lowest number it has free — where accept() would put the next
    # connection (a forked worker may hold higher ones).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = start_server(design, *args)
    pids = acceptors(server)
    limits = {pid: lowest_free(fd_numbers(pid)) for pid in pids}
    for pid, limit in limits.items():
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    if design in WORKERS_ACCEPT or DESIGNS[design].pool_of == "threads":
        # A worker blocked in accept() reserved its descriptor before it began to wait (the
        # kernel allocates the number first): the lower limit applies from its next accept(),
        # after the listening socket's SO_RCVTIMEO (--idle-timeout) ends this one.
        time.sleep(1.5)
    watched = [server.pid, *pids]
    cpu_before = sum(cpu_seconds(pid) for pid in watched)

    clients: list[socket.socket] = []
    with closing_all(clients):
        for _ in range(20):  # more than it has descriptors for, all at once
            sock = connect(server.port)
            sock.sendall(MESSAGE)
            clients.append(sock)
        end = time.monotonic() + 3.0  # keep connecting for a while (load duration, no assertion)
        while time.monotonic() < end:
            sock = connect(server.port)
            sock.sendall(MESSAGE)
            clients.append(sock)
            time.sleep(0.1)
        cpu_used = sum(cpu_seconds(pid) for pid in watched) - cpu_before
        assert cpu_used < 1.0, f"{cpu_used:.2f} s of CPU in 3 s: accept() is spinning"

        stats = server.stats()
        shed = stats["shed"]
        assert isinstance(shed, int) and shed >= 1, stats
        closed: set[int] = set()

        def shed_ones_closed() -> bool:
            closed.update(
                i for i, s in enumerate(clients) if i not in closed and closed_by_server(s)
            )
            return len(closed) >= shed

        assert wait_until(shed_ones_closed), f"{len(closed)} of {shed} shed clients saw a close"
        notices = [line for line in server.lines if "accept() failed with EMFILE" in line]
        assert len(notices) == 1, notices
        assert "ulimit -n" in notices[0]

    # The held connections are gone; descriptors free up (the limit is raised): it serves again.
    for pid, limit in limits.items():
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit + 64, hard))
    assert echo_once(server.port) == MESSAGE
    server.wait_for_line(r"accept\(\) recovered; \d+ connection\(s\) shed")
    assert len([line for line in server.lines if "accept() failed with" in line]) == 1
    assert server.proc.poll() is None


# --- 11. SIGUSR1 statistics ---------------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_sigusr1_prints_one_json_stats_line_and_keeps_running(
    start_server: ServerFactory, design: str
) -> None:
    args = TWO_WORKERS if design in POOL_DESIGNS else []
    server = start_server(design, *args)
    for _ in range(3):
        assert echo_once(server.port) == MESSAGE
    requests = 0

    def settled() -> bool:
        nonlocal requests
        requests += 1
        return server.stats()["completed"] == 3

    assert wait_until(settled, interval=0.2)
    requests += 1
    stats = server.stats()
    assert stats["event"] == "stats" and stats["design"] == design and stats["pid"] == server.pid
    assert stats["accepted"] == 3
    assert stats["completed"] == 3
    assert stats["failed"] == {} and stats["shed"] == 0 and stats["in_flight"] == 0
    assert stats["bytes_in"] == stats["bytes_out"] == 3 * len(MESSAGE)
    per_worker: dict[str, int] = stats["per_worker"]  # type: ignore[assignment]
    if design in PROCESS_POOLS:
        assert sum(per_worker.values()) == 3
        assert {int(pid) for pid in per_worker} <= set(workers_of(server))
        assert stats["workers_alive"] == 2

    assert server.proc.poll() is None
    assert echo_once(server.port) == MESSAGE
    assert server.stop(timeout=10) == 0
    # One line per SIGUSR1, plus the final one.
    assert len(stats_lines(server)) == requests + 1


# --- 12. Ctrl-C reaches the whole group; only the parent acts on it -----------------------------


@pytest.mark.parametrize("design", [*PROCESS_POOLS, "fork", "spawn"])
def test_sigint_to_the_process_group_is_an_orderly_shutdown(
    start_server: ServerFactory, design: str
) -> None:
    args = TWO_WORKERS if design in POOL_DESIGNS else []
    server = start_server(design, *args)
    # Two at once where any idle worker takes the second (reuseport may hash both to one).
    socks = [in_flight(server.port) for _ in range(2 if design in ANY_IDLE_WORKER else 1)]
    with tracking(server) as seen, closing_all(socks):
        os.killpg(server.pid, signal.SIGINT)
        time.sleep(0.3)  # let every process see it (ordering only)
        assert server.proc.poll() is None, "the server left with connections in flight"
        assert [finish(sock) for sock in socks] == [MESSAGE] * len(socks)
        assert server.wait(15) == 0
    assert len(stats_lines(server)) == 1
    stats = server.final_stats()
    assert stats["completed"] == len(socks), stats
    assert stats["failed"] == {}, stats
    assert leftovers(server, seen) == []
    assert_no_traceback(server)
