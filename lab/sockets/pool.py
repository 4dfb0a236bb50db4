"""What the pool designs share: pre-started worker processes, supervised by the parent.

The parent only supervises (gunicorn's arbiter): it forks the workers, reaps each one that dies,
says why ("killed by SIGKILL — out of memory, or killed by hand?") and starts a replacement, and
on SIGTERM stops them all. Workers ask the kernel to signal them when the parent dies
(PR_SET_PDEATHSIG), so a SIGKILLed server leaves no orphans behind.
"""

from __future__ import annotations

import signal
import time

from lab.sockets import process, signals
from lab.sockets.base import Server
from lab.sockets.config import ServerConfig
from lab.sockets.log import Log
from lab.sockets.signals import SignalQueue
from lab.sockets.stats import ReportPipe


class PoolServer(Server):
    per_worker_stats = True

    def ready_details(self) -> dict[str, object]:
        return {"workers": self.config.pool_size}

    @property
    def workers(self) -> list[int]:
        return [pid for pid, role in self.children.items() if role == "worker"]

    def spawn_worker(self) -> int:
        pid = process.fork(self.worker_main, close_fds=self.worker_closes())
        self.children[pid] = "worker"
        self.log.trace(f"fork() is OK: worker {pid} started")
        return pid

    def worker_main(self) -> int:
        """The worker's whole life; returns its exit code."""
        raise NotImplementedError

    def worker_closes(self) -> list[int]:
        """Parent descriptors a worker must not keep."""
        return self.inherited_fds()

    def child_exited(self, pid: int, status: int, role: str) -> None:
        super().child_exited(pid, status, role)
        if self.stopping or self.expected_exit(pid):
            return
        self.log.notice(f"worker {pid} {signals.explain_status(status)}: starting a replacement")
        self.replace_worker()

    def expected_exit(self, pid: int) -> bool:
        """Whether the worker said it was leaving (so its exit is no failure)."""
        return False

    def replace_worker(self) -> None:
        self.spawn_worker()

    def signal_workers(self, signum: int = signal.SIGTERM) -> None:
        for pid in self.workers:
            self._kill(pid, signum)


class PoolWorker:
    """What a pool worker process shares: its own signal pipe (SIGTERM: finish what you have,
    then leave; SIGINT stays ignored), the report pipe, and the echo loop's Host protocol."""

    def __init__(self, config: ServerConfig, report: ReportPipe, log: Log) -> None:
        self.config = config
        self.report = report
        self.log = log
        self.signal_queue = SignalQueue((signal.SIGTERM,))
        self._stop_deadline: float | None = None

    def housekeeping_fds(self) -> tuple[int, ...]:
        return (self.signal_queue.fileno(),)

    def on_housekeeping(self, fd: int) -> None:
        if signal.SIGTERM in self.signal_queue.pending() and self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.config.grace

    @property
    def stop_deadline(self) -> float | None:
        return self._stop_deadline

    @property
    def stopping(self) -> bool:
        return self._stop_deadline is not None
