"""select — one process, non-blocking sockets, one epoll event loop (nginx's worker).

One process serves every connection at once. It never blocks in ``accept``, ``recv`` or
``send``: it blocks in one place, ``epoll_wait``, on the listening socket, every connection, the
signal pipe and the health port, and does for each ready descriptor the one thing that will not
block — accept what is queued, read what came and echo it, write what was left unsent. This is
the readiness model of Stevens' ch. 6 (``select``/``poll``) on Linux's ``epoll``, as in an nginx
worker or a Redis server. (The module is ``select_loop``, not ``select``, so that it can never
stand in for the standard library's ``select``, which it imports.)

**epoll directly, not ``selectors``.** ``selectors.EpollSelector`` is this same epoll with a
generic layer on top: per ready event it looks the descriptor up in a mapping and builds a
``(SelectorKey, events)`` tuple, and it asks ``epoll_wait`` for as many events as there are
registered descriptors, so every wake-up allocates an event array the size of *all*
connections — 10,000 idle ones make it 120 KB a wake-up. Here ``epoll.poll`` is asked for at
most :data:`MAX_EVENTS` at a time (nginx's habit: the rest are reported by the next call, as
epoll is level-triggered), the connection is found with one dict lookup by descriptor, and many
idle connections cost a wake-up nothing.

**Level-triggered, one read per readiness.** A readable connection gets one ``recv`` into the
process's one 64 KiB buffer, then one ``send`` of what came, then the loop moves on: a client
that sends a lot cannot starve the others (edge-triggered would oblige us to read until EAGAIN,
one more ``recv`` per message). Sockets are used with ``MSG_DONTWAIT`` rather than switched to
non-blocking mode: ``accept4`` returns a blocking socket, and ``MSG_DONTWAIT`` makes each call
non-blocking without the two ``fcntl`` calls per connection. So a message costs
``epoll_wait``, ``recvfrom`` and ``sendto``, and nothing is allocated for it: the received bytes
stay in the shared buffer, the memoryview of them is made only when the size differs from the
last message's.

**Partial writes, bounded output.** When ``send`` takes only part of an echo (the client is not
reading and its socket buffers are full), the rest is copied out of the shared buffer into the
connection's ``pending`` bytes — the only allocation, and only then — and the connection is
switched from ``EPOLLIN`` to ``EPOLLOUT`` (one ``epoll_ctl``): *the server stops reading a
client whose echo is not yet sent*. What the server holds per connection is therefore at most
one read (64 KiB); beyond it the client's own sends block, because TCP's flow control stops
them — the same back-pressure the blocking designs get from a blocking ``send``. When the rest
is written, the connection goes back to ``EPOLLIN``.

**The idle timeout** cannot come from ``SO_RCVTIMEO`` (nothing blocks), so a coarse lazy wheel
does it (:class:`~lab.sockets.eventloop.IdleWheel`): an interval ``ITIMER_REAL`` ticks every
``--idle-timeout``/4 s (at most 1 s) while connections are open, its SIGALRM arrives through
the signal pipe like any signal, and per message a connection only stores the tick number — no
clock read, no system call. A tick costs about five system calls (the signal's delivery,
``rt_sigreturn``, the byte in the pipe, its read, the interrupted ``epoll_wait``) and looks only
at the connections due at that tick. The timer is armed when the first connection opens and
disarmed at a tick that finds none (one ``setitimer`` each way), so an idle server sleeps.

**Signals, the health port, descriptor exhaustion, stopping** all ride the same loop: the
signal pipe (:class:`~lab.sockets.signals.SignalQueue`) and the health port are two more
descriptors in the epoll set; ``accept`` goes through the shared
:class:`~lab.sockets.accept.Acceptor` (on EMFILE: shed one with the spare descriptor, stop
watching the listener for the back-off, so no spin); a stop shrinks the backlog
(``close_the_door``), accepts what was queued, closes the listener, lets open connections finish
and at the deadline closes what is left, counted ``stopped``. Statistics are stores into the
process's slot of shared memory, as in every design.

**--service kv** runs its own copy of the loop (:meth:`SelectServer.run_kv`; the echo's loop is
untouched): a readable connection's bytes go to its :class:`~lab.sockets.kv.KvSession` and its
replies are sent; an unsent rest makes the connection ``EPOLLOUT`` and the server stops reading
it, and input beyond a batch of replies waits in the session until those are sent — the echo's
bound, one read plus one batch of replies per connection. The process's one Store is opened in
:meth:`start` (this process never forks). **Every SQLite call blocks the whole loop**: while a
command waits for the disk (a commit's fsync) or for another process's write lock (up to the
busy timeout, 5 s), no other connection is served. That is this design's honest cost for a
service that does blocking work in its only thread; the pools and the threads do not pay it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from lab.sockets import services, stats
from lab.sockets.base import Server
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.echo import abort_if_unsent, outcome_of
from lab.sockets.eventloop import IdleWheel
from lab.sockets.log import printable
from lab.sockets.serving import BUFFER_SIZE

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import ClassVar

    from lab.sockets.kv import KvSession, Store

MAX_EVENTS = 256  # ready descriptors taken per epoll_wait (the rest come with the next one)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
DONTWAIT = socket.MSG_DONTWAIT


class Connection:
    """One client's state: its socket, what it sent, the echo it has not taken yet."""

    __slots__ = ("bytes_in", "due", "fd", "pending", "recv_into", "seen", "send", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.recv_into: Callable[[bytearray, int, int], int] = sock.recv_into
        self.send: Callable[[memoryview, int], int] = sock.send
        self.bytes_in = 0
        self.pending: memoryview | None = None  # unsent echo; while set, we do not read
        self.seen = 0  # the idle wheel's tick of the last progress
        self.due = 0

    def sent(self, unsent: int) -> int:
        """Bytes sent to the client when it ends with ``unsent`` bytes pending."""
        return self.bytes_in - unsent


class KvConnection(Connection):
    """A kv client: its session, and what was sent (replies are not the bytes received)."""

    __slots__ = ("bytes_out", "session")

    def __init__(self, sock: socket.socket, session: KvSession) -> None:
        super().__init__(sock)
        self.session = session
        self.bytes_out = 0

    def sent(self, unsent: int) -> int:
        return self.bytes_out


class SelectServer(Server):
    name = "select"
    summary = (
        "one process, non-blocking sockets, an epoll event loop; a client whose echo is not "
        "yet sent is not read"
    )
    origin = "nginx's worker process (an epoll loop); Stevens UNP ch. 6 (I/O multiplexing)"
    model = "an event loop"
    family = "epoll"
    serial_options = None  # it serves every connection it accepted, at once
    per_worker_stats = True
    # Per message (one client, one message in flight): the wake-up, one read, one write.
    syscalls_per_message: ClassVar[dict[str, int]] = {
        "epoll_wait": 1,
        "recvfrom": 1,
        "sendto": 1,
    }
    # Per connection with one message (tests/test_syscall_budget.py): epoll_wait wakes for the
    # connection, for its message and for its EOF; accept4 takes it and a second one says
    # EAGAIN; getsockname (socket.socket(fileno=) checks the descriptor); one epoll_ctl ADD
    # (close() removes it from the set, no DEL); the message's recvfrom and sendto, the EOF's
    # recvfrom; close. The idle timer's setitimer, when a connection comes to an idle server
    # and when a tick finds none left: at most one each.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "epoll_wait": 3,
        "accept4": 2,
        "getsockname": 1,
        "epoll_ctl": 1,
        "recvfrom": 2,
        "sendto": 1,
        "close": 1,
        "setitimer": 2,
    }

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.loop != "asyncio":  # the option's default: not asked for
            raise ConfigError(
                f"--loop {config.loop} applies only to --design asyncio (select is its own "
                "epoll loop): drop --loop / LAB_LOOP, or use --design asyncio"
            )

    def start(self) -> None:
        self.slot = self.counters.assign()
        self.counters.bind(self.slot, os.getpid())
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.wheel = IdleWheel(self.config.idle_timeout)
        self.ticking = False  # the interval timer is armed
        self.listening = False  # the listener is in the epoll set
        self.shed_seen = 0  # the acceptor's shed count already put in our slot
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.connection: Callable[[socket.socket], Connection] = Connection
        self.store: Store | None = None
        if self.config.service == "kv":
            from lab.sockets.kv import KvSession

            store = self.store = services.open_store(self.config.db_path)
            self.connection = lambda sock: KvConnection(sock, KvSession(store))

    def ready_details(self) -> dict[str, object]:
        return {"loop": "epoll"}

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        if self.store is not None:
            self.run_kv()
            return
        epoll, conns, wheel = self.epoll, self.conns, self.wheel
        poll = epoll.poll
        signal_fd = self.signal_queue.fileno()
        epoll.register(signal_fd, EPOLLIN)
        health_fd = self.health.fileno() if self.health is not None else -1
        if health_fd >= 0:
            epoll.register(health_fd, EPOLLIN)
        listener_fd = self.listener.fileno()
        self._listen(True)
        buffer, view = self.buffer, self.view
        out, last = view, 0
        tracing, log = self.tracing, self.log
        timeout = -1.0  # epoll_wait's: none while nothing is timed
        try:
            while True:
                events = poll(timeout, MAX_EVENTS)
                ticks = wheel.now
                control = False
                for fd, _mask in events:
                    conn = conns.get(fd)
                    if conn is None:
                        control = True
                        if fd == listener_fd:
                            self.accept_batch()
                        elif fd == signal_fd:
                            self.on_signals()
                        elif fd == health_fd:
                            self.answer_health_probes()
                        continue
                    if conn.pending is not None:
                        self.flush(conn)
                        continue
                    try:
                        n = conn.recv_into(buffer, BUFFER_SIZE, DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self.end(conn, outcome_of(exc), exc)
                        continue
                    if not n:
                        self.end(conn, stats.COMPLETED)
                        continue
                    conn.bytes_in += n
                    conn.seen = ticks
                    if n != last:
                        out, last = view[:n], n
                    if tracing:
                        log.trace(f"The message from client: {printable(bytes(out))}")
                    try:
                        sent = conn.send(out, DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    except OSError as exc:
                        self.end(conn, outcome_of(exc), exc)
                        continue
                    if sent != n:
                        self.hold(conn, view[sent:n])
                    elif tracing:
                        log.trace("send() is OK")
                if control or timeout != -1:
                    if self.stopping and self.wind_down():
                        break
                    timeout = self.next_timeout()
        finally:
            if self.ticking:
                signal.setitimer(signal.ITIMER_REAL, 0)
            epoll.close()
            if self.listener.fileno() != -1:
                self.listener.close()

    def next_timeout(self) -> float:
        """epoll_wait's timeout in seconds (-1: none): the stop's deadline, or the end of the
        acceptor's back-off. Only these read the clock; the steady state does not."""
        deadlines = []
        if self.stopping and self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if not self.listening and not self.stopping:  # backing off: watch it again after
            deadlines.append(self.acceptor.paused_until)
        if not deadlines:
            return -1.0
        remaining = min(deadlines) - time.monotonic()
        if remaining <= 0 and not self.stopping:
            self._listen(True)
            return -1.0
        return max(remaining, 0.0)

    def _listen(self, on: bool) -> None:
        if on != self.listening and self.listener.fileno() != -1:
            if on:
                self.epoll.register(self.listener.fileno(), EPOLLIN)
            else:
                self.epoll.unregister(self.listener.fileno())
            self.listening = on

    # -- connections -------------------------------------------------------------------
    def accept_batch(self, limit: int | None = None) -> None:
        """Accept what is queued (up to ``accepts_per_wakeup``; ``limit`` None: all of it)."""
        accept, limit_n = self.acceptor.accept, self.config.connections
        for _ in range(self.accepts_per_wakeup if limit is None else limit):
            fd = accept()
            if fd is None:
                break
            self.open(fd)
            if limit_n and self.slot.get(stats.ACCEPTED) >= limit_n and not self.stopping:
                if self.tracing:
                    self.log.trace(f"served {limit_n} connection(s): stopping")
                self.begin_stop(drain=False)
                break
        if self.acceptor.shed != self.shed_seen:
            self.slot.accepted_and_shed(self.acceptor.shed - self.shed_seen)
            self.shed_seen = self.acceptor.shed
        if self.acceptor.backoff and self.acceptor.paused(time.monotonic()):
            self._listen(False)  # out of descriptors: not readable for us until the back-off

    def open(self, fd: int) -> None:
        self.slot.accepted()
        sock = socket.socket(self.listener.family, socket.SOCK_STREAM, 0, fileno=fd)
        try:
            self.epoll.register(fd, EPOLLIN)
        except OSError as exc:  # ENOMEM, ENOSPC (fs.epoll.max_user_watches)
            sock.close()
            self.slot.ended(stats.ERROR, 0, 0)
            if self.tracing:
                self.log.trace(f"socket error: {exc}")
            return
        conn = self.connection(sock)
        self.conns[fd] = conn
        self.wheel.add(conn)
        if not self.ticking:
            interval = self.wheel.interval
            signal.setitimer(signal.ITIMER_REAL, interval, interval)
            self.ticking = True

    def hold(self, conn: Connection, rest: memoryview) -> None:
        """A short write: keep the rest, stop reading, wait until the socket takes more."""
        conn.pending = memoryview(bytes(rest))
        try:
            self.epoll.modify(conn.fd, EPOLLOUT)
        except OSError as exc:
            self.end(conn, stats.ERROR, exc)

    def flush(self, conn: Connection) -> None:
        pending = conn.pending
        assert pending is not None
        try:
            sent = conn.send(pending, DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(conn, outcome_of(exc), exc)
            return
        conn.seen = self.wheel.now
        if sent < len(pending):
            conn.pending = pending[sent:]
            return
        conn.pending = None
        if self.tracing:
            self.log.trace("send() is OK")
        try:
            self.epoll.modify(conn.fd, EPOLLIN)
        except OSError as exc:
            self.end(conn, stats.ERROR, exc)

    def end(self, conn: Connection, outcome: str, exc: BaseException | None = None) -> None:
        if self.tracing:
            if outcome == stats.COMPLETED:
                self.log.trace("the client closed the connection")
            elif outcome == stats.RESET:
                self.log.trace("the client reset the connection")
            elif outcome == stats.ERROR:
                self.log.trace(f"socket error: {exc}")
            else:
                self.log.trace(f"closing the connection: {outcome}")
        del self.conns[conn.fd]
        self.wheel.remove(conn)
        unsent = len(conn.pending) if conn.pending is not None else 0
        conn.sock.close()  # also leaves the epoll set: the last reference to it is gone
        self.slot.ended(outcome, conn.bytes_in, conn.sent(unsent))

    # -- signals and stopping -----------------------------------------------------------
    def handle_alrm(self) -> None:
        """A tick of the idle wheel: close what has been idle for --idle-timeout."""
        for conn in self.wheel.advance():
            if conn.fd in self.conns:
                abort_if_unsent(conn.fd)  # a FIN behind unsent bytes would never arrive
                self.end(conn, stats.IDLE_TIMEOUT)
        if not self.conns and self.ticking:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.ticking = False

    def wind_down(self) -> bool:
        """While stopping: serve what was queued, close the listener, and once nothing is open
        or the deadline passed (closing what is left, ``stopped``), say we are done."""
        if self.listener.fileno() != -1:
            if self.drain_on_stop:
                self._listen(True)
                while True:  # what the kernel had queued (close_the_door shrank the backlog)
                    before = self.slot.get(stats.ACCEPTED)
                    self.accept_batch()
                    if self.slot.get(stats.ACCEPTED) == before:
                        break  # the queue is empty
            self._listen(False)
            self.listener.close()  # from now on a connect is refused
        deadline = self.stop_deadline
        if deadline is not None and time.monotonic() >= deadline:
            self.killing = True
            for conn in list(self.conns.values()):
                self.end(conn, stats.STOPPED)
        return not self.conns

    # -- --service kv ----------------------------------------------------------------------
    def run_kv(self) -> None:
        """:meth:`run`'s loop for the kv service: the same wake-ups, kv's read and write."""
        epoll, conns = self.epoll, self.conns
        poll = epoll.poll
        signal_fd = self.signal_queue.fileno()
        epoll.register(signal_fd, EPOLLIN)
        health_fd = self.health.fileno() if self.health is not None else -1
        if health_fd >= 0:
            epoll.register(health_fd, EPOLLIN)
        listener_fd = self.listener.fileno()
        self._listen(True)
        timeout = -1.0
        try:
            while True:
                events = poll(timeout, MAX_EVENTS)
                control = False
                for fd, _mask in events:
                    conn = conns.get(fd)
                    if conn is None:
                        control = True
                        if fd == listener_fd:
                            self.accept_batch()
                        elif fd == signal_fd:
                            self.on_signals()
                        elif fd == health_fd:
                            self.answer_health_probes()
                        continue
                    assert isinstance(conn, KvConnection)
                    if conn.pending is not None:
                        self.kv_flush(conn)
                    else:
                        self.kv_readable(conn)
                if control or timeout != -1:
                    if self.stopping and self.wind_down():
                        break
                    timeout = self.next_timeout()
        finally:
            if self.ticking:
                signal.setitimer(signal.ITIMER_REAL, 0)
            epoll.close()
            if self.listener.fileno() != -1:
                self.listener.close()
            if self.store is not None:
                self.store.close()

    def kv_readable(self, conn: KvConnection) -> None:
        try:
            data = conn.sock.recv(BUFFER_SIZE, DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(conn, outcome_of(exc), exc)
            return
        if not data:
            self.end(conn, stats.COMPLETED)
            return
        conn.bytes_in += len(data)
        conn.seen = self.wheel.now
        if self.tracing:
            self.log.trace(f"The message from client: {printable(data)}")
        # The SQLite statements run here, in the loop's only thread (see the docstring).
        self.kv_send(conn, conn.session.receive(data), writing=False)

    def kv_send(self, conn: KvConnection, replies: bytes, writing: bool) -> None:
        """Send replies, and the next batches while the session has input unfed; a short
        write keeps the rest and makes the connection EPOLLOUT (not read until all is sent).
        ``writing``: it is EPOLLOUT now."""
        session = conn.session
        while True:
            if replies:
                try:
                    sent = conn.send(memoryview(replies), DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self.end(conn, outcome_of(exc), exc)
                    return
                conn.bytes_out += sent
                if sent < len(replies):
                    conn.pending = memoryview(replies)[sent:]
                    if not writing:
                        self._watch(conn, EPOLLOUT)
                    return
                if self.tracing:
                    self.log.trace(f"send() is OK: {printable(replies)}")
            if not session.unfed:
                break
            replies = session.more()
        if writing:
            self._watch(conn, EPOLLIN)

    def kv_flush(self, conn: KvConnection) -> None:
        pending = conn.pending
        assert pending is not None
        try:
            sent = conn.send(pending, DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(conn, outcome_of(exc), exc)
            return
        conn.bytes_out += sent
        conn.seen = self.wheel.now
        if sent < len(pending):
            conn.pending = pending[sent:]
            return
        conn.pending = None
        self.kv_send(conn, b"", writing=True)  # the next batch, if input waits; then EPOLLIN

    def _watch(self, conn: Connection, events: int) -> None:
        try:
            self.epoll.modify(conn.fd, events)
        except OSError as exc:
            self.end(conn, stats.ERROR, exc)
