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
import os

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


def echo(fd: int, serving: Serving) -> tuple[str, int, int]:
    """Serve one connection; returns (outcome, bytes_in, bytes_out). Never raises OSError."""
    readv, write = os.readv, os.write
    buffers, view = serving.buffers, serving.view
    tracing = serving.tracing
    log = serving.log
    bytes_in = bytes_out = last = 0
    out = view  # replaced by view[:n] at the first message (n > 0 differs from last = 0)
    serving.current = fd
    if serving.cut:  # the grace period ran out between accept() and here
        serving.current = -1
        return stats.STOPPED, 0, 0
    try:
        while True:
            n = readv(fd, buffers)
            if not n:
                break
            bytes_in += n
            if n != last:
                out, last = view[:n], n
            if tracing:
                log.trace(f"The message from client: {printable(bytes(out))}")
            sent = write(fd, out)
            if sent != n:
                sent += _write_rest(fd, view, sent, n)
            bytes_out += sent
            if tracing:
                log.trace("send() is OK")
    except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO: no progress for --idle-timeout
        outcome = stats.STOPPED if serving.cut else stats.IDLE_TIMEOUT
        if tracing:
            log.trace(f"closing the connection: {outcome}")
        return outcome, bytes_in, bytes_out
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        if serving.cut:
            return stats.STOPPED, bytes_in, bytes_out
        if tracing:
            log.trace("the client reset the connection")
        return stats.RESET, bytes_in, bytes_out
    except OSError as exc:
        if exc.errno in PEER_GONE:
            return stats.RESET, bytes_in, bytes_out
        if tracing:
            log.trace(f"socket error: {exc}")
        return stats.ERROR, bytes_in, bytes_out
    finally:
        serving.current = -1
    if serving.cut:  # the grace period's shutdown() ended it, not the client
        if tracing:
            log.trace(f"closing the connection: {stats.STOPPED}")
        return stats.STOPPED, bytes_in, bytes_out
    if tracing:
        log.trace("the client closed the connection")
    return stats.COMPLETED, bytes_in, bytes_out


def _write_rest(fd: int, view: memoryview, sent: int, n: int) -> int:
    """A short write (a big message, or a signal mid-write): send the rest; EAGAIN after no
    progress for the timeout propagates as the idle timeout."""
    more = 0
    while sent + more < n:
        more += os.write(fd, view[sent + more : n])
    return more
