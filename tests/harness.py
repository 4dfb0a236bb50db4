"""Start lab servers as real processes on loopback and look at them from outside.

Every server runs in its own session (``start_new_session``), so its whole process group —
parent, workers, children — can be killed at teardown whatever a test did to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.measure.ports import quiet_port
from lab.sockets.designs import DESIGNS

ALL_DESIGNS = list(DESIGNS)
CONCURRENT_DESIGNS = [d for d in ALL_DESIGNS if d != "iterative"]
# Derived from what each design declares (lab.sockets.base.Server), never listed by hand:
POOL_DESIGNS = [d for d in ALL_DESIGNS if DESIGNS[d].pool_of]  # take --workers
PROCESS_POOLS = [d for d in ALL_DESIGNS if DESIGNS[d].pool_of == "processes"]  # workers: processes
GROWING_POOLS = [d for d in ALL_DESIGNS if DESIGNS[d].grows]  # take --max-workers
# Concurrent designs where any idle worker takes a newcomer: not those with an accept queue per
# worker chosen by hash (reuseport), where a client can wait behind a busy one.
ANY_IDLE_WORKER = [
    d for d in CONCURRENT_DESIGNS if not getattr(DESIGNS[d], "queue_per_worker", False)
]
SERIAL_DESIGNS = {  # design → the options that make it serve one connection at a time
    d: list(options) for d in ALL_DESIGNS if (options := DESIGNS[d].serial_options) is not None
}
# One process serving every connection in one event loop (select, asyncio): no pool, no
# one-at-a-time option, and the idle timeout comes from the loop's timer, not SO_RCVTIMEO.
EVENT_LOOPS = [d for d in ALL_DESIGNS if DESIGNS[d].model == "an event loop"]
ORIGINAL_MESSAGE = b"This is a test message from a stupid client lol!\0"  # 49 bytes, NUL included
READY = re.compile(r"ready design=(\S+) address=(\S+) port=(\d+) pid=(\d+)")


def require(available: bool, what: str) -> None:
    """A tool or facility a test needs: missing, it skips on a workstation but FAILS under
    CI=true (CI's machine installs it: `make test` does; a silent skip there proves nothing)."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this fails instead of skipping: {what}", pytrace=False)
    pytest.skip(f"{what} (under CI=true this fails)")


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05
) -> bool:
    """Poll until ``predicate()`` is true or ``timeout`` passes (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    """Close every socket of the list (it may grow inside the block) on the way out."""
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def stats_when(
    server: RunningServer, predicate: Callable[[dict[str, object]], bool], timeout: float = 20.0
) -> dict[str, object]:
    """The server's statistics once ``predicate`` holds for them (a server counts a connection
    just after it closes it, so a client's EOF comes a moment before the count); the last
    reading when it never does, for the caller's assertion to show."""
    stats: dict[str, object] = {}

    def holds() -> bool:
        nonlocal stats
        stats = server.stats()
        return predicate(stats)

    wait_until(holds, timeout=timeout, interval=0.1)
    return stats


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    design: str
    host: str = ""
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first output line from index ``start`` on matching ``pattern`` (regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} from {self.design}; output:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(min(remaining, 0.2))

    def _reader_alive(self) -> bool:
        return self._reader.is_alive()

    def stats(self, timeout: float = 10.0) -> dict[str, object]:
        """Ask for statistics with SIGUSR1 and return the JSON line it prints."""
        start = len(self.lines)
        os.kill(self.pid, signal.SIGUSR1)
        return self.parse_stats(self.wait_for_line(r'^\{"event": "stats"', timeout, start))

    @staticmethod
    def parse_stats(line: str) -> dict[str, object]:
        data: dict[str, object] = json.loads(line)
        return data

    def final_stats(self) -> dict[str, object]:
        """The statistics line printed on exit (call after the server ended)."""
        stats = [line for line in self.lines if line.startswith('{"event": "stats"')]
        assert stats, "no statistics line printed on exit:\n" + "\n".join(self.lines[-40:])
        return self.parse_stats(stats[-1])

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        os.kill(self.pid, signum)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill_group(self) -> None:
        # spawn's programs run in process groups of their own: kill every descendant too.
        for pid in descendants(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def descendants(self) -> list[int]:
        return descendants(self.pid)

    def group_members(self) -> list[int]:
        """Every live (non-zombie) process in the server's process group, itself included."""
        return processes_in_group(self.pid)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on


def descendants(root: int) -> list[int]:
    """Live processes below ``root`` (children, grandchildren …), zombies included."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def zombies_of(pid: int) -> list[int]:
    return [c for c in descendants(pid) if (_proc_stat(c) or ["?"])[0] == "Z"]


def processes_in_group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read until ``n`` bytes arrived or the peer closed (then fewer)."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc, in clock ticks)."""
    fields = _proc_stat(pid)
    assert fields is not None, f"process {pid} is gone"
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def server_command(design: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lab.sockets",
        "--design",
        design,
        "--host",
        "127.0.0.1",
        "--port",
        str(quiet_port()),  # below the ephemeral range: see lab.measure.ports
        *args,
    ]


class ServerFactory:
    """Starts servers and guarantees every one's process group is gone at teardown."""

    def __init__(self) -> None:
        self.started: list[RunningServer] = []

    def __call__(
        self,
        design: str,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command: list[str] | None = None,
        wait_ready: bool = True,
    ) -> RunningServer:
        proc = subprocess.Popen(
            command or server_command(design, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,
        )
        server = RunningServer(proc, design)
        server._reader = threading.Thread(target=server._read, daemon=True)
        server._reader.start()
        self.started.append(server)
        if wait_ready:
            match = READY.search(server.wait_for_line(r"\bready\b", timeout=20))
            assert match, server.lines
            server.host, server.port = match.group(2), int(match.group(3))
        return server

    def cleanup(self) -> None:
        for server in self.started:
            server.kill_group()


def echo_once(
    port: int, payload: bytes = ORIGINAL_MESSAGE, host: str = "127.0.0.1", timeout: float = 10.0
) -> bytes:
    """Connect, send ``payload``, read until that many bytes came back (or EOF), close."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), zombies included."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found
