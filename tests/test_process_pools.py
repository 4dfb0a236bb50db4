"""What is specific to the pools whose workers accept: multi-accept's accept locks, reuseport's
listening socket per worker, prefork-epoll's event loops — and how each spreads connections.

The observables are the kernel's, read from /proc: which system call each worker sleeps in
(``/proc/PID/syscall``), each worker's listening socket and its accept queue
(``/proc/PID/fd``, ``/proc/net/tcp``), and the server's own per-worker counts. Every wait is a
bounded poll (a hang guard), never a timing assertion.

Run as a script (``python tests/test_process_pools.py migrate 0|1``) this file is the scenario
that ``test_tcp_migrate_req_decides_what_a_dead_reuseport_workers_queue_becomes`` runs inside a
network namespace of its own, so that setting net.ipv4.tcp_migrate_req touches nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import (
    ORIGINAL_MESSAGE,
    RunningServer,
    ServerFactory,
    echo_once,
    recv_exactly,
    require,
    stats_when,
    wait_until,
)

MESSAGE = ORIGINAL_MESSAGE
GUARD = 20.0  # a bound on any single wait: a hang guard only

# System call numbers, as /proc/PID/syscall shows the call a sleeping process is in.
SYSCALLS = {
    "x86_64": {"accept4": 288, "flock": 73, "futex": 202, "epoll_wait": 232, "readv": 19},
    "aarch64": {"accept4": 242, "flock": 32, "futex": 98, "epoll_wait": 22, "readv": 65},
}
NUMBERS = SYSCALLS.get(platform.machine(), {})
NAMES = {number: name for name, number in NUMBERS.items()}


@pytest.fixture(autouse=True)
def _known_machine() -> None:
    require(bool(NUMBERS), f"no system call numbers for {platform.machine()} in this test")


# --- helpers ------------------------------------------------------------------------------------


def workers_of(server: RunningServer) -> list[int]:
    return server.descendants()


def sleeping_in(pid: int) -> str:
    """The system call ``pid`` is blocked in ("running" when it is not in one)."""
    try:
        field = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return "gone"
    return NAMES.get(int(field), field) if field.lstrip("-").isdigit() else "running"


def calls_of(workers: list[int]) -> list[str]:
    return sorted(sleeping_in(pid) for pid in workers)


def settled(server: RunningServer, expected: list[str], count: int = 3) -> list[int]:
    """Wait until ``count`` workers sleep in exactly the calls ``expected`` (sorted)."""
    seen: list[str] = []

    def check() -> bool:
        nonlocal seen
        workers = workers_of(server)
        seen = calls_of(workers)
        return len(workers) == count and seen == sorted(expected)

    assert wait_until(check, timeout=GUARD), f"workers sleep in {seen}, not {sorted(expected)}"
    return workers_of(server)


def per_worker(server: RunningServer, total: int) -> dict[int, int]:
    """Connections served by each live worker, once ``total`` have completed."""
    stats: dict[str, object] = {}

    def done() -> bool:
        nonlocal stats
        stats = server.stats()
        return stats["completed"] == total

    assert wait_until(done, timeout=GUARD, interval=0.1), stats
    counts: dict[str, int] = stats["per_worker"]  # type: ignore[assignment]
    return {int(pid): n for pid, n in counts.items()}


def serve(port: int, *, host: str = "127.0.0.1") -> bool:
    return echo_once(port, host=host) == MESSAGE


def listeners(port: int) -> dict[int, int]:
    """Listening TCP sockets on 127.0.0.1:``port`` (IPv4): inode → accept queue length."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues, inode = fields[1], fields[3], fields[4], int(fields[9])
        if state == "0A" and local == f"0100007F:{port:04X}":
            found[inode] = int(queues.split(":")[1], 16)  # rx_queue of a listener: its queue
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lab.sockets", "--host", "127.0.0.1", "--port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=GUARD)


# --- the accept lock ----------------------------------------------------------------------------

IN_LOCK = {"flock": "flock", "sem": "futex"}


@pytest.mark.parametrize("lock", ["none", "flock", "sem"])
def test_an_accept_lock_lets_one_worker_at_a_time_into_accept(
    start_server: ServerFactory, lock: str
) -> None:
    server = start_server("multi-accept", "--workers", "3", "--accept-lock", lock)
    # Without a lock every worker waits in accept() itself; with one, one does, two wait for it.
    expected = ["accept4"] * 3 if lock == "none" else ["accept4"] + [IN_LOCK[lock]] * 2
    settled(server, expected)
    for _ in range(4):
        assert serve(server.port)
    settled(server, expected)  # still so after the lock changed hands
    ready = next(line for line in server.lines if line.startswith("ready"))
    assert (f"accept_lock={lock}" in ready) == (lock != "none"), ready
    if lock == "flock":
        # The kernel's lock table: one holder, two waiters (a "->" line each), one inode.
        inode_locks = [
            line for line in Path("/proc/locks").read_text().splitlines() if " FLOCK " in line
        ]

        # "N: FLOCK ADVISORY WRITE PID …", a waiter "N: -> FLOCK ADVISORY WRITE PID …"
        def pid(line: str) -> int:
            fields = line.split()
            return int(fields[5] if fields[1] == "->" else fields[4])

        mine = [line for line in inode_locks if pid(line) in workers_of(server)]
        assert sum("->" not in line for line in mine) == 1, mine
        assert sum("->" in line for line in mine) == 2, mine


@pytest.mark.parametrize("lock", ["flock", "sem"])
def test_a_killed_lock_holder_does_not_stop_the_pool(
    start_server: ServerFactory, lock: str
) -> None:
    server = start_server("multi-accept", "--workers", "3", "--accept-lock", lock)
    expected = ["accept4", IN_LOCK[lock], IN_LOCK[lock]]
    workers = settled(server, expected)
    holder = next(pid for pid in workers if sleeping_in(pid) == "accept4")
    start = len(server.lines)
    os.kill(holder, signal.SIGKILL)  # dies holding the lock, blocked in accept()
    server.wait_for_line(rf"worker {holder} killed by SIGKILL", start=start)
    settled(server, expected)  # the lock went on: one worker in accept() again
    for _ in range(3):
        assert serve(server.port)
    assert not [line for line in server.lines if "by no live worker" in line]


def test_the_distribution_of_sequential_connections_over_three_workers(
    start_server: ServerFactory,
) -> None:
    """Cloudflare 2017, with 3 workers and 6 connections one after another (each worker back
    in its wait before the next): blocking accept() is FIFO — round-robin, 2 each; epoll with
    EPOLLEXCLUSIVE wakes the first registered waiter — one worker serves all six; reuseport
    goes by the hash of each connection's ports, and with a lock whoever wins the lock's
    wake-up accepts — any spread, all six served."""
    cases = {
        "multi-accept": ([], ["accept4"] * 3),
        "multi-accept --accept-lock sem": (["--accept-lock", "sem"], ["accept4", "futex", "futex"]),
        "multi-accept --accept-lock flock": (
            ["--accept-lock", "flock"],
            ["accept4", "flock", "flock"],
        ),
        "prefork-epoll": ([], ["epoll_wait"] * 3),
        "reuseport": ([], ["accept4"] * 3),
    }
    spread = {}
    for case, (options, waiting) in cases.items():
        server = start_server(case.split()[0], "--workers", "3", *options)
        settled(server, waiting)
        for _ in range(6):
            assert serve(server.port)
            settled(server, waiting)
        spread[case] = sorted(per_worker(server, 6).values(), reverse=True)
        assert server.stop() == 0
    print("distribution of 6 sequential connections over 3 workers:", spread)
    assert spread["multi-accept"] == [2, 2, 2], spread
    assert spread["prefork-epoll"] == [6, 0, 0], spread
    # The others by whoever wins a wake-up: any spread, every connection served.
    for case in ("reuseport", "multi-accept --accept-lock flock", "multi-accept --accept-lock sem"):
        assert sum(spread[case]) == 6 and len(spread[case]) == 3, spread


# --- reuseport ----------------------------------------------------------------------------------


def test_reuseport_workers_each_have_their_own_listener_and_all_serve(
    start_server: ServerFactory,
) -> None:
    server = start_server("reuseport", "--workers", "3")
    workers = settled(server, ["accept4"] * 3)
    listening = listeners(server.port)
    assert len(listening) == 3, listening  # one per worker; the parent's is bound, not listening
    owners = {pid: socket_inodes(pid) & set(listening) for pid in workers}
    assert all(len(inodes) == 1 for inodes in owners.values()), owners
    assert len(set().union(*owners.values())) == 3, owners  # no two share one
    assert not socket_inodes(server.pid) & set(listening)  # the parent keeps no copy
    # Sixty connections by hash: every worker gets some (all three miss one: p < 1e-10).
    for _ in range(60):
        assert serve(server.port)
    counts = per_worker(server, 60)
    assert sorted(counts) == sorted(workers) and all(counts.values()), counts


def test_reuseport_newcomers_wait_behind_a_busy_worker_while_another_idles(
    start_server: ServerFactory,
) -> None:
    """The hash does not know who is busy: the price of a queue per worker."""
    server = start_server("reuseport", "--workers", "2")
    workers = settled(server, ["accept4"] * 2, count=2)
    inode_of = {pid: (socket_inodes(pid) & set(listeners(server.port))).pop() for pid in workers}
    waiting: list[socket.socket] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as silent:
        busy = settled(server, ["accept4", "readv"], count=2)
        held_by = next(pid for pid in busy if sleeping_in(pid) == "readv")
        idle = next(pid for pid in busy if pid != held_by)
        try:
            while listeners(server.port)[inode_of[held_by]] == 0 and len(waiting) < 64:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD)
                sock.sendall(MESSAGE)
                sock.shutdown(socket.SHUT_WR)
                waiting.append(sock)
                settled(server, ["accept4", "readv"], count=2)  # the idle one served any other
            assert listeners(server.port)[inode_of[held_by]] >= 1  # queued behind the silent one
            assert sleeping_in(idle) == "accept4"  # while the other worker waits for work
            silent.shutdown(socket.SHUT_WR)  # the silent one ends: its queue is served
            assert all(recv_exactly(sock, len(MESSAGE)) == MESSAGE for sock in waiting)
        finally:
            for sock in waiting:
                sock.close()


def test_reuseport_replacement_worker_gets_a_new_socket_in_the_group(
    start_server: ServerFactory,
) -> None:
    server = start_server("reuseport", "--workers", "2")
    workers = settled(server, ["accept4"] * 2, count=2)
    before = listeners(server.port)
    os.kill(workers[0], signal.SIGKILL)
    server.wait_for_line(rf"worker {workers[0]} killed by SIGKILL.*started a replacement")
    settled(server, ["accept4"] * 2, count=2)
    after = listeners(server.port)
    assert len(after) == 2 and len(set(after) & set(before)) == 1, (before, after)
    for _ in range(20):
        assert serve(server.port)
    counts = per_worker(server, 20)
    live = workers_of(server)
    assert all(counts.get(pid, 0) > 0 for pid in live), (counts, live)  # the new one serves too


def test_reuseport_says_when_tcp_migrate_req_is_off(start_server: ServerFactory) -> None:
    setting = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    server = start_server("reuseport", "--workers", "1")
    notices = [line for line in server.lines if "tcp_migrate_req" in line]
    if not setting.exists():
        assert notices and "Linux < 5.14" in notices[0], server.lines
    elif setting.read_text().strip() == "0":
        assert notices and "queued on its socket" in notices[0], server.lines
    else:
        assert not notices, server.lines


def test_tcp_migrate_req_decides_what_a_dead_reuseport_workers_queue_becomes() -> None:
    require(Path("/proc/sys/net/ipv4/tcp_migrate_req").exists(), "the kernel (< 5.14)")
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "root and unshare(1)")
    results = {}
    for setting in ("0", "1"):
        done = subprocess.run(
            ["unshare", "--net", sys.executable, __file__, "migrate", setting],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = results["0"], results["1"]
    print("tcp_migrate_req 0:", off, "1:", on)
    # Off: what was queued on the dead worker's socket is reset with it; the rest is served.
    assert off["notice"] and off["reset"] == off["queued_on_victim"] >= 1, off
    assert off["served"] == off["queued_on_other"], off
    # On: the kernel moved the dead worker's queue to the other socket, which served it all.
    assert not on["notice"] and on["queued_on_victim"] >= 1, on
    assert on["reset"] == 0 and on["served"] == on["queued_on_victim"] + on["queued_on_other"], on


def migrate_scenario(setting: str) -> dict[str, object]:
    """Inside a fresh network namespace: two reuseport workers, each busy with one connection,
    connections queued on both sockets; SIGKILL one worker; then what became of its queue."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(setting)
    factory = ServerFactory()
    try:
        server = factory("reuseport", "--workers", "2", "--backlog", "64")
        workers = settled(server, ["accept4"] * 2, count=2)
        inode_of = {
            pid: (socket_inodes(pid) & set(listeners(server.port))).pop() for pid in workers
        }
        busy: list[socket.socket] = []
        queued: list[socket.socket] = []

        def state() -> tuple[int, int]:
            """(workers serving a connection, connections queued on the two sockets)"""
            serving = sum(sleeping_in(pid) == "readv" for pid in workers)
            return serving, sum(listeners(server.port).values())

        def landed(total: int) -> bool:
            """The new connection has landed: ``total`` held or queued, and no worker still
            in accept() has a queue (a connection queued for an idle worker is in the middle
            of being accepted: counting it as queued then would count it twice)."""
            queue = listeners(server.port)
            serving = {pid: sleeping_in(pid) == "readv" for pid in workers}
            held = sum(serving.values()) + sum(queue.values())
            return held == total and all(serving[p] or not queue[inode_of[p]] for p in workers)

        # Connect until both workers hold a connection (each is accepted by the worker its
        # hash chose, or queued behind it when that one is busy).
        while state()[0] < 2:
            before = state()
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD)
            total = sum(before) + 1
            assert wait_until(lambda t=total: landed(t), timeout=GUARD)  # type: ignore[misc]
            (busy if state()[0] > before[0] else queued).append(sock)
        victim, other = workers
        # More, until the victim's socket has some queued (each lands there with p = 1/2).
        while listeners(server.port)[inode_of[victim]] < 2 or len(queued) < 4:
            queued.append(socket.create_connection(("127.0.0.1", server.port), timeout=GUARD))
            assert wait_until(lambda: state()[1] == len(queued), timeout=GUARD)
        queue = listeners(server.port)
        on_victim, on_other = queue[inode_of[victim]], queue[inode_of[other]]
        for sock in queued:
            sock.sendall(MESSAGE)
            sock.shutdown(socket.SHUT_WR)
        os.kill(victim, signal.SIGKILL)
        server.wait_for_line(rf"worker {victim} killed by SIGKILL")
        # Let the other worker go on: finish what it holds (the victim's held one is gone).
        for sock in busy:
            with contextlib.suppress(OSError):  # the victim's is reset
                sock.sendall(MESSAGE)
                sock.shutdown(socket.SHUT_WR)
        served = reset = 0
        outcomes: list[str] = []
        lock = threading.Lock()

        def read(sock: socket.socket) -> None:
            nonlocal served, reset
            try:
                echo = recv_exactly(sock, len(MESSAGE))
            except (ConnectionResetError, TimeoutError):
                echo = b""
            with lock:
                if echo == MESSAGE:
                    served += 1
                else:
                    reset += 1
                outcomes.append("served" if echo == MESSAGE else "reset")

        readers = [threading.Thread(target=read, args=(s,)) for s in queued]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(GUARD * 2)
        for sock in busy + queued:
            sock.close()
        return {
            "setting": setting,
            "notice": any("tcp_migrate_req is 0" in line for line in server.lines),
            "queued_on_victim": on_victim,
            "queued_on_other": on_other,
            "served": served,
            "reset": reset,
        }
    finally:
        factory.cleanup()


# --- prefork-epoll ------------------------------------------------------------------------------


def test_prefork_epoll_closes_a_silent_connection_at_the_idle_timeout(
    start_server: ServerFactory,
) -> None:
    server = start_server("prefork-epoll", "--workers", "2", "--idle-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as silent:
        assert serve(server.port)  # served meanwhile: the loop is not held up
        assert silent.recv(1) == b""  # the server closed it (bounded by GUARD)
    stats = stats_when(server, lambda s: s["failed"] == {"idle_timeout": 1} and s["completed"] == 1)
    assert stats["failed"] == {"idle_timeout": 1} and stats["completed"] == 1, stats


def test_prefork_epoll_stops_reading_a_client_that_does_not_read(
    start_server: ServerFactory,
) -> None:
    server = start_server("prefork-epoll", "--workers", "1", "--idle-timeout", "2")
    block = b"x" * 65536
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as rude:
        rude.setblocking(False)
        writable = select.poll()
        writable.register(rude, select.POLLOUT)
        sent = 0
        # Send, never read, until send() stays blocked for 2 s (the server stopped reading us:
        # its echo waits for us to read) or far more than any buffers hold.
        while sent < 256 << 20:
            try:
                sent += rude.send(block)
            except BlockingIOError:
                if not writable.poll(2000):
                    break
        assert sent < 64 << 20, f"the server read {sent >> 20} MiB it could not echo"
        assert serve(server.port)  # the one loop serves another client meanwhile
        # No progress either way: the idle timeout closes it.
        stats: dict[str, object] = {}

        def cut() -> bool:
            nonlocal stats
            stats = server.stats()
            return stats["failed"] == {"idle_timeout": 1}

        assert wait_until(cut, timeout=GUARD, interval=0.2), stats
    assert stats["completed"] == 1, stats


@pytest.mark.parametrize("design", ["reuseport", "prefork-epoll"])
def test_sigterm_to_the_process_group_stops_in_order(
    start_server: ServerFactory, design: str
) -> None:
    server = start_server(design, "--workers", "2")
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as busy:
        busy.sendall(MESSAGE)
        assert recv_exactly(busy, len(MESSAGE)) == MESSAGE
        os.killpg(server.pid, signal.SIGTERM)
        busy.sendall(b"still here")
        assert recv_exactly(busy, 10) == b"still here"  # served on through the grace period
    assert server.wait(30) == 0
    text = "\n".join(server.lines)
    assert "lab: worker" not in text and "Traceback" not in text, text
    assert server.final_stats()["completed"] == 1


@pytest.mark.parametrize("design", ["reuseport", "prefork-epoll"])
def test_a_second_sigterm_cuts_at_once(start_server: ServerFactory, design: str) -> None:
    server = start_server(design, "--workers", "2", "--grace", "60")
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as busy:
        busy.sendall(MESSAGE)
        assert recv_exactly(busy, len(MESSAGE)) == MESSAGE
        os.kill(server.pid, signal.SIGTERM)
        time.sleep(0.3)  # the first one has been handled (a pause, not a measurement)
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(20) == 0  # far inside the 60 s grace period
    assert server.final_stats()["failed"] == {"stopped": 1}


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--design", "multi-accept", "--accept-lock", "mutex"], ["--accept-lock", "flock", "sem"]),
        (["--design", "reuseport", "--accept-lock", "flock"], ["--accept-lock", "reuseport"]),
        (["--design", "prefork-epoll", "--accept-lock", "sem"], ["--accept-lock", "none"]),
        (["--design", "reuseport", "--connections", "2"], ["--connections", "SIGTERM"]),
        (["--design", "prefork-epoll", "--connections", "2"], ["--connections", "SIGTERM"]),
    ],
    ids=["bad-lock", "lock-reuseport", "lock-epoll", "connections-reuseport", "connections-epoll"],
)
def test_an_option_the_design_cannot_honour_is_one_line_naming_the_fix(
    args: list[str], words: list[str]
) -> None:
    done = run_server(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["migrate"]:
        print(json.dumps(migrate_scenario(sys.argv[2])))
