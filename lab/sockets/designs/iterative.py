"""iterative — one process, one connection at a time.

While it serves one client, the others wait in the listen backlog: their handshake is complete
(the kernel did it), their data sits in the socket's receive buffer, and nobody answers until
the current client closes. Beyond the backlog, Linux drops new SYNs and the clients' kernels
retransmit them (after about 1, 3, 7 … s) — a delay, not a refusal. (With SYN cookies on,
net.ipv4.tcp_syncookies, an overloaded queue may instead answer with a cookie and reset the
client later; the lab's server container turns them off.)
"""

from __future__ import annotations

import os
import socket

from lab.sockets.base import Server
from lab.sockets.echo import echo


class IterativeServer(Server):
    name = "iterative"
    summary = "one process: accept, serve the whole connection, close, accept the next"
    origin = "the chapter's iterative server; Stevens UNP ch. 30 server 0"
    default_backlog = 5  # the original program's listen(sock, 5)
    per_worker_stats = True

    def process_request(self, conn: socket.socket, address: object) -> None:
        outcome, bytes_in, bytes_out = echo(conn, self.config.idle_timeout, self.log, self)
        self.stats.ended(outcome, bytes_in, bytes_out, worker=os.getpid())
