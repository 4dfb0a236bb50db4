"""The system-call budget of every design, counted with ``strace -f -c`` — a count, not a
timing, so it holds on a noisy machine.

The server runs as usual; strace attaches to it and every process below it only for a window
in which a client makes N sequential connections of K messages each. Two windows (K = 1 and
K = 11) on the same server separate what a message costs from what a connection costs:

* per message, (window₁₁ − window₁) / (N × 10): exactly what the design declares
  (``syscalls_per_message``: for the blocking designs one ``readv`` and one ``write``, nothing
  else — ``MESSAGE_BUDGET``);
* per connection, window₁ / N: at most the design's declared ``syscalls_per_connection``.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    ALL_DESIGNS,
    POOL_DESIGNS,
    RunningServer,
    ServerFactory,
    descendants,
    require,
)

from lab.sockets.designs import DESIGNS

N = 30  # connections per window
K = 11  # messages per connection in the second window
MESSAGE = b"x" * 49
SLACK = 0.15  # per name: strace's attach and detach, a stray wake-up
# Not ours: the C library's and the interpreter's own work in a forked child, and the call
# strace's attach interrupts.
RESTARTED = {"clone", "clone3"}
RUNTIME = {"gettid": 1, "set_robust_list": 1, "rseq": 1, "restart_syscall": 1}
# Calls whose count grows with contention, not with the design's work: a thread that finds the
# GIL or a lock taken waits on a futex and is woken by another. On a loaded machine (and under
# ptrace, which slows every call) threads collide more; noise only adds such calls, never
# removes them, so their per-connection figure is the least of up to WINDOWS windows.
CONTENDED = {"futex"}
WINDOWS = 3


@pytest.fixture(autouse=True)
def _strace() -> None:
    require(shutil.which("strace") is not None, "strace is not installed (make test installs it)")


def drive(port: int, connections: int, messages: int) -> None:
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(messages):
                sock.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    got += len(sock.recv(4096))
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(16) == b""  # the server closed after our EOF


def threads_of(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []  # ended meanwhile


def count(server: RunningServer, tmp: Path, connections: int, messages: int) -> dict[str, float]:
    """System calls per connection made by the server's processes while the client ran."""
    drive(server.port, 3, 2)  # warm: pools started, first-connection work done
    out = tmp / f"strace-{messages}.txt"
    # strace -p attaches to one thread: name every thread of every process (-f follows what
    # they start from then on).
    pids = [tid for pid in (server.pid, *descendants(server.pid)) for tid in threads_of(pid)]
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-o", str(out), *(a for p in pids for a in ("-p", str(p)))],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attached (strace gives no signal that it is; a wait, not a measurement)
    drive(server.port, connections, messages)
    time.sleep(0.3)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    calls: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] += int(fields[3])
            if fields[-1] in RESTARTED and len(fields) == 6:
                # Under ptrace a child's exit signal interrupts fork(), which the kernel
                # restarts (ERESTARTNOINTR): strace counts the failed attempt too.
                calls[fields[-1]] -= int(fields[4])
    return {name: n / connections for name, n in calls.items()}


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_each_design_keeps_its_system_call_budget(
    design: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    args = ["--workers", "2", "--max-workers", "2"] if design in POOL_DESIGNS else []
    server = start_server(design, *args)
    within_budget(server, design, tmp_path)


# Every --accept-lock a design declares (besides none), with the calls the lock adds.
LOCK_VARIANTS = [
    (design, lock)
    for design in ALL_DESIGNS
    for lock in DESIGNS[design].accept_locks
    if lock != "none"
]


@pytest.mark.parametrize(
    ("design", "lock"), LOCK_VARIANTS, ids=[f"{d}-{k}" for d, k in LOCK_VARIANTS]
)
def test_an_accept_lock_adds_only_its_declared_calls(
    design: str, lock: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    args = ["--workers", "2", "--max-workers", "2"] if design in POOL_DESIGNS else []
    server = start_server(design, "--accept-lock", lock, *args)
    lock_calls = DESIGNS[design].accept_locks[lock]
    within_budget(server, design, tmp_path, lock_calls)


def within_budget(
    server: RunningServer, design: str, tmp_path: Path, extra: dict[str, int] | None = None
) -> None:
    """Per message exactly the declared calls; per connection at most the declared ones (plus
    ``extra``, an option's own)."""
    one = count(server, tmp_path, N, 1)
    many = count(server, tmp_path, N, K)

    per_message = {
        name: (many.get(name, 0.0) - one.get(name, 0.0)) / (K - 1) for name in set(one) | set(many)
    }
    message_budget = DESIGNS[design].syscalls_per_message
    for name, expected in message_budget.items():
        assert abs(per_message.get(name, 0.0) - expected) <= 0.05, (name, per_message)
    budget = dict(DESIGNS[design].syscalls_per_connection)
    for name, calls in (extra or {}).items():
        budget[name] = budget.get(name, 0) + calls
    assert budget, f"{design} declares no syscalls_per_connection"

    def allowed(name: str) -> int:
        return budget.get(name, 0) + RUNTIME.get(name, 0)

    # A per-connection call (the poll() of an empty queue) may differ between the windows by
    # up to its count per connection, spread over K - 1 messages: that is not a message's cost.
    others = {
        n: v
        for n, v in per_message.items()
        if n not in message_budget and abs(v) > 0.05 + allowed(n) / (K - 1)
    }
    assert not others, f"{design} makes other calls per message: {others}"

    if "total" in budget:
        assert sum(one.values()) <= budget["total"], (sum(one.values()), one)
        return

    least = dict(one)
    for _ in range(WINDOWS - 1):
        over = {n for n, used in least.items() if used > allowed(n) + SLACK}
        if not over or not over <= CONTENDED:
            break  # within budget, or over it by a call that contention does not explain
        again = count(server, tmp_path, N, 1)
        for name in CONTENDED:
            least[name] = min(least.get(name, 0.0), again.get(name, 0.0))
    for name, used in sorted(least.items()):
        assert used <= allowed(name) + SLACK, (
            f"{design}: {name} {used:.2f} per connection > {allowed(name)}"
        )


def test_the_spawned_worker_costs_an_interpreter_start_and_little_more(tmp_path: Path) -> None:
    """The spawn design's per-connection cost is mostly the interpreter's: held to the bare
    interpreter's start (measured now, with the same executable) plus a small margin."""
    import sys

    from lab.sockets.designs.spawn import compiled_worker

    def calls(argv: list[str]) -> int:
        out = tmp_path / "calls.txt"
        subprocess.run(
            ["strace", "-f", "-c", "-o", str(out), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        last = out.read_text().strip().splitlines()[-1].split()
        return int(last[3])  # the total line: % time, seconds, usecs/call, calls, errors, total

    bare = calls([sys.executable, "-I", "-S", "-c", "pass"])
    worker = calls([sys.executable, "-I", "-S", compiled_worker()])
    assert bare > 100 and worker <= bare + 60, (worker, bare)
