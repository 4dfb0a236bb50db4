"""What the pool designs share: pre-started worker processes, supervised by the parent.

The parent only supervises (gunicorn's arbiter): it forks the workers, reaps each one that dies,
says why ("killed by SIGKILL — out of memory, or killed by hand?") and starts a replacement, and
on SIGTERM stops them all. Workers ask the kernel to signal them when the parent dies
(PR_SET_PDEATHSIG), so a SIGKILLed server leaves no orphans behind. Each worker counts in its own
slot of shared memory; the parent folds a dead worker's slot into the totals, so per-worker
counts survive the worker.
"""

from __future__ import annotations

import gc
import signal

from lab.sockets import process, signals
from lab.sockets.respawn import Respawning
from lab.sockets.stats import Slot
from lab.sockets.supervise import ChildProcesses


class PoolServer(ChildProcesses, Respawning):
    """A worker that keeps dying at once is replaced after a delay (lab.sockets.respawn)."""

    per_worker_stats = True
    pool_of = "processes"
    serial_options = ("--workers", "1", "--max-workers", "1")

    def counter_slots(self) -> int:
        return self.config.pool_max + 1

    def ready_details(self) -> dict[str, object]:
        return {"workers": self.config.pool_size}

    @property
    def workers(self) -> list[int]:
        return [pid for pid, role in self.children.items() if role == "worker"]

    def start(self) -> None:
        # Objects made so far never need the cycle collector again: gc.freeze() keeps a full
        # collection in a worker from scanning (and copying, page by page) the parent's heap.
        gc.freeze()
        self.maintain_pool()

    def spawn_worker(self) -> int:
        slot = self.counters.assign()
        try:
            pid = process.fork(
                lambda: self.worker_main(slot), keep_fds=self.worker_keeps(), long_lived=True
            )
        except OSError:
            self.counters.release(slot)
            raise
        self.counters.bind(slot, pid)
        self.children[pid] = "worker"
        if self.tracing:
            self.log.trace(f"fork() is OK: worker {pid} started")
        return pid

    def worker_main(self, slot: Slot) -> int:
        """The worker's whole life; returns its exit code."""
        raise NotImplementedError

    def worker_keeps(self) -> list[int]:
        """The parent's descriptors a worker needs."""
        raise NotImplementedError

    def maintain_pool(self) -> int:
        """Start workers until the pool has what it needs; returns how many were started."""
        started = 0
        while len(self.workers) < self.config.pool_size:
            self.spawn_worker()
            started += 1
        return started

    def child_exited(self, pid: int, status: int, role: str) -> None:
        expected = self.expected_exit(pid)
        super().child_exited(pid, status, role)
        if self.stopping:
            return  # told to stop: neither replaced nor reported
        if expected:
            self.maintain_pool()
            return
        self.replace(f"worker {pid} {signals.explain_status(status)}", "workers")

    def expected_exit(self, pid: int) -> bool:
        """Whether the worker said it was leaving (so its exit is no failure)."""
        return False

    def signal_workers(self, signum: int = signal.SIGTERM) -> None:
        for pid in self.workers:
            self._kill(pid, signum)
