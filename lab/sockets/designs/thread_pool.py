"""thread-pool — the main thread accepts; N threads, started once, take the connections from a
bounded queue.

Stevens' server 8 (the main thread accepts and stores each descriptor in an array that the
pool threads take from, under a mutex and a condition variable) and gunicorn's ``gthread``
worker. The hand-off is a queue in memory: one process, one descriptor table, so a descriptor is
just a number the main thread puts and a pool thread gets — the same hand-off ``sendmsg`` makes
through the kernel with ``SCM_RIGHTS``, for the price of a lock.

The queue is a ``queue.Queue`` — a mutex and a condition variable, one lock per waiting thread,
so a ``put()`` wakes exactly one waiting thread. (``queue.SimpleQueue``, in C and allocating
nothing per wait, was measured first: the thread that takes an item releases the lock every
idle thread waits on, so each ``get()`` woke all of them — about 19 ``futex`` per connection with
two threads, against 5.) It is bounded by the main thread: it holds at most
:data:`~ThreadPoolServer.QUEUE_PER_THREAD` × ``--workers`` descriptors, and when it is full the
main thread stops accepting — new clients wait in the listen backlog, as with every fixed pool —
until a pool thread takes one (that thread then writes one byte to the wake pipe, because the
main thread asked: the steady state never does). The main thread bounds it rather than the
queue's ``maxsize``: a ``put()`` of STOP at the end must never block the thread that handles
signals.

What a connection costs beyond the echo (``syscalls_per_connection``, held by
tests/test_syscall_budget.py): the main thread's ``accept4`` (and, when the queue is empty, the
``accept4`` that says EAGAIN and the ``poll()`` that waits); the pool thread's ``close``; and the
hand-off's ``futex`` calls — the ``put()``'s notify wakes the sleeping thread (a wake, and the
end of the thread's wait), and the woken thread takes the queue's mutex and the GIL from the main
thread. Nothing is created per connection but the waiting thread's lock, which the condition
variable allocates per wait.

Stopping: the main thread drains the listen queue into the queue (waiting for room), then puts
one STOP (``None``) per pool thread behind the descriptors, so everything queued is served first
(``sendmsg``'s order). At the deadline, what is in flight is shut down; descriptors still queued
are served at once as *stopped* (the threads see ``cut``), and any no thread took are closed by
the main thread and counted *stopped* too.
"""

from __future__ import annotations

import contextlib
import os
import queue

from lab.sockets.stats import STOPPED
from lab.sockets.threads import ThreadServer, ThreadServing

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

STOP = None  # what a pool thread gets to leave, behind everything queued before it


class ThreadPoolServer(ThreadServer):
    name = "thread-pool"
    summary = "the main thread accepts and hands each socket to N threads through a bounded queue"
    origin = "Stevens UNP ch. 30 server 8 (prethreaded, main thread accepts); gunicorn gthread"
    model = "a pool of threads fed by a queue"
    serial_options = ("--workers", "1")
    # How many descriptors may wait in the queue per pool thread; beyond, the backlog.
    # (Two: with one, a lone pool thread's queue would be full for a moment at every connection,
    # and the main thread would stop accepting and be woken for each.)
    QUEUE_PER_THREAD = 2
    # Per connection with one message (tests/test_syscall_budget.py). Main thread: accept4 (+ one
    # EAGAIN and a poll when the queue is empty). Pool thread: the message's readv and write, the
    # EOF readv, close. The hand-off: futex — the put()'s notify wakes the waiting thread (a
    # wake, and the end of its wait), the woken thread takes the queue's mutex and the GIL from
    # the main thread: 5 on an idle machine, up to 12 on a busy one (waits for a descheduled
    # holder repeat), so 14.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 2,
        "poll": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
        "futex": 14,
    }

    def start(self) -> None:
        self.handoff: queue.Queue[int | None] = queue.Queue()
        self.bound = self.QUEUE_PER_THREAD * self.config.pool_size
        self.maintain_pool()

    def ready_details(self) -> dict[str, object]:
        return {**super().ready_details(), "queue": self.bound}

    def accepting(self) -> bool:
        # Queue full: stop accepting; the clients wait in the backlog meanwhile.
        if self.handoff.qsize() < self.bound:
            self.room_wanted = False
            return True
        self.room_wanted = True  # the next thread that takes one writes the wake pipe …
        return self.handoff.qsize() < self.bound  # … unless one took one since the check

    def process_request(self, fd: int) -> None:
        if self.tracing:  # first: the thread that takes it may trace before we would
            self.log.trace("descriptor queued for the pool threads")
        self.handoff.put(fd)

    def close_request(self, fd: int) -> None:
        pass  # the pool thread that takes it closes it

    def thread_main(self, state: ThreadServing) -> None:
        """Take a descriptor, serve the connection to its end, take the next — until STOP."""
        get = self.handoff.get
        slot, tracing, serve = state.slot, state.tracing, self.service
        while True:
            fd = get()
            if fd is None:
                return
            state.held = fd
            slot.received()
            if self.room_wanted:
                self.wake.wake()
            if tracing:
                state.log.trace("got a connection from the queue")
            serve(fd, state)
            os.close(fd)
            state.held = -1

    # -- stopping ---------------------------------------------------------------------------
    def stop_threads(self) -> None:
        for _ in self.pool:
            self.handoff.put(STOP)

    def busy(self) -> bool:
        return bool(self.pool)

    def close(self) -> None:
        # Descriptors no thread took (every thread ended, or hung past the deadline): closed
        # here, counted stopped — they were accepted.
        with contextlib.suppress(queue.Empty):
            while True:
                fd = self.handoff.get_nowait()
                if fd is not None:
                    os.close(fd)
                    self.stats.failed[STOPPED] += 1
        super().close()
