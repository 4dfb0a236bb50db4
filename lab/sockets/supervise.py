"""Child processes a server starts and supervises — what the process designs share, kept out of
the base :class:`~lab.sockets.base.Server` as ``socketserver`` keeps forking in
``ForkingMixIn``: the thread and event-loop designs do not carry it.

A design with children (``fork``, ``spawn``, the pools) mixes :class:`ChildProcesses` in before
``Server``. It records each child it starts in :attr:`~ChildProcesses.children`; SIGCHLD (or the
design's own loop) reaps them, each exit is explained (``signals.explain_status``) and its
shared-memory counters folded into the totals, so a connection a dead child held is counted as
lost, not forgotten. On stop, :meth:`~ChildProcesses.finish` waits for the children until the
grace period is over, then SIGKILLs and reaps what is left, counting their connections
*stopped*.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import time

from lab.sockets import process, signals
from lab.sockets.base import Server
from lab.sockets.config import ServerConfig
from lab.sockets.log import Log
from lab.sockets.stats import STOPPED, WORKER_DIED


class ChildProcesses(Server):
    """Supervision of child processes, mixed in before a design's other bases."""

    def __init__(self, config: ServerConfig, log: Log | None = None) -> None:
        super().__init__(config, log)
        self.children: dict[int, str] = {}  # pid → what it is ("worker", "child")

    def workers_alive(self) -> int:
        return sum(1 for role in self.children.values() if role == "worker")

    def handle_chld(self) -> None:
        # Reap first, then read the report pipe: a child writes its record before it exits,
        # so every record of a reaped child is in the pipe by now (the other order can see the
        # exit but not yet the record, and count the connection twice).
        ended = process.reap()
        self.collect()
        for pid, status in ended:
            role = self.children.pop(pid, None)
            if role is not None:
                self.child_exited(pid, status, role)

    def finish(self) -> None:
        """Let in-flight work finish until the deadline, then kill what is left; reap all."""
        self.wait_for_children()

    def wait_for_children(self) -> None:
        poller = select.poll()
        poller.register(self.signal_queue.fileno(), select.POLLIN)
        if self.report is not None:
            poller.register(self.report.read_fd, select.POLLIN)
        while self.children:
            remaining = (self.stop_deadline or 0.0) - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(min(remaining, self.stop_poll_interval()) * 1000):
                if self.report is not None and fd == self.report.read_fd:
                    self.collect()
                else:
                    self.on_signals()
            self.handle_chld()
            self.while_stopping()
        if self.children:
            self.killing = True
            self.log.notice(f"grace period over: killing {len(self.children)} process(es)")
            for pid in self.children:
                self._kill(pid, signal.SIGKILL)
            for pid in list(self.children):
                try:
                    _, status = os.waitpid(pid, 0)
                except ChildProcessError:
                    continue
                role = self.children.pop(pid)
                self.collect()
                self.child_exited(pid, status, role)

    def stop_poll_interval(self) -> float:
        return math.inf

    def while_stopping(self) -> None:
        """Once per wake-up while waiting for children to finish (a pool repeats SIGTERM)."""

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signum)

    def child_exited(self, pid: int, status: int, role: str) -> None:
        """A child ended: fold its counters; what it had in flight was lost with it."""
        lost = self.counters.retire(pid, self.stats, STOPPED if self.killing else WORKER_DIED)
        if lost > 0 and not self.killing:
            self.log.notice(
                f"{role} {pid} {signals.explain_status(status)} while serving {lost} connection(s)"
            )
