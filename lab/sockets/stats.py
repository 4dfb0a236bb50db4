"""Server statistics, and the pipe that carries them from the processes that serve.

The process that prints statistics (the server, or the supervising parent) is often not the one
that served the connection: a forked child, a pool worker or a spawned program did. Each of those
writes one short record per event to a pipe inherited from the parent. A write of at most
PIPE_BUF (4096) bytes to a pipe is atomic, so records from many writers never interleave. The
parent folds them into :class:`Stats`, so a worker's death loses at most the connection it was
serving, never its history — that is how per-worker counts survive a killed worker.

Record format, one line of ASCII: ``a PID`` (a worker accepted a connection) or
``d PID OUTCOME BYTES_IN BYTES_OUT`` (a connection ended).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

COMPLETED = "completed"  # the client closed its side after every byte it sent was echoed
# Failure reasons (``failed`` counts by these):
RESET = "reset"  # the client reset the connection, or went away while we wrote
IDLE_TIMEOUT = "idle_timeout"  # no progress either way for --idle-timeout seconds
STOPPED = "stopped"  # still open when the server's --grace ran out
WORKER_DIED = "worker_died"  # the process serving it died mid-connection
SPAWN_FAILED = "spawn_failed"  # posix_spawn()/fork() failed (EAGAIN, ENOMEM)
ERROR = "error"  # any other socket error


@dataclass
class Stats:
    design: str
    accepted: int = 0
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    shed: int = 0  # accepted and closed at once: no descriptor, no room in the queue
    bytes_in: int = 0
    bytes_out: int = 0
    per_worker: Counter[str] = field(default_factory=Counter)  # connections served, by worker pid
    workers_alive: int = 0
    health_probes: int = 0  # answered on the health port; not connections
    started: float = field(default_factory=time.monotonic)

    def ended(self, outcome: str, bytes_in: int, bytes_out: int, worker: int | None) -> None:
        if outcome == COMPLETED:
            self.completed += 1
        else:
            self.failed[outcome] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if worker is not None:
            self.per_worker[str(worker)] += 1

    @property
    def in_flight(self) -> int:
        return self.accepted - self.completed - sum(self.failed.values()) - self.shed

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "stats",
                "design": self.design,
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 3),
                "accepted": self.accepted,
                "completed": self.completed,
                "failed": dict(sorted(self.failed.items())),
                "shed": self.shed,
                "in_flight": self.in_flight,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "per_worker": dict(sorted(self.per_worker.items())),
                "workers_alive": self.workers_alive,
                "health_probes": self.health_probes,
            },
            separators=(", ", ": "),
        )


class ReportPipe:
    """Parent side: create before forking; children call :meth:`accepted`/:meth:`ended`.

    :attr:`open` counts, per pid, connections handed to (or accepted by) a process and not yet
    reported ended: when that process dies, they are the connections its death cost.
    """

    def __init__(self, per_worker: bool) -> None:
        # per_worker: count by pid (pool workers), or not (a child per connection: pointless)
        self.per_worker = per_worker
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.open: Counter[int] = Counter()
        self._partial = b""

    # -- child side --------------------------------------------------------------------
    def accepted(self) -> None:
        self._write(b"a %d\n" % os.getpid())

    def shed(self, count: int) -> None:
        self._write(b"s %d %d\n" % (os.getpid(), count))

    def ended(self, outcome: str, bytes_in: int, bytes_out: int) -> None:
        self._write(b"d %d %s %d %d\n" % (os.getpid(), outcome.encode(), bytes_in, bytes_out))

    def _write(self, record: bytes) -> None:
        with contextlib.suppress(BrokenPipeError):  # the parent is gone: nobody to tell
            os.write(self.write_fd, record)

    # -- parent side -------------------------------------------------------------------
    def opened(self, pid: int) -> None:
        """The parent handed a connection to ``pid`` (it counted the accept itself)."""
        self.open[pid] += 1

    def drain(self, stats: Stats) -> None:
        """Fold every waiting record into ``stats``."""
        chunks = [self._partial]
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        *lines, self._partial = b"".join(chunks).split(b"\n")
        for line in lines:
            kind, pid, *rest = line.decode("ascii", "replace").split()
            if kind == "a":
                stats.accepted += 1
                self.open[int(pid)] += 1
            elif kind == "s":
                stats.accepted += int(rest[0])
                stats.shed += int(rest[0])
            elif kind == "d":
                outcome, bytes_in, bytes_out = rest
                worker = int(pid) if self.per_worker else None
                stats.ended(outcome, int(bytes_in), int(bytes_out), worker)
                self.open[int(pid)] -= 1

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
