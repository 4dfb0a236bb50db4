"""iterative — one process, one connection at a time.

While it serves one client, the others wait in the listen backlog: their handshake is complete
(the kernel did it), their data sits in the socket's receive buffer, and nobody answers until
the current client closes. Beyond the backlog, Linux drops new SYNs and the clients' kernels
retransmit them (after about 1, 3, 7 … s) — a delay, not a refusal. (With SYN cookies on,
net.ipv4.tcp_syncookies, an overloaded queue may instead answer with a cookie and reset the
client later; the lab's server container turns them off.)

The loop: ``accept()`` on the non-blocking listener; when the queue is empty, ``poll()`` on the
listener and the signal pipe (so a SIGTERM between connections is never missed); serve the
connection with blocking calls (:mod:`lab.sockets.echo`: one recv and one send per message,
signals handled by :class:`~lab.sockets.serving.Serving`). Under load the queue is rarely empty,
so a connection costs ``accept``, its messages, the EOF ``recv`` and ``close`` — the design's
own calls and nothing else.

Health probes must be answered while a long connection is served, and the echo never polls:
a small thread blocks in ``accept()`` on the health port and answers there. It runs with every
signal blocked, so the kernel delivers signals to the main thread (a signal taken by the other
thread would not interrupt the main thread's blocking ``recv``). It costs nothing while no probe
comes: a thread blocked in a system call does not hold the GIL.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time

from lab.sockets import services, signals
from lab.sockets.base import Server
from lab.sockets.serving import Serving

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar


class IterativeServer(Server):
    name = "iterative"
    summary = "one process: accept, serve the whole connection, close, accept the next"
    origin = "the chapter's iterative server; Stevens UNP ch. 30 server 0"
    model = "one connection at a time"
    serial_options = ()
    default_backlog = 5  # the original program's listen(sock, 5)
    per_worker_stats = True
    # Per connection with one message, tracing off, measured by tests/test_syscall_budget.py:
    # accept4 (and, when the queue is empty, one accept4 that says EAGAIN and the poll() that
    # waits), the message's readv and write, the EOF readv, close.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 2,
        "poll": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
    }

    def start(self) -> None:
        self.slot = self.counters.assign()
        self.counters.bind(self.slot, os.getpid())
        self.serving = Serving(
            self.config,
            self.log,
            self.slot,
            stop_signals=(signal.SIGTERM, signal.SIGINT),
            repeat_cuts=True,
        )
        self.serving.on_usr1 = lambda: self.log.line_now(self.stats_line())
        self.service = services.for_config(self.config)  # echo, or kv (its Store: lazily, here)
        # The signals now act at once (the echo blocks in recv); the wake-up pipe still ends
        # the poll() between connections.
        signals.set_owner(self.serving.on_signal)
        for signum in self.signal_queue.pending():  # any that came before this point
            self.serving.on_signal(signum)
        if self.health is not None:
            self.health.setblocking(True)
            mask = signals.block_all()  # the thread inherits the mask; we restore ours
            try:
                threading.Thread(target=self._answer_health, name="health", daemon=True).start()
            finally:
                signals.restore(mask)

    def _answer_health(self) -> None:
        health = self.health
        assert health is not None
        while True:
            try:
                probe, _ = health.accept()
            except OSError:
                if health.fileno() == -1:
                    return  # closed: the server is exiting
                time.sleep(0.1)  # out of descriptors or buffers: the probe retries anyway
                continue
            with contextlib.suppress(OSError):
                probe.send(b"ok\n")
            probe.close()
            self.stats.health_probes += 1

    def run(self) -> None:
        # The loop a connection costs, kept flat: the raw accept() and the echo, each one call;
        # the Acceptor's errno policy and the wait for the next connection only off that path.
        serving, acceptor, serve = self.serving, self.acceptor, self.service
        accept = self.listener._accept  # type: ignore[attr-defined]
        accepted, close = self.slot.accepted, os.close
        tracing = self.log.tracing
        limit = self.config.connections
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        signal_fd = self.signal_queue.fileno()
        poller.register(signal_fd, select.POLLIN)
        served = 0
        while not serving.stopping:
            try:
                fd = accept()[0]
            except (BlockingIOError, InterruptedError):
                self.wait_for_connection(poller, signal_fd)
                continue
            except OSError as exc:
                fd = self.accept_failed(exc, poller, signal_fd)
                if fd is None:
                    continue
            else:
                if acceptor.backoff:
                    acceptor._recovered()
                if tracing:
                    self.log.trace("accept() is OK")
            accepted()
            serve(fd, serving)
            close(fd)
            if limit:
                served += 1
                if served >= limit:
                    self.log.trace(f"served {limit} connection(s): stopping")
                    break
        else:
            self.close_the_door()
            while not serving.cut and (fd := acceptor.accept()) is not None:
                self.serve(fd)
        self.listener.close()

    def wait_for_connection(self, poller: select.poll, signal_fd: int) -> None:
        """The queue is empty: poll() the listener and the signal pipe (a SIGTERM between
        connections ends the wait), or only the pipe while backing off."""
        now = time.monotonic()
        timeout = self.acceptor.paused_until - now if self.acceptor.paused(now) else None
        if timeout is not None:
            poller.unregister(self.listener)
        for ready, _ in poller.poll(None if timeout is None else timeout * 1000):
            if ready == signal_fd:
                self.signal_queue.pending()  # the handler acted already; empty the pipe
        if timeout is not None:
            poller.register(self.listener, select.POLLIN)

    def accept_failed(self, exc: OSError, poller: select.poll, signal_fd: int) -> int | None:
        """The Acceptor's policy for a failed accept(): a connection taken instead, or None —
        shed, or backing off: then the back-off is waited out here, before the next accept()."""
        fd, shed = self.acceptor.after_failure(exc)
        if shed:
            self.slot.accepted_and_shed(shed)
        if fd is None and self.acceptor.paused(time.monotonic()):
            self.wait_for_connection(poller, signal_fd)
        return fd

    def serve(self, fd: int) -> None:
        self.slot.accepted()
        self.service(fd, self.serving)
        os.close(fd)
