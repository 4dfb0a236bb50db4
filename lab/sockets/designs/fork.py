"""fork — the classic Unix server: fork() a child per connection.

The child inherits the connected socket (and everything else) as a copy of the parent; it
serves the connection and exits. The parent closes its copy at once — the connection stays open
because the child still holds a descriptor for it — and goes back to accept().

What a connection costs beyond the echo: the parent's ``accept``, ``fork`` (the kernel copies
the parent's page tables and descriptor table; memory itself is shared copy-on-write until
someone writes — so the child writes as little as it can: the echo buffer was allocated once in
the parent, and a short message dirties one page of it) and ``close``; the child's
``close_range`` of what it must not hold (the listening socket above all: a child holding it
would keep the port open after the parent closed it), its ``prctl`` to die with the parent, and
its exit; the parent's ``wait4``. The parent reaps as ``socketserver.ForkingMixIn`` does — after
each batch of accepts, and every :data:`REAP_EVERY` seconds while children live — and does not
catch SIGCHLD, so a child's exit costs no signal delivery and no wake-up. The child's counts go
to a slot of shared memory, not through a pipe.
"""

from __future__ import annotations

import errno
import gc
import os
import signal

from lab.sockets import process, services
from lab.sockets.serving import Serving
from lab.sockets.stats import SPAWN_FAILED
from lab.sockets.supervise import ChildProcesses

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar


class ForkServer(ChildProcesses):
    name = "fork"
    summary = "fork() a child per connection; the child serves it and exits"
    origin = "the classic Unix variant; Stevens UNP ch. 30 server 1"
    family = "fork"
    model = "a process per connection"
    serial_options = ("--max-children", "1")
    # Per connection with one message (tests/test_syscall_budget.py). Parent: accept4 (+ one
    # EAGAIN and a poll when the queue is empty), clone, close, wait4 (+ one that finds no child
    # ended). Child: close_range, prctl (die with the parent), the message's readv and write,
    # the EOF readv (the C library's and interpreter's own fork work — gettid, set_robust_list —
    # is theirs).
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 2,
        "poll": 1,
        "clone": 1,
        "close": 1,
        "wait4": 2,
        "close_range": 1,
        "prctl": 1,
        "readv": 2,
        "write": 1,
    }

    def counter_slots(self) -> int:
        return self.config.max_children + 1  # and the template's

    REAP_EVERY = 0.5  # seconds, while children live and no connection comes
    REAP_AT_CAP = 0.01  # at --max-children: how soon a freed place is seen

    def start(self) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # reaped in the loop (see above)
        self.pid = os.getpid()
        queue_fds = self.signal_queue.fds()
        spare = self.acceptor.spare if self.acceptor.spare is not None else -1
        health = self.health.fileno() if self.health is not None else -1
        self.highest_fd = max(self.listener.fileno(), health, spare, *queue_fds)
        # One Serving (and its 64 KiB buffer) made here, before any fork: each child uses its
        # copy, so a child allocates nothing and dirties only the pages it writes.
        self.template = Serving(self.config, self.log, self.counters.assign())
        # kv: each child opens its own Store at its connection (never the parent's: a sqlite3
        # connection must not cross fork()), so a kv connection also pays that open.
        self.service = services.for_config(self.config)
        # Objects that exist now never need the cycle collector again: gc.freeze() keeps a
        # collection in a child from touching (and so copying) every page of the parent's heap.
        gc.freeze()

    def accepting(self) -> bool:
        # At --max-children, stop accepting: new clients wait in the backlog meanwhile.
        if len(self.children) < self.config.max_children:
            return True
        return self.at_cap(self.config.max_children, "--max-children")

    def poll_timeout(self, now: float) -> float | None:
        timeout = super().poll_timeout(now)
        if self.children:
            every = self.REAP_EVERY if self.accepting() else self.REAP_AT_CAP
            timeout = every if timeout is None else min(timeout, every)
        return timeout

    def tick(self) -> None:
        if self.children:  # after every wake-up: a batch of accepts, or the timeout
            self.handle_chld()

    def stop_poll_interval(self) -> float:
        return self.REAP_AT_CAP

    def process_request(self, fd: int) -> None:
        slot = self.counters.assign()
        slot.received()  # its one connection: what its death would cost
        serving, serve = self.template, self.service

        def child() -> int:
            serving.slot = slot
            serving.own_signals()  # SIGTERM: finish within --grace; SIGALRM: cut
            serve(fd, serving)
            return process.EXIT_OK

        try:
            pid = process.fork(child, keep_fds=(fd,), parent=self.pid, highest_fd=self.highest_fd)
        except OSError as exc:
            self.counters.release(slot)
            if exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise
            self.stats.failed[SPAWN_FAILED] += 1
            self.log.notice(f"fork() failed ({exc.strerror}): closing the connection, backing off")
            self.acceptor.pause()
            return
        self.counters.bind(slot, pid)
        self.children[pid] = "child"
        if self.tracing:
            self.log.trace(f"fork() is OK: child {pid} serves the connection")
