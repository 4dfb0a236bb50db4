"""The echo service every design runs: each byte received is sent back, in order.

One connection is served until the client closes its side (recv() returns b""), the connection
makes no progress either way for ``idle_timeout`` seconds, or the server is stopping and its
grace period ran out. Memory is one fixed buffer: while the echo of one read is not yet sent we
do not read more, so a client that sends without reading fills its own socket buffers and TCP's
flow control (the receive window) stops it — back-pressure instead of an unbounded queue.

The socket is non-blocking and every wait is a ``poll()`` that also watches the process's signal
pipe (and the health port), so SIGTERM, SIGUSR1 and health probes are handled while a long
connection is being served.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Protocol

from lab.sockets import stats
from lab.sockets.log import Log, printable

BUFFER_SIZE = 64 * 1024  # per connection, fixed: the most one recv() takes and one send() owes


class Host(Protocol):
    """What the echo loop needs from the process running it."""

    def housekeeping_fds(self) -> tuple[int, ...]:
        """Descriptors to watch while serving: the signal pipe, the health port …"""

    def on_housekeeping(self, fd: int) -> None:
        """One of them is readable (a signal may set ``stop_deadline``)."""

    @property
    def stop_deadline(self) -> float | None:
        """Monotonic time by which a stopping server must be done (None: not stopping)."""


def echo(
    sock: socket.socket, idle_timeout: float, log: Log, host: Host | None
) -> tuple[str, int, int]:
    """Serve one connection; returns (outcome, bytes_in, bytes_out). Never raises OSError."""
    sock.setblocking(False)
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    bytes_in = bytes_out = 0
    owed = sent = 0  # buf[sent:owed] is received but not yet echoed
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    housekeeping = host.housekeeping_fds() if host is not None else ()
    for fd in housekeeping:
        poller.register(fd, select.POLLIN)
    last_progress = time.monotonic()
    try:
        while True:
            # Optimistic I/O: try the call first, poll only when it would block.
            try:
                if sent < owed:
                    n = sock.send(view[sent:owed])
                    bytes_out += n
                    sent += n
                    if sent == owed:
                        log.trace("send() is OK")
                        owed = sent = 0
                        poller.modify(sock, select.POLLIN)
                    last_progress = time.monotonic()
                    continue
                n = sock.recv_into(view)
                if n == 0:  # the client closed its side and everything is echoed
                    log.trace("the client closed the connection")
                    return stats.COMPLETED, bytes_in, bytes_out
                log.trace(f"The message from client: {printable(bytes(view[:n]))}")
                bytes_in += n
                owed, sent = n, 0
                poller.modify(sock, select.POLLOUT)
                last_progress = time.monotonic()
                continue
            except (BlockingIOError, InterruptedError):
                pass
            deadline = last_progress + idle_timeout
            stop = host.stop_deadline if host is not None else None
            if stop is not None:
                deadline = min(deadline, stop)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = (
                    stats.STOPPED if stop is not None and stop <= deadline else stats.IDLE_TIMEOUT
                )
                log.trace(f"closing the connection: {outcome}")
                return outcome, bytes_in, bytes_out
            for fd, _ in poller.poll(remaining * 1000):
                if host is not None and fd in housekeeping:
                    host.on_housekeeping(fd)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        log.trace("the client reset the connection")
        return stats.RESET, bytes_in, bytes_out
    except OSError as exc:
        if exc.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return stats.RESET, bytes_in, bytes_out
        log.trace(f"socket error: {exc}")
        return stats.ERROR, bytes_in, bytes_out
