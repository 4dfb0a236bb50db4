"""thread — a thread per connection, at most ``--max-threads`` at once.

The main thread accepts, as in ``fork``, and starts a thread for each connection instead of a
process: the thread serves the connection with the usual blocking echo, closes it and ends.
Nothing is copied — the thread shares the process's memory and descriptor table, so the
connection needs no hand-off, no ``close_range()`` and no ``close()`` of a parent's copy — and
nothing is reaped: a thread that ends puts its serving state back for the next one. This is
Stevens' server 6 (``pthread_create()`` per client) and what ``socketserver.ThreadingTCPServer``
does, with a cap: at ``--max-threads`` connection threads the main thread stops accepting, and new
clients wait in the listen backlog (their handshake done by the kernel) until one ends — the
thread that ends then writes one byte to the wake pipe, the only time it does.

What a connection costs beyond the echo (``syscalls_per_connection``, held by
tests/test_syscall_budget.py): the main thread's ``accept4`` (and, when the queue is empty, the
``accept4`` that says EAGAIN and the ``poll()`` that waits), two ``rt_sigprocmask`` around the
start (the thread is born with every signal blocked, so signals reach the main thread: see
:mod:`lab.sockets.threads`), the ``clone3`` that creates it; the thread's ``close``, the C
library's ``madvise`` of its stack when it ends (stacks are cached and reused, so no ``mmap``),
and its ``exit``; and ``futex`` calls where the new thread and the main thread pass the GIL to
each other (the new thread wants it while the main thread still runs). The serving states — each
with its 64 KiB buffer and its slot of the counters — are made the first time that many threads
run at once and reused after: a connection allocates no buffer.

The GIL: the threads' system calls overlap, their Python code does not — one core's worth of
interpreter for every connection together (:mod:`lab.sockets.threads`).
"""

from __future__ import annotations

import os

from lab.sockets.stats import SPAWN_FAILED
from lab.sockets.threads import ThreadServer, ThreadServing, start_thread

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar


class ThreadPerConnectionServer(ThreadServer):
    name = "thread"
    summary = "a thread per connection, at most --max-threads at once; at the cap, the backlog"
    origin = "Stevens UNP ch. 30 server 6 (a thread per client); socketserver.ThreadingTCPServer"
    model = "a thread per connection"
    pool_of = None  # --workers does not apply: threads come and go with the connections
    per_worker_stats = False  # each thread serves one connection: nothing to spread
    serial_options = ("--max-threads", "1")
    # Per connection with one message (tests/test_syscall_budget.py; measured: 24 in all with no
    # contention). Main thread: accept4 (+ one EAGAIN and a poll when the queue is empty), clone3,
    # rt_sigprocmask x6 (our two around the start; the C library's pthread_create blocks and
    # restores signals around clone3, the new thread sets its mask, and blocks all at its exit).
    # The thread: the message's readv and write, the EOF readv, close; the interpreter's own
    # per-thread work (gettid for the thread's native id, an mmap'd frame stack it unmaps at the
    # end); the C library's madvise of the cached stack and exit. futex: the GIL passed between
    # the new thread and the main thread — 4 on an idle machine, up to 10 when the machine is
    # busy (a thread that waits for the GIL while the holder is descheduled waits again; 10.2
    # seen in CI), so 12.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 2,
        "poll": 1,
        "rt_sigprocmask": 6,
        "clone3": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
        "madvise": 1,
        "exit": 1,
        "futex": 12,
        "mmap": 1,
        "munmap": 1,
        "gettid": 1,
    }

    def counter_slots(self) -> int:
        return self.config.max_threads + 1

    thread_per_connection = True  # kv: a Store per connection, closed as it ends

    def start(self) -> None:
        # Serving states of threads that ended, ready for the next connection. list.append and
        # list.pop are atomic under the GIL: threads give back, the main thread takes.
        self.idle: list[ThreadServing] = []

    def accepting(self) -> bool:
        # At --max-threads, stop accepting: new clients wait in the backlog meanwhile.
        if self.idle or len(self.states) < self.config.max_threads:
            self.room_wanted = False
            return True
        self.room_wanted = True  # the next thread that ends writes the wake pipe …
        if self.idle:  # … unless one ended between the check and the flag
            return True
        return self.at_cap(self.config.max_threads, "--max-threads")

    def process_request(self, fd: int) -> None:
        state = self.idle.pop() if self.idle else self.new_state()
        state.held = fd  # the thread owns it from here: it closes it
        try:
            start_thread(lambda: self.run_thread(state, self.serve))
        except RuntimeError as exc:  # EAGAIN: a pids limit, or memory
            state.held = -1
            os.close(fd)
            self.idle.append(state)
            self.stats.failed[SPAWN_FAILED] += 1
            self.log.notice(f"cannot start a thread ({exc}): closing the connection, backing off")
            self.acceptor.pause()
            return
        if self.tracing:
            self.log.trace("pthread_create() is OK: a thread serves the connection")

    def close_request(self, fd: int) -> None:
        pass  # the connection's thread closes it (one process, one descriptor table)

    def serve(self, state: ThreadServing) -> None:
        """The connection thread's life: serve its one connection."""
        fd, slot = state.held, state.slot
        slot.received()  # what its death would cost
        if state.tracing:
            state.log.trace(f"thread {state.tid} serves the connection")
        self.service(fd, state)
        os.close(fd)
        state.held = -1

    def thread_ended(self, state: ThreadServing) -> None:
        if state.crash is not None:
            self.ended.append(state)
            self.wake.wake()
            return
        self.idle.append(state)
        if self.room_wanted or self.stopping:
            self.wake.wake()

    def thread_exited(self, state: ThreadServing) -> None:
        """A connection thread raised: its connection was closed for it (worker_died); its
        state gets a fresh slot and serves the next connection."""
        self.forget(state)
        self.log.notice(f"thread {state.tid} raised {state.crash}: its connection was closed")
        self.fresh_slot(state)
        state.crash, state.tid = None, 0
        self.states.append(state)
        self.idle.append(state)

    def busy(self) -> bool:
        return len(self.idle) < len(self.states)

    def in_flight_states(self) -> list[ThreadServing]:
        idle = set(map(id, self.idle))
        return [s for s in self.states if id(s) not in idle]
