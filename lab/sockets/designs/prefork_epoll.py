"""prefork-epoll — N pre-started workers, each an epoll loop on the shared listening socket.

nginx's model. The parent does socket → bind → listen and forks the workers; each worker makes
its own epoll instance and registers in it the shared listening socket with ``EPOLLEXCLUSIVE``
(Linux 4.5), its own connections, a signal pipe and a timer. It waits in ``epoll_wait`` for any
of them, so one process serves many connections at once, none of them blocking another: every
connection is non-blocking, and a worker sleeps only in ``epoll_wait``.

**Who gets a connection.** Without ``EPOLLEXCLUSIVE`` a new connection would wake every worker
waiting on the listening socket, and all but one would find nothing to accept (the herd). With
it the kernel wakes one: the listening socket's wait queue holds one entry per epoll instance,
in the order the workers registered, and a connection stops at the first whose worker asked for
``EPOLLIN`` — not at the first worker that is idle. So a light load goes to one worker, whichever
registered first, and the others sleep (Cloudflare 2017: "epoll is LIFO"; blocking ``accept()``
is FIFO and goes round the workers). Under load the first worker is busy in its loop when the
next connection comes; the event then waits in its ready list while the kernel's wake-up goes
nowhere else. That is the imbalance nginx documents; ``reuseport`` is its answer.

**The loop.** The listening socket is level-triggered: a worker accepts one connection per
event (nginx's ``multi_accept off``) and is told again while more are queued. A connection is
registered for ``EPOLLIN``; when it is readable, one ``readv`` into the worker's one fixed
64 KiB buffer and one ``write`` of what came. A short write keeps the rest (a copy: the buffer is
the next connection's) and switches the connection to ``EPOLLOUT``: while its echo is not sent,
the worker does not read from it, so output per connection is bounded by one buffer and a client
that does not read is stopped by TCP's flow control. ``close()`` takes a connection out of the
epoll set (the worker holds the only descriptor), so no ``EPOLL_CTL_DEL``. A connection
is made non-blocking by ``accept4(SOCK_NONBLOCK)`` itself, called through ctypes: the socket
module's accept sets only ``SOCK_CLOEXEC`` (a ``fcntl`` more per connection), and a socket
object built on a descriptor costs a ``getsockname`` — so connections stay plain descriptors,
served with ``os.readv``/``os.write`` as the blocking designs serve theirs.

**The lab's features.** Statistics are stores to the worker's slot of shared memory, as in every
pool. Signals: the worker's handler only notes a stop or the grace period's end
(:class:`~lab.sockets.serving.Serving`); ``signal.set_wakeup_fd`` writes a byte into a pipe in
the epoll set, so a signal that lands just before ``epoll_wait`` still ends the wait (the race
``pselect`` exists for). The parent still repeats SIGTERM every half second while workers live:
a worker forked a moment before the stop may get the first one before it owns its signals.
The idle timeout is a periodic ``timerfd`` (a quarter of ``--idle-timeout``): each message
marks its connection active (a store), and each tick closes the connections that made no
progress for four ticks — between 1 and 1.25 × ``--idle-timeout`` — with no clock read per
message and one ``read`` per tick.

**Stopping.** The parent shrinks the shared backlog (``listen(fd, 0)``) and forwards SIGTERM;
each worker accepts until EAGAIN — together they take everything that was queued — closes its
copy of the listening socket and serves its connections until they end; at the grace period's
end (SIGALRM) it closes what is left, counted ``stopped``.

**Cost per connection** (one message, a client connecting one at a time): ``epoll_wait`` for
the listening socket, ``accept4``, ``epoll_ctl(ADD)``; ``epoll_wait``, ``readv``, ``write`` for
the message; ``epoll_wait``, ``readv`` (0: EOF) and ``close`` — 9. With more than one worker a
connection can also cost a second worker an ``epoll_wait`` and an ``accept4`` that says EAGAIN:
when the first worker is not in ``epoll_wait`` at that moment, the wake-up goes to the next one,
and the first, back in its wait, still finds the socket in its ready list (the "one or more" of
``EPOLLEXCLUSIVE``). Per message: an ``epoll_wait``, a ``readv``, a ``write``; no allocation of
ours (the list ``epoll.poll`` returns is the standard library's).

**--service kv**: each worker is a :class:`KvEpollWorker` (the echo's worker is untouched), which
opens its own Store when it starts (after the fork: a sqlite3 connection must not cross one) and
feeds what a connection sends to the connection's :class:`~lab.sockets.kv.KvSession`, with the
echo's bound: while replies are unsent the connection is ``EPOLLOUT`` and not read. **Every
SQLite call blocks the worker's loop**: while one command waits for the disk or for another
worker's write lock (up to the busy timeout), none of that worker's other connections is served
— the honest cost of blocking work in an event loop; the other workers go on.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import time

from lab.sockets import process, services
from lab.sockets.accept import Acceptor
from lab.sockets.config import ServerConfig
from lab.sockets.designs.multi_accept import WorkersAcceptPool
from lab.sockets.echo import abort_if_unsent, outcome_of
from lab.sockets.log import Log, printable
from lab.sockets.serving import Serving
from lab.sockets.stats import COMPLETED, ERROR, IDLE_TIMEOUT, RESET, STOPPED, Slot

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import ClassVar

    from lab.sockets.kv import KvSession, Store

IN, OUT = select.EPOLLIN, select.EPOLLOUT
MAX_EVENTS = 64  # per epoll_wait: one call's array, allocated by the standard library
TICKS = 4  # the idle timeout is this many periods of the worker's timer

_libc = ctypes.CDLL(None, use_errno=True)
_CLOCK_MONOTONIC = 1
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK, TFD_CLOEXEC


_accept4 = _libc.accept4
_accept4.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_accept4.restype = ctypes.c_int
_ACCEPT_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def accept_nonblocking(listener_fd: int) -> tuple[int, None]:
    """``accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)``: a non-blocking connection in one call (the
    socket module's accept sets only SOCK_CLOEXEC, and a socket object built on a descriptor
    costs a ``getsockname``). Raises OSError as socket.accept does (EAGAIN: BlockingIOError)."""
    fd = _accept4(listener_fd, None, None, _ACCEPT_FLAGS)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd, None


class _Itimerspec(ctypes.Structure):
    _fields_ = (
        ("interval_sec", ctypes.c_long),
        ("interval_nsec", ctypes.c_long),
        ("value_sec", ctypes.c_long),
        ("value_nsec", ctypes.c_long),
    )


def periodic_timer(seconds: float) -> int:
    """A ``timerfd`` that becomes readable every ``seconds`` (os.timerfd_create is 3.13's)."""
    fd = int(_libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_FLAGS))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"timerfd_create(): {os.strerror(code)}")
    whole, part = int(seconds), int((seconds % 1) * 1e9)
    if whole == 0 and part == 0:
        part = 1
    spec = _Itimerspec(whole, part, whole, part)
    if _libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, f"timerfd_settime(): {os.strerror(code)}")
    return fd


class PreforkEpollServer(WorkersAcceptPool):
    name = "prefork-epoll"
    summary = "N pre-forked workers, each an epoll loop on the shared socket (EPOLLEXCLUSIVE)"
    origin = "nginx's worker processes (its default model); Linux 4.5 EPOLLEXCLUSIVE"
    model = "a pool of processes with event loops"
    family = "epoll"
    # One worker still serves every connection it accepted at once: it cannot be made serial.
    # (PoolServer's value has an inferred, narrower type: hence the ignore.)
    serial_options: ClassVar[tuple[str, ...] | None] = None  # type: ignore[assignment]
    # The wake-up pipe closes the signal-before-the-wait race; the parent's repeated SIGTERM
    # (inherited) is still needed for a worker so new that it did not yet own its signals.
    # Per echoed message: its wake-up, one readv and one write (tests/test_syscall_budget.py).
    syscalls_per_message: ClassVar[dict[str, int]] = {
        "epoll_wait": 1,
        "readv": 1,
        "write": 1,
    }
    # Per connection with one message, at most (see the module docstring): 9, and one more
    # epoll_wait and accept4 (EAGAIN) when two workers race for the connection.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "epoll_wait": 4,
        "accept4": 2,
        "epoll_ctl": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
    }

    def worker_main(self, slot: Slot) -> int:
        worker = KvEpollWorker if self.config.service == "kv" else EpollWorker
        return worker(self.listener, self.config, self.log, slot).run()


class Connection:
    """One client of a worker's loop."""

    __slots__ = ("active", "bytes_in", "bytes_out", "fd", "idle", "pending")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes_in = self.bytes_out = 0
        self.pending: memoryview | None = None  # the unsent rest of an echo
        self.active = True  # progress since the last tick
        self.idle = 0  # ticks without progress


class EpollWorker:
    """One worker's event loop (see the module docstring)."""

    def __init__(self, listener: socket.socket, config: ServerConfig, log: Log, slot: Slot):
        self.listener = listener
        self.listener_fd = listener.fileno()
        self.acceptor = Acceptor(listener, log)
        # Its errno policy, with the connection made non-blocking by accept4 itself.
        self.acceptor._accept = lambda: accept_nonblocking(self.listener_fd)
        self.log = log
        self.tracing = log.tracing
        self.slot = slot
        self.serving = Serving(config, log, slot, stop_signals=(signal.SIGTERM,))
        self.buffers = self.serving.buffers
        self.view = self.serving.view
        self.out = self.view  # view[:last], remade only when a message's size changes
        self.last = 0
        self.period = config.idle_timeout / TICKS
        self.connections: dict[int, Connection] = {}
        self.connection: Callable[[int], Connection] = Connection
        self.listening = False
        self.paused = False  # out of descriptors: the listener is out of the set for a while
        self.stop_started = False

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        self.serving.own_signals()
        self.wake_fd, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        self.timer_fd = periodic_timer(self.period)
        self.epoll = select.epoll()
        self.epoll.register(self.wake_fd, IN)
        self.epoll.register(self.timer_fd, IN)
        self.watch_listener(True)
        connections = self.connections
        poll = self.epoll.poll
        listener_fd, wake_fd, timer_fd = self.listener_fd, self.wake_fd, self.timer_fd
        while not (self.stop_started and not connections) and not self.serving.cut:
            timeout = -1.0
            if self.paused:
                timeout = max(0.0, self.acceptor.paused_until - time.monotonic())
            for fd, _events in poll(timeout, MAX_EVENTS):
                if fd == listener_fd:
                    self.accept_one()
                elif fd == wake_fd:
                    self.on_wake()
                elif fd == timer_fd:
                    self.on_tick()
                else:
                    conn = connections.get(fd)
                    if conn is None:
                        continue  # ended earlier in this batch
                    if conn.pending is None:
                        self.on_readable(conn)
                    else:
                        self.on_writable(conn)
            if self.paused and not self.acceptor.paused(time.monotonic()):
                self.paused = False
                if not self.stop_started:
                    self.watch_listener(True)
        for conn in list(connections.values()):  # the grace period is over
            self.end(conn, STOPPED)
        return process.EXIT_OK

    def watch_listener(self, on: bool) -> None:
        # EPOLLEXCLUSIVE cannot be modified (EPOLL_CTL_MOD says EINVAL): delete and add.
        if on and not self.listening:
            self.epoll.register(self.listener_fd, IN | select.EPOLLEXCLUSIVE)
        elif not on and self.listening:
            self.epoll.unregister(self.listener_fd)
        self.listening = on

    def accept_one(self) -> bool:
        """One connection from the listening socket; False when there was none."""
        acceptor = self.acceptor
        shed = acceptor.shed
        fd = acceptor.accept()
        if acceptor.shed != shed:
            self.slot.accepted_and_shed(acceptor.shed - shed)
        if fd is None:
            if acceptor.paused(time.monotonic()):  # out of descriptors: back off, no spin
                self.paused = True
                self.watch_listener(False)
            return False
        self.slot.accepted()
        try:
            self.epoll.register(fd, IN)
        except OSError:  # ENOMEM, or fs.epoll.max_user_watches reached
            os.close(fd)
            self.slot.ended(ERROR, 0, 0)
            return True
        self.connections[fd] = self.connection(fd)
        return True

    # -- a connection ------------------------------------------------------------------------
    def on_readable(self, conn: Connection) -> None:
        try:
            n = os.readv(conn.fd, self.buffers)
        except BlockingIOError:
            return  # a stale event (the descriptor was reused in this batch)
        except OSError as exc:
            self.end(conn, outcome_of(exc))
            return
        if not n:
            self.end(conn, COMPLETED)
            return
        conn.bytes_in += n
        conn.active = True
        if n != self.last:
            self.out, self.last = self.view[:n], n
        if self.tracing:
            self.log.trace(f"The message from client: {printable(bytes(self.out))}")
        try:
            sent = os.write(conn.fd, self.out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.end(conn, outcome_of(exc))
            return
        conn.bytes_out += sent
        if sent == n:
            if self.tracing:
                self.log.trace("send() is OK")
            return
        # A short send: keep the rest, stop reading this client until it is written.
        conn.pending = memoryview(bytes(self.view[sent:n]))
        self.epoll.modify(conn.fd, OUT)

    def on_writable(self, conn: Connection) -> None:
        pending = conn.pending
        assert pending is not None
        try:
            sent = os.write(conn.fd, pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(conn, outcome_of(exc))
            return
        conn.bytes_out += sent
        conn.active = True
        if sent < len(pending):
            conn.pending = pending[sent:]
            return
        conn.pending = None
        self.epoll.modify(conn.fd, IN)
        if self.tracing:
            self.log.trace("send() is OK")

    def end(self, conn: Connection, outcome: str) -> None:
        del self.connections[conn.fd]
        os.close(conn.fd)  # the only descriptor: this also takes it out of the epoll set
        self.slot.ended(outcome, conn.bytes_in, conn.bytes_out)
        if self.tracing:
            if outcome == COMPLETED:
                self.log.trace("the client closed the connection")
            elif outcome == RESET:
                self.log.trace("the client reset the connection")
            else:
                self.log.trace(f"closing the connection: {outcome}")

    # -- the timer and the signals -----------------------------------------------------------
    def on_tick(self) -> None:
        try:
            os.read(self.timer_fd, 8)
        except BlockingIOError:
            return
        for conn in list(self.connections.values()):
            if conn.active:
                conn.active = False
                conn.idle = 0
            else:
                conn.idle += 1
                if conn.idle >= TICKS:
                    abort_if_unsent(conn.fd)  # a FIN behind unsent bytes would never arrive
                    self.end(conn, IDLE_TIMEOUT)

    def on_wake(self) -> None:
        while True:  # empty the wake-up pipe: the handler already noted what came
            try:
                if len(os.read(self.wake_fd, 512)) < 512:
                    break
            except BlockingIOError:
                break
        if self.serving.stopping and not self.stop_started:
            self.stop_started = True
            # Serve what was queued when the stop began (the parent shrank the backlog):
            # every worker accepts until EAGAIN, so together they empty the queue.
            if self.listening:
                while self.accept_one():
                    pass
                self.watch_listener(False)
            self.listener.close()


class KvConnection(Connection):
    """A kv client of a worker's loop: its session (the protocol's state and unfed input)."""

    __slots__ = ("session",)

    def __init__(self, fd: int, session: KvSession) -> None:
        super().__init__(fd)
        self.session = session


class KvEpollWorker(EpollWorker):
    """A worker's loop serving the kv protocol (see the module docstring)."""

    def __init__(self, listener: socket.socket, config: ServerConfig, log: Log, slot: Slot):
        super().__init__(listener, config, log, slot)
        self.db_path = config.db_path
        self.store: Store | None = None

    def run(self) -> int:
        from lab.sockets.kv import KvSession

        store = self.store = services.open_store(self.db_path)  # this worker's, after the fork
        self.connection = lambda fd: KvConnection(fd, KvSession(store))
        try:
            return super().run()
        finally:
            store.close()

    def on_readable(self, conn: Connection) -> None:
        assert isinstance(conn, KvConnection)
        try:
            data = os.read(conn.fd, len(self.view))
        except BlockingIOError:
            return  # a stale event (the descriptor was reused in this batch)
        except OSError as exc:
            self.end(conn, outcome_of(exc))
            return
        if not data:
            self.end(conn, COMPLETED)
            return
        conn.bytes_in += len(data)
        conn.active = True
        if self.tracing:
            self.log.trace(f"The message from client: {printable(data)}")
        # The SQLite statements run here and block this worker's loop (module docstring).
        self.send(conn, conn.session.receive(data), writing=False)

    def send(self, conn: KvConnection, replies: bytes, writing: bool) -> None:
        """Send replies and the session's next batches; a short write keeps the rest and
        makes the connection EPOLLOUT (``writing``: it is already)."""
        session = conn.session
        while True:
            if replies:
                try:
                    sent = os.write(conn.fd, replies)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self.end(conn, outcome_of(exc))
                    return
                conn.bytes_out += sent
                if sent < len(replies):
                    conn.pending = memoryview(replies)[sent:]
                    if not writing:
                        self.epoll.modify(conn.fd, OUT)
                    return
                if self.tracing:
                    self.log.trace(f"send() is OK: {printable(replies)}")
            if not session.unfed:
                break
            replies = session.more()
        if writing:
            self.epoll.modify(conn.fd, IN)

    def on_writable(self, conn: Connection) -> None:
        assert isinstance(conn, KvConnection)
        pending = conn.pending
        assert pending is not None
        try:
            sent = os.write(conn.fd, pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(conn, outcome_of(exc))
            return
        conn.bytes_out += sent
        conn.active = True
        if sent < len(pending):
            conn.pending = pending[sent:]
            return
        conn.pending = None
        self.send(conn, b"", writing=True)  # the next batch, if input waits; then EPOLLIN
