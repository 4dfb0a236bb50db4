"""multi-accept — N pre-started workers all block in accept() on one listening socket.

The parent does socket → bind → listen and forks the workers, which inherit the listening
socket; the kernel hands each new connection to one of them. The parent never accepts: it only
supervises. No descriptor crosses a process boundary, and no process is created per connection.

The thundering herd: if every worker waits for the listening socket in its own poll/epoll,
*all* of them wake for each new connection and all but one find nothing (EAGAIN). A blocking
accept() has no such herd (Linux wakes one waiter), but cannot also wait for signals. So each
worker registers the socket with ``EPOLLEXCLUSIVE``: the kernel wakes one waiter (or a few),
not all, and the worker still wakes for SIGTERM through its signal pipe.
"""

from __future__ import annotations

import select
import signal
import socket
import time

from lab.sockets import process
from lab.sockets.accept import Acceptor
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.echo import echo
from lab.sockets.log import Log
from lab.sockets.pool import PoolServer, PoolWorker
from lab.sockets.stats import ReportPipe


class MultiAcceptServer(PoolServer):
    name = "multi-accept"
    summary = "N pre-forked workers each block in accept() on the shared listening socket"
    origin = "the chapter's multiple accept() workers; Stevens UNP ch. 30 server 2 (prefork)"

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.connections:
            raise ConfigError(
                "--connections does not apply to multi-accept (its workers accept on their "
                "own): stop it with SIGTERM, or use another design"
            )

    def accepting(self) -> bool:
        return False  # the workers accept; the parent only supervises

    def worker_keeps(self) -> list[int]:
        return [self.listener.fileno()]

    def worker_main(self) -> int:
        return AcceptWorker(self.listener, self.config, self.report, self.log).run()

    # Workers keep their own --grace deadline from when they got SIGTERM; the parent waits a
    # moment longer, so a worker closes what it holds and exits by itself before any SIGKILL.
    WORKER_SLACK = 1.0

    def begin_stop(self, drain: bool = True) -> None:
        # The workers drain the backlog themselves: forward the request to stop.
        first = not self.stopping
        super().begin_stop(drain=False)
        if first and self._stop_deadline is not None:
            self._stop_deadline += self.WORKER_SLACK
        self.signal_workers(signal.SIGTERM if first else signal.SIGKILL)


class AcceptWorker(PoolWorker):
    """One worker: accept, serve the connection to its end, accept again."""

    def __init__(
        self, listener: socket.socket, config: ServerConfig, report: ReportPipe, log: Log
    ) -> None:
        super().__init__(config, report, log)
        self.listener = listener

    def run(self) -> int:
        acceptor = Acceptor(self.listener, self.log)
        poller = select.epoll()
        poller.register(self.signal_queue.fileno(), select.EPOLLIN)
        registered = False
        while not self.stopping:
            now = time.monotonic()
            want = not acceptor.paused(now)
            if want != registered:
                if want:
                    # EPOLLEXCLUSIVE cannot be modified, only added: (un)register to pause.
                    poller.register(self.listener, select.EPOLLIN | select.EPOLLEXCLUSIVE)
                else:
                    poller.unregister(self.listener)
                registered = want
            timeout = acceptor.paused_until - now if acceptor.paused(now) else -1
            for fd, _ in poller.poll(timeout):
                if fd == self.signal_queue.fileno():
                    self.on_housekeeping(fd)
                elif not self.serve_one(acceptor):
                    break
        # Stopping: serve what the kernel already queued, then leave.
        while self.serve_one(acceptor):
            pass
        return process.EXIT_OK

    def serve_one(self, acceptor: Acceptor) -> bool:
        shed = acceptor.shed
        request = acceptor.accept()
        if acceptor.shed > shed:
            self.report.shed(acceptor.shed - shed)
        if request is None:
            return False
        conn, _ = request
        self.report.accepted()
        outcome, bytes_in, bytes_out = echo(conn, self.config.idle_timeout, self.log, self)
        conn.close()
        self.report.ended(outcome, bytes_in, bytes_out)
        return True
