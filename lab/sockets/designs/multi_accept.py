"""multi-accept — N pre-started workers all block in accept() on one listening socket.

The parent does socket → bind → listen and forks the workers, which inherit the listening
socket; the kernel hands each new connection to one of them. The parent never accepts: it only
supervises. No descriptor crosses a process boundary, and no process is created per connection.

No thundering herd: processes blocked in ``accept()`` wait on the listening socket's queue as
*exclusive* waiters, and Linux wakes one of them per connection (Stevens measured the herd on
older kernels; ``prefork-epoll`` — waiting in epoll with ``EPOLLEXCLUSIVE`` — is nginx's model,
a different design). A blocking ``accept()`` cannot also wait for a signal pipe, so a worker is
stopped by its SIGTERM handler raising inside the wait (:mod:`lab.sockets.serving`). The two
races that leaves are closed here: a SIGTERM that lands just before the worker enters
``accept()`` does not interrupt it, so the parent repeats SIGTERM every half second while
workers are still alive; and an ``accept()`` that completed just as the handler raised left its
descriptor open under a number the worker knows in advance (the lowest free one), which the
worker then serves.

A connection costs a worker ``accept4``, its messages, the EOF ``recv`` and ``close``: the
design's own calls and nothing else (the listening socket's ``SO_RCVTIMEO``, inherited by each
accepted socket, is the idle timeout; counts go to shared memory).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from lab.sockets import process
from lab.sockets.accept import Acceptor
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.echo import echo
from lab.sockets.log import Log
from lab.sockets.pool import PoolServer
from lab.sockets.serving import Interrupted, Serving, adopt_lost, lowest_free_fd
from lab.sockets.stats import Slot

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

_LOST = -2  # _wait(): the handler raised just as accept() returned


class MultiAcceptServer(PoolServer):
    name = "multi-accept"
    summary = "N pre-forked workers each block in accept() on the shared listening socket"
    origin = "the chapter's multiple accept() workers; Stevens UNP ch. 30 server 2 (prefork)"
    model = "a pool of processes that accept"
    # Per connection with one message (tests/test_syscall_budget.py): accept4, the message's
    # readv and write, the EOF readv, close — nothing of the lab's.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
    }

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.connections:
            raise ConfigError(
                "--connections does not apply to multi-accept (its workers accept on their "
                "own): stop it with SIGTERM, or use another design"
            )

    def counter_slots(self) -> int:
        return self.config.pool_size + 1

    def start(self) -> None:
        self.listener.setblocking(True)  # the workers block in accept(); the parent never does
        super().start()

    def accepting(self) -> bool:
        return False  # the workers accept; the parent only supervises

    def worker_keeps(self) -> list[int]:
        return [self.listener.fileno()]

    def worker_main(self, slot: Slot) -> int:
        return AcceptWorker(self.listener, self.config, self.log, slot).run()

    # Workers keep their own --grace deadline from when they got SIGTERM; the parent waits a
    # moment longer, so a worker closes what it holds and exits by itself before any SIGKILL.
    WORKER_SLACK = 1.0
    # While stopping, SIGTERM again this often to workers still alive (see the docstring).
    RESIGNAL_EVERY = 0.5

    def begin_stop(self, drain: bool = True) -> None:
        # The workers drain the queue themselves: forward the request to stop.
        first = not self.stopping
        super().begin_stop(drain=False)
        if first:
            self.close_the_door()
            if self._stop_deadline is not None:
                self._stop_deadline += self.WORKER_SLACK
        if not first:
            self.killing = True  # told twice: what they hold is cut, counted as stopped
        self.signal_workers(signal.SIGTERM if first else signal.SIGKILL)

    def stop_poll_interval(self) -> float:
        return self.RESIGNAL_EVERY

    def while_stopping(self) -> None:
        self.signal_workers(signal.SIGTERM)


class AcceptWorker:
    """One worker: accept, serve the connection to its end, accept again."""

    def __init__(self, listener: socket.socket, config: ServerConfig, log: Log, slot: Slot):
        self.listener = listener
        self.accept_raw = listener._accept  # type: ignore[attr-defined]
        self.acceptor = Acceptor(listener, log)  # its errno policy for the rare failures
        self.log = log
        self.slot = slot
        # SIGTERM: stop after this connection (SIGINT stays with the parent: Ctrl-C reaches
        # the whole process group, and the parent coordinates the stop).
        self.serving = Serving(config, log, slot, stop_signals=(signal.SIGTERM,))

    def run(self) -> int:
        serving = self.serving
        serving.own_signals()
        self.expected_fd = lowest_free_fd()
        while not serving.stopping:
            fd = self.next_connection(check_stop=True)
            if fd is not None:
                self.serve(fd)
        # Stopping: serve what the kernel had queued (the parent shrank the backlog, so
        # nothing new comes in), then leave. Another worker may take the last one first and
        # leave us blocked in accept(): the parent's repeated SIGTERM gets us out.
        queued = select.poll()
        queued.register(self.listener, select.POLLIN)
        while not serving.cut and queued.poll(0):
            fd = self.next_connection(check_stop=False)
            if fd is None:
                break
            self.serve(fd)
        return process.EXIT_OK

    def next_connection(self, check_stop: bool) -> int | None:
        try:
            fd = self._wait(check_stop)
        except BlockingIOError:
            return None  # SO_RCVTIMEO: no connection for --idle-timeout seconds
        except OSError as exc:
            shed = self.acceptor.shed
            fd = self.acceptor._failed(exc)
            if self.acceptor.shed != shed:
                self.slot.accepted_and_shed(self.acceptor.shed - shed)
            if self.acceptor.paused(time.monotonic()):
                time.sleep(max(0.0, self.acceptor.paused_until - time.monotonic()))
            return fd
        if fd == _LOST:
            return self.expected_fd if adopt_lost(self.expected_fd) else None
        if fd is not None:
            if self.acceptor.backoff:
                self.acceptor._recovered()
            if self.serving.tracing:
                self.log.trace("accept() is OK")
        return fd

    def _wait(self, check_stop: bool) -> int | None:
        """accept(), interruptible by a stop (the only place the handler may raise)."""
        serving = self.serving
        serving.interruptible = True
        try:
            if check_stop and serving.stopping:
                return None
            return int(self.accept_raw()[0])
        except Interrupted:
            return _LOST
        finally:
            serving.interruptible = False

    def serve(self, fd: int) -> None:
        slot = self.slot
        slot.accepted()
        outcome, bytes_in, bytes_out = echo(fd, self.serving)
        os.close(fd)
        slot.ended(outcome, bytes_in, bytes_out)
