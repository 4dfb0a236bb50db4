"""fork — the classic Unix server: fork() a child per connection.

The child inherits the connected socket (and everything else) as a copy of the parent; it
serves the connection and exits. The parent closes its copy at once — the connection stays open
because the child still holds a descriptor for it — and goes back to accept().
"""

from __future__ import annotations

import errno
import socket

from lab.sockets import process
from lab.sockets.base import Server
from lab.sockets.echo import echo
from lab.sockets.stats import SPAWN_FAILED


class ForkServer(Server):
    name = "fork"
    summary = "fork() a child per connection; the child serves it and exits"
    origin = "the classic Unix variant; Stevens UNP ch. 30 server 1"
    family = "fork"

    def accepting(self) -> bool:
        # At --max-children, stop accepting: new clients wait in the backlog meanwhile.
        return len(self.children) < self.config.max_children

    def process_request(self, conn: socket.socket, address: object) -> None:
        def child() -> int:
            outcome, bytes_in, bytes_out = echo(conn, self.config.idle_timeout, self.log, None)
            self.report.ended(outcome, bytes_in, bytes_out)
            return process.EXIT_OK

        try:
            pid = process.fork(child, keep_fds=(conn.fileno(), self.report.write_fd))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise
            self.stats.failed[SPAWN_FAILED] += 1
            self.log.notice(f"fork() failed ({exc.strerror}): closing the connection, backing off")
            self.acceptor.pause()
            return
        self.children[pid] = "child"
        self.report.opened(pid)
        self.log.trace(f"fork() is OK: child {pid} serves the connection")
