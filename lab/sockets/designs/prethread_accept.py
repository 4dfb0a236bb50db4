"""prethread-accept — N threads, started once, each blocking in accept() on one listening socket.

``multi-accept`` with threads instead of processes: Stevens' server 7. The main thread does
socket → bind → listen, starts ``--workers`` threads and only supervises; each thread loops
accept → serve → close. The kernel hands each connection to one of the threads blocked in
``accept()`` (exclusive waiters: one is woken per connection, no thundering herd). Nothing is
created or passed per connection, and nothing crosses a process boundary: a connection costs a
thread ``accept4``, its messages, the EOF ``readv`` and ``close`` — the design's own calls and
nothing else (5, as ``multi-accept``).

``--accept-lock mutex`` puts a ``threading.Lock`` around ``accept()``, as Stevens' server 7
does with a ``pthread_mutex``: one thread waits in ``accept()``, the others wait for the lock.
On Linux the kernel already wakes one waiter, so the lock adds work — the thread that leaves
``accept()`` releases the lock and a waiting thread must be woken for it, a ``futex`` wake and a
``futex`` wait per connection while other threads are idle — and it is there to measure that.
(``flock`` and ``sem`` are locks between processes: they belong to ``multi-accept``.)

The listening socket is made blocking and duplicated (:attr:`PrethreadAcceptServer.shared`): the
threads accept on the duplicate, so the main loop may close its own descriptor when it ends, as
every design's loop does, while the threads drain the queue. ``SO_RCVTIMEO`` (the idle timeout,
set on the listening socket) ends an idle thread's ``accept()`` every ``--idle-timeout`` with
EAGAIN, and the thread waits again.

Stopping: a thread blocked in ``accept()`` cannot be interrupted by a signal (signals are
blocked in every thread but the main one) — it is woken by ``shutdown()`` of the listening
socket, which makes every blocked ``accept()`` fail with EINVAL. That also drops whatever is still
queued, so the main thread does it only once the queue is empty: on the first SIGTERM/SIGINT it
shrinks the backlog (``listen(fd, 0)``: no newcomers), lets the threads finish what they hold and
accept what was queued, looks at the queue's length (``TCP_INFO``) every
:data:`~PrethreadAcceptServer.DOOR_CHECK` seconds, and shuts the socket down when it is empty.
Threads then leave. At the deadline whatever is still in flight is shut down and counted
*stopped* (:mod:`lab.sockets.threads`).

Descriptor exhaustion: the threads share one :class:`~lab.sockets.accept.Acceptor` (one spare
descriptor, one back-off, one notice per episode — EMFILE is the process's, not a thread's),
used only when ``accept()`` fails, under a lock that the steady state never takes; a thread
sleeps through the back-off.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from lab.sockets.accept import Acceptor
from lab.sockets.base import accept_queue_length
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.threads import ThreadServer, ThreadServing

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar


class PrethreadAcceptServer(ThreadServer):
    name = "prethread-accept"
    summary = "N threads each block in accept() on the shared listening socket (--accept-lock)"
    origin = "Stevens UNP ch. 30 server 7 (prethreaded, each thread calls accept)"
    model = "a pool of threads that accept"
    serial_options = ("--workers", "1")
    # Per connection with one message (tests/test_syscall_budget.py), --accept-lock none: the
    # thread's accept4, the message's readv and write, the EOF readv, close — nothing of the
    # lab's, and the main thread makes none. futex: sometimes (0.4 per connection measured) a
    # thread's accept() returns while another thread holds the GIL, and waits for it.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
        "futex": 2,
    }
    # A thread mutex around accept(): taken and given back without a system call while nobody
    # waits; with the other threads waiting for it, a futex wake by the release and a futex
    # wait by the next acquire — and, since a thread blocked on the lock has let go of the
    # GIL, up to two more for the woken thread to take the GIL back from the one serving.
    # (A count that grows with contention: 5.8 futex calls per connection in all were seen on
    # a loaded machine, against the 2 + 4 allowed.)
    accept_locks: ClassVar[dict[str, dict[str, int]]] = {"none": {}, "mutex": {"futex": 4}}
    # While stopping: how often the main thread looks whether the accept queue is empty.
    DOOR_CHECK = 0.05

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.connections:
            raise ConfigError(
                "--connections does not apply to prethread-accept (its threads accept on their "
                "own): stop it with SIGTERM, or use another design"
            )

    def ready_details(self) -> dict[str, object]:
        return {**super().ready_details(), "accept_lock": self.config.accept_lock}

    def start(self) -> None:
        # The threads' own descriptor for the listening socket (see the docstring); blocking:
        # O_NONBLOCK belongs to the open file, so the main loop's descriptor blocks too, and the
        # main loop never accepts.
        self.shared = socket.socket(fileno=os.dup(self.listener.fileno()))
        self.shared.setblocking(True)
        self.acceptor.close()  # one spare for the process: the threads'
        self.acceptor = Acceptor(self.shared, self.log)
        self.failure_lock = threading.Lock()  # the Acceptor's state, on the failure path only
        self.accept_lock = threading.Lock() if self.config.accept_lock == "mutex" else None
        self.door_shut = False  # the listening socket was shut down: threads leave
        self.maintain_pool()

    def accepting(self) -> bool:
        return False  # the threads accept; the main thread only supervises

    def thread_main(self, state: ThreadServing) -> None:
        """accept, serve the connection to its end, accept again — until the door is shut."""
        accept = self.shared._accept  # type: ignore[attr-defined]
        lock = self.accept_lock
        slot, tracing, serve = state.slot, state.tracing, self.service
        while not state.cut:
            try:
                if lock is None:
                    fd = accept()[0]
                else:
                    with lock:
                        fd = accept()[0]
            except BlockingIOError:
                continue  # SO_RCVTIMEO: no connection for --idle-timeout seconds
            except OSError as exc:
                if self.door_shut:
                    return  # shutdown() of the listening socket: the stop is done with us
                self.accept_failed(exc, state)
                continue
            state.held = fd
            if self.acceptor.backoff:
                with self.failure_lock:
                    self.acceptor._recovered()
            if tracing:
                state.log.trace("accept() is OK")
            slot.accepted()
            serve(fd, state)
            os.close(fd)
            state.held = -1

    def accept_failed(self, exc: OSError, state: ThreadServing) -> None:
        """The Acceptor's errno policy (shed with the spare, back off; raise what is not a
        resource or a failed connection); a connection it took instead is served."""
        with self.failure_lock:
            shed = self.acceptor.shed
            fd = self.acceptor._failed(exc)
            if self.acceptor.shed != shed:
                state.slot.accepted_and_shed(self.acceptor.shed - shed)
            pause = self.acceptor.paused_until - time.monotonic()
        if fd is not None:
            state.held = fd
            state.slot.accepted()
            self.service(fd, state)
            os.close(fd)
            state.held = -1
        elif pause > 0:
            time.sleep(pause)

    # -- stopping ---------------------------------------------------------------------------
    def begin_stop(self, drain: bool = True) -> None:
        # The threads drain the queue themselves: the main loop ends at once (and closes its
        # own descriptor; the threads' stays open).
        first = not self.stopping
        super().begin_stop(drain=False)
        if first:
            self.close_the_door()

    def stop_poll_interval(self) -> float:
        return self.DOOR_CHECK if not self.door_shut else super().stop_poll_interval()

    def while_stopping(self) -> None:
        if not self.door_shut and accept_queue_length(self.shared) == 0:
            self.shut_the_door()

    def shut_the_door(self) -> None:
        """Wake every thread blocked in accept() (EINVAL): nothing is left in the queue."""
        self.door_shut = True
        with contextlib.suppress(OSError):
            self.shared.shutdown(socket.SHUT_RDWR)

    def before_cut(self) -> None:
        if not self.door_shut:
            self.shut_the_door()  # at the deadline, whatever is still queued is reset

    def close(self) -> None:
        super().close()
        self.shared.close()
