"""A supervising process that waits for connections in ``accept()``, not in ``poll()``.

Why: a poll loop pays, per wake-up, a ``poll()`` and — each time the queue runs dry — an
``accept()`` that says EAGAIN (an exception in Python). Measured on the sendmsg server's
parent: about a fifth of the design's CPU per connection. A process blocked in ``accept()``
is woken by the kernel with the connection in hand: one system call per connection.

How the loop's other duties still get done. The server keeps its ``poll()`` loop (signals,
children, health probes, timers) and enters the blocking wait from it when the listening
socket is readable — :meth:`BlockingAccept.accept_ready`, the one step this mixin overrides.
It stays in ``accept()``, connection after connection, until something needs the loop:

* **A signal.** The signal queue's handler raises :class:`~lab.sockets.signals.Interrupted`
  while the wait is interruptible, which aborts the ``accept()`` (PEP 475 would retry it).
* **The race ``pselect()`` exists for**: a signal that lands after the last look at the queue
  and before the thread is inside ``accept()`` runs no Python handler until ``accept()``
  returns — the next client, or the listening socket's ``SO_RCVTIMEO`` (the idle timeout).
  A *watchman* thread closes it. It has every signal blocked (the kernel never runs a handler
  on it) and sleeps in ``poll()`` on the signal pipe and the health port; when either has
  something while the main thread is in the blocking wait, it sends the main thread
  ``SIGURG`` (``pthread_kill``), whose handler raises, and looks again 20 ms later until the
  main thread has taken it. SIGURG because nothing else sends it here (the kernel does only
  for out-of-band data to a socket's owner, ``F_SETOWN``, which we never set) and its default
  is to ignore it; Go's runtime picked it for the same reason.
* **A health probe**: the same kick; the poll loop answers it.
* **Timers**: with one due (a respawn back-off) the loop does not block; otherwise the idle
  timeout's ``SO_RCVTIMEO`` ends an ``accept()`` that waited that long.
* **A connection lost to the raise**: the handler may raise just as ``accept()`` returned,
  dropping the descriptor number. The kernel gave the lowest free one, and the wait holds no
  other descriptor open across connections, so that number is known in advance
  (:func:`~lab.sockets.serving.adopt_lost`).

What it costs: in the steady state nothing beyond ``accept()`` — the watchman sleeps in
``poll()`` and never takes the GIL. Entering the wait costs an ``ioctl(FIONBIO)`` (the
listening socket is blocking only inside it) and an ``open``/``close`` of ``/dev/null`` (to
learn the lowest free descriptor number), leaving it another ``ioctl`` (and an ``fstat`` after
an interruption); that happens only after a signal, a probe or a timer.
"""

from __future__ import annotations

import select
import signal
import threading
import time

from lab.sockets import signals
from lab.sockets.base import Server
from lab.sockets.serving import adopt_lost, lowest_free_fd
from lab.sockets.signals import Interrupted

KICK = signal.SIGURG
LOOK_AGAIN = 0.02  # seconds: how soon the watchman looks again after a kick

_STOP, _LOST, _FAILED = -1, -2, -3  # BlockingAccept._wait(): why no descriptor came


class Watchman:
    """The thread that makes sure a signal or a probe reaches a main thread blocked in
    ``accept()`` (see the module docstring)."""

    def __init__(self, fds: list[int]) -> None:
        self.blocked = False  # the main thread is in the blocking wait (set by it, read here)
        self.closing = False
        self.main = threading.main_thread().ident or 0
        self.fds = fds

    def start(self) -> None:
        mask = signals.block_all()  # the thread inherits the mask; the main thread keeps its own
        try:
            threading.Thread(target=self._watch, name="watchman", daemon=True).start()
        finally:
            signals.restore(mask)

    def _watch(self) -> None:
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        while not self.closing:
            try:
                poller.poll()  # level-triggered: returns at once while something waits
            except OSError:
                return  # a descriptor went away: the server is closing
            if self.closing:
                return
            if self.blocked:
                try:
                    signal.pthread_kill(self.main, KICK)
                except OSError:
                    return
            # Either way the main thread takes what waits: give it the time to.
            time.sleep(LOOK_AGAIN)


class BlockingAccept(Server):
    """Mixin for a :class:`~lab.sockets.base.Server` whose loop accepts: wait in ``accept()``
    while nothing else needs the loop (see the module docstring)."""

    def start(self) -> None:
        super().start()
        signals.install((KICK,), self.signal_queue.record)
        fds = [self.signal_queue.fileno()]
        if self.health is not None:
            fds.append(self.health.fileno())
        self.watchman = Watchman(fds)
        self.watchman.start()

    def may_block(self) -> bool:
        """Whether to wait in ``accept()`` now: nothing else due, nothing else watched."""
        if self.stopping or not self.accepting() or self._extra:
            return False
        now = time.monotonic()
        return not self.acceptor.paused(now) and self.poll_timeout(now) is None

    def accept_ready(self) -> None:
        if not self.may_block():
            super().accept_ready()
            return
        listener = self.listener
        listener.setblocking(True)
        self.watchman.blocked = True
        try:
            self._serve_blocking()
        finally:
            self.watchman.blocked = False
            listener.setblocking(False)
        if self.signal_queue.recorded():
            # What ended the wait, now: a signal's byte may already have been read with an
            # earlier one's, and a recorded signal with no byte would never wake the poll().
            self.on_signals()

    def _serve_blocking(self) -> None:
        """accept → handle, until a signal, a probe, a stop or the design's cap. The except
        clauses only store (CPython runs a handler at a call or a backward jump, at neither of
        these), so the handler cannot raise again inside them."""
        queue, hand_off = self.signal_queue, self.hand_off
        accept = self.listener._accept  # type: ignore[attr-defined]
        pending = queue.recorded_list  # the handler appends to this very list
        expected = lowest_free_fd()
        failure: OSError | None = None
        while True:
            queue.interruptible = True
            try:
                fd = _STOP if pending else accept()[0]
            except Interrupted:
                fd = _LOST
            except OSError as exc:  # BlockingIOError too: SO_RCVTIMEO ran out
                fd, failure = _FAILED, exc
            finally:
                queue.interruptible = False
            if fd < 0:
                if fd == _LOST and adopt_lost(expected):
                    fd = expected
                elif fd == _FAILED and not isinstance(failure, BlockingIOError):
                    assert failure is not None
                    fd = self.accept_failed(failure)
                    if fd is None:
                        return
                else:
                    return  # back to the loop: it handles what came
            elif self.acceptor.backoff:
                self.acceptor._recovered()
            if self.tracing:
                self.log.trace("accept() is OK")
            if not hand_off(fd):
                return

    def hand_off(self, fd: int) -> bool:
        """Deal with one accepted connection; whether to go on waiting in accept(). A design
        may override it with a flatter path for its steady state."""
        self.handle(fd)
        return not self.stopping and self.accepting()

    def accept_failed(self, exc: OSError) -> int | None:
        """The Acceptor's policy (shed with the spare, back off) for a failed accept(): a
        connection it took instead, or None (the loop then honours any back-off)."""
        fd, shed = self.acceptor.after_failure(exc)
        self.stats.accepted += shed
        self.stats.shed += shed
        return fd

    def close(self) -> None:
        watchman = getattr(self, "watchman", None)
        if watchman is not None:
            watchman.closing = True
        super().close()
