"""fork — the classic Unix server: fork() a child per connection.

The child inherits the connected socket (and everything else) as a copy of the parent; it
serves the connection and exits. The parent closes its copy at once — the connection stays open
because the child still holds a descriptor for it — and goes back to accept().

What a connection costs beyond the echo: the parent's ``accept``, ``fork`` (the kernel copies
the parent's page tables and descriptor table; memory itself is shared copy-on-write until
someone writes — so the child writes as little as it can: the echo buffer was allocated once in
the parent, and a short message dirties one page of it) and ``close``; the child's
``close_range`` of what it must not hold (the listening socket above all: a child holding it
would keep the port open after the parent closed it) and its exit; the parent's ``wait4`` when
SIGCHLD wakes it. The child's counts go to a slot of shared memory, not through a pipe. It does
not ask to die with the parent (one connection, bounded by the idle timeout, like ``spawn``).
"""

from __future__ import annotations

import errno
import gc
from typing import ClassVar

from lab.sockets import process
from lab.sockets.base import Server
from lab.sockets.echo import echo
from lab.sockets.serving import Serving
from lab.sockets.stats import SPAWN_FAILED


class ForkServer(Server):
    name = "fork"
    summary = "fork() a child per connection; the child serves it and exits"
    origin = "the classic Unix variant; Stevens UNP ch. 30 server 1"
    family = "fork"
    # parent: accept4, clone, close, wait4 (+ the SIGCHLD wake-up, shared by the children a
    # wake-up reaps); child: close_range ×2, the EOF readv, close, exit_group
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 1,
        "clone": 1,
        "close": 2,
        "readv": 1,
    }

    def counter_slots(self) -> int:
        return self.config.max_children + 1  # and the template's

    def start(self) -> None:
        # One Serving (and its 64 KiB buffer) made here, before any fork: each child uses its
        # copy, so a child allocates nothing and dirties only the pages it writes.
        self.template = Serving(self.config, self.log, self.counters.assign())
        # Objects that exist now never need the cycle collector again: gc.freeze() keeps a
        # collection in a child from touching (and so copying) every page of the parent's heap.
        gc.freeze()

    def accepting(self) -> bool:
        # At --max-children, stop accepting: new clients wait in the backlog meanwhile.
        return len(self.children) < self.config.max_children

    def process_request(self, fd: int) -> None:
        slot = self.counters.assign()
        slot.received()  # its one connection: what its death would cost
        serving = self.template

        def child() -> int:
            serving.slot = slot
            serving.own_signals()  # SIGTERM: finish within --grace; SIGALRM: cut
            outcome, bytes_in, bytes_out = echo(fd, serving)
            slot.ended(outcome, bytes_in, bytes_out)
            return process.EXIT_OK

        try:
            pid = process.fork(child, keep_fds=(fd,))
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
