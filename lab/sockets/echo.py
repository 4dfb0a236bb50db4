"""The echo service every design runs: each byte received is sent back, in order.

One connection is served until the client closes its side (``recv`` returns 0 bytes), it makes
no progress either way for ``--idle-timeout`` seconds (the kernel's ``SO_RCVTIMEO``/
``SO_SNDTIMEO``, inherited from the listening socket, make the call fail with EAGAIN), or the
server's grace period ran out (the SIGALRM handler shut the socket down; see
:mod:`lab.sockets.serving`).

The socket is blocking: per message exactly one ``readv()`` into the process's fixed buffer and
one ``write()`` of what came — no ``poll()``, no clock, no formatting, and no Python object
allocated by us in the steady state (the memoryview of the received bytes is made only when the
size differs from the last message's). While the echo of one read is not yet sent we do not read
more, so a client that sends without reading fills its own socket buffers and TCP's flow control
stops it: back-pressure instead of an unbounded queue, and memory is one buffer per process.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import socket
import struct
import termios
import time

from lab.sockets import stats
from lab.sockets.log import printable
from lab.sockets.serving import Serving

# errnos that mean the peer or the path went away: the connection ends as a reset, not a
# server error. Every design's policy (the event loops' too, through outcome_of).
PEER_GONE = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)


def outcome_of(exc: BaseException | None) -> str:
    """How an error ends a connection: the peer went away (``reset``) or anything else
    (``error``); no error is a connection the client closed (``completed``)."""
    if exc is None:
        return stats.COMPLETED
    if isinstance(exc, OSError) and exc.errno in PEER_GONE:
        return stats.RESET
    return stats.ERROR


def echo(fd: int, serving: Serving) -> str:
    """Serve one connection and count how it ended in ``serving.slot``; returns the outcome.
    Never raises OSError.

    The caller counts the connection as taken (``accepted``/``received``) and closes it — the
    designs differ there. The end is counted here, three stores to shared memory, so a design
    pays no second call and no tuple per connection for it."""
    readv, write = os.readv, os.write
    buffers, view = serving.buffers, serving.view
    tracing = serving.tracing
    bytes_in = bytes_out = last = 0
    out = view  # replaced by view[:n] at the first message (n > 0 differs from last = 0)
    if serving.cut:  # the grace period ran out between accept() and here
        outcome = stats.STOPPED
    else:
        serving.current = fd
        try:
            while True:
                n = readv(fd, buffers)
                if not n:
                    break
                bytes_in += n
                if n != last:
                    out, last = view[:n], n
                if tracing:
                    serving.log.trace(f"The message from client: {printable(bytes(out))}")
                sent = write(fd, out)
                if sent != n:
                    sent += write_rest(fd, view, sent, n, serving.idle_timeout)
                bytes_out += sent
                if tracing:
                    serving.log.trace("send() is OK")
            # The client closed its side — unless the grace period's shutdown() ended it.
            outcome = stats.STOPPED if serving.cut else stats.COMPLETED
        except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO: no progress for --idle-timeout
            outcome = stats.STOPPED if serving.cut else stats.IDLE_TIMEOUT
            abort_if_unsent(fd)
        except OSError as exc:
            outcome = stats.STOPPED if serving.cut else outcome_of(exc)
            if tracing and outcome == stats.ERROR:
                serving.log.trace(f"socket error: {exc}")
        finally:
            serving.current = -1
        if tracing:
            serving.log.trace(_TRACED.get(outcome, f"closing the connection: {outcome}"))
    slot = serving.slot
    cells, base = slot.cells, slot.base
    cells[base + _FIELD[outcome]] += 1
    cells[base + stats.BYTES_IN] += bytes_in
    cells[base + stats.BYTES_OUT] += bytes_out
    return outcome


_FIELD = stats.OUTCOME_FIELD
_TRACED = {
    stats.COMPLETED: "the client closed the connection",
    stats.RESET: "the client reset the connection",
}


def abort_if_unsent(fd: int) -> None:
    """Make the coming close() a reset when echo bytes are still unsent (a client that stopped
    reading): a plain close queues the FIN behind them, and with the client's window shut it
    never arrives — the client never learns, and the kernel keeps the orphaned socket and its
    buffer (megabytes) through its retries. A reset drops both at once. (Off the steady state:
    only when a connection is cut.)"""
    try:
        if struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0] > 0:
            sock = socket.socket(fileno=fd)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            finally:
                sock.detach()
    except OSError:
        pass  # gone already: close() has nothing to send either


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def write_rest(fd: int, view: memoryview, sent: int, n: int, limit: float) -> int:
    """A short write (a big message, or a signal mid-write): send the rest; EAGAIN after no
    progress for the timeout propagates as the idle timeout.

    ``SO_SNDTIMEO`` bounds each call, and a call that moved a byte returns what it moved: a
    client that never reads but whose kernel takes a few bytes now and then (its window opens
    a crack to TCP's zero-window probes) would restart it forever. So the rest of one echo may
    take ``limit`` seconds in all; past that, it is the idle timeout too. (The clock is read
    only here, off the steady state's path.)"""
    more = 0
    deadline = time.monotonic() + limit if limit > 0 else math.inf
    while sent + more < n:
        more += os.write(fd, view[sent + more : n])
        if sent + more < n and time.monotonic() > deadline:
            raise BlockingIOError(errno.EAGAIN, "the echo took longer than --idle-timeout")
    return more
