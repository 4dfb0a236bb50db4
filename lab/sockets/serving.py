"""A process that serves connections itself, and how it is stopped without a system call per
message.

The hot path is blocking system calls and nothing else: ``accept()`` (or ``recvmsg()``), then per
message one ``recv`` and one ``send``, then ``close()``. Everything the lab adds rides on the
kernel or on signals, so it costs nothing while nothing happens:

* **Idle timeout**: ``SO_RCVTIMEO``/``SO_SNDTIMEO`` set once on the *listening* socket are
  inherited by every accepted socket on Linux (and travel with a descriptor passed by
  ``SCM_RIGHTS``: the option belongs to the socket). A ``recv`` with no data for that long fails
  with EAGAIN — that is the idle timeout, with no ``poll()`` and no clock read per message.
* **Stop (SIGTERM)**: the handler notes the deadline (``--grace``) and arms ``ITIMER_REAL`` for
  it. The connection in hand goes on undisturbed; the loop looks at :attr:`Serving.stopping`
  only between connections.
* **Grace over (SIGALRM)**: the handler ``shutdown()``s the connection in hand, so the blocked
  ``recv`` returns at once; the loop sees :attr:`Serving.cut` and counts it *stopped*.
* **Blocking in accept()**: PEP 475 retries a ``recv``/``accept`` that a signal interrupted,
  after running the handler, so a flag set by the handler would not be looked at until the next
  client came. A process that must leave such a wait marks it :attr:`Serving.interruptible`;
  there (and only there) the handler raises :class:`Interrupted`, which aborts the call. Two
  races remain, both handled where the wait is written: the signal can land just *before* the
  process enters the system call (the C handler ran, the Python one will not run until the call
  returns: the classic race ``pselect()`` exists for — the kernel timeout bounds it, and a
  supervising parent repeats its SIGTERM), and just *after* ``accept()`` returned a descriptor
  (the handler runs before the result is stored: the descriptor number is known, see
  :func:`adopt_lost`).
* **Statistics**: counts go to the process's slot in shared memory (:mod:`lab.sockets.stats`).
* **Tracing off**: every trace call is behind ``if tracing``, so no message is formatted.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable

from lab.sockets import signals
from lab.sockets.config import ServerConfig
from lab.sockets.log import Log
from lab.sockets.signals import Interrupted
from lab.sockets.stats import Slot

BUFFER_SIZE = 64 * 1024  # per process, fixed: the most one recv() takes and one send() owes


def set_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` (struct timeval); None clears them (a zero timeval
    means "never"; any positive value is at least one clock tick)."""
    if seconds is None:
        timeval = struct.pack("ll", 0, 0)
    else:
        seconds = max(seconds, 1e-6)
        timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def shutdown_fd(fd: int) -> None:
    """shutdown(SHUT_RDWR) of a descriptor we hold as a number (via a duplicate)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as dup:
            dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or reset: nothing to cut


def lowest_free_fd() -> int:
    """The descriptor number the next accept() will return (the kernel takes the lowest); -1
    when the process has none free (EMFILE): then no accept() can return one to lose either,
    and :func:`adopt_lost` of -1 is False."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    os.close(fd)
    return fd


def adopt_lost(fd: int) -> bool:
    """Whether ``fd`` is an open socket: an accept() whose result the handler's exception
    dropped (the process held no descriptor with that number before the call)."""
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


class Serving:
    """The state of one process that serves connections: the signal policy above, the
    connection in hand, the scratch buffer, and the process's counters."""

    def __init__(
        self,
        config: ServerConfig,
        log: Log,
        slot: Slot,
        stop_signals: Iterable[int] = (signal.SIGTERM,),
        repeat_cuts: bool = False,
    ) -> None:
        self.grace = config.grace
        self.idle_timeout = config.idle_timeout  # what an echo's slow write may take in all
        self.log = log
        self.tracing = log.tracing
        self.slot = slot
        self.stop_signals = frozenset(stop_signals)
        # A second stop request ends the grace period at once (a server told twice); a pool
        # worker's parent repeats SIGTERM on purpose (see multi_accept), so there it does not.
        self.repeat_cuts = repeat_cuts
        self.current = -1  # the descriptor being served
        self.stopping = False
        self.deadline: float | None = None  # monotonic; set when a stop was requested
        self.cut = False  # the grace period ran out
        self.interruptible = False
        self.on_usr1: Callable[[], None] | None = None
        self.buffers = [bytearray(BUFFER_SIZE)]  # a list, as os.readv() takes it
        self.view = memoryview(self.buffers[0])

    def own_signals(self) -> None:
        """Become the owner of the inherited handlers (a forked child, already detached from
        its parent's wake-up pipe by process.fork: no system call)."""
        signals.set_owner(self.on_signal)

    def on_signal(self, signum: int) -> None:
        if signum in self.stop_signals:
            self.request_stop()
        elif signum == signal.SIGALRM:
            self.grace_over()
        elif signum == signal.SIGUSR1 and self.on_usr1 is not None:
            self.on_usr1()
        if self.interruptible and self.stopping:
            self.interruptible = False
            raise Interrupted

    def request_stop(self) -> None:
        if self.stopping:
            if self.repeat_cuts:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.grace_over()
            return  # otherwise a repeated SIGTERM does not move the deadline
        self.stopping = True
        self.deadline = time.monotonic() + self.grace
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 1e-3))

    def grace_over(self) -> None:
        if not self.stopping:
            return
        self.cut = True
        if self.current >= 0:
            shutdown_fd(self.current)
