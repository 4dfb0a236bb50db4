"""asyncio — one process, asyncio's event loop with protocols (or uvloop's, ``--loop uvloop``).

The same readiness model as ``select`` — one process waits in ``epoll_wait`` for every socket
and does what will not block — but the loop is asyncio's (``selectors.EpollSelector`` under
``asyncio.SelectorEventLoop``) or, with ``--loop uvloop``, uvloop's (libuv, in C), and the echo
is an ``asyncio`` *protocol*, as in MagicStack's vmbench servers: callbacks that the transport
calls, not streams (``StreamReader``/``StreamWriter`` put a coroutine, a future and a buffer
copy in every message's path). (The module is ``asyncio_loop`` so that it cannot stand in for
the standard library's ``asyncio``.) uvloop is imported only with ``--loop uvloop``; without it
installed that is a one-line usage error (exit 2).

**BufferedProtocol, one shared buffer.** ``asyncio.BufferedProtocol`` lets the transport
``recv_into`` a buffer the protocol lends it (``get_buffer``), then says how much came
(``buffer_updated``): no ``bytes`` object is made per message, where ``data_received`` gets a
new one each time (asyncio first allocates its full ``max_size``, 256 KiB, and shrinks it).
The loop runs one callback at a time, so every connection can lend the same 64 KiB buffer: the
echo is written before anyone else reads. Measured on loopback (server CPU per message,
persistent connections, c=8, medians of 4 interleaved rounds on a shared 2-core machine): with
asyncio's loop BufferedProtocol cost 14.3 µs against data_received's 17.2 at 49 bytes, 21.6
against 23.5 at 16 KiB; with uvloop the two were within the spread between rounds (13.2 against
12.2, 18.3 against 17.9: uvloop calls two Python methods per read instead of one). One protocol
for both loops, then, the one that saves the allocation where it shows.

A write that is only partly taken (the client is not reading) keeps the rest in the transport.
asyncio *copies* it into the transport's own buffer; uvloop keeps a *view* of it, so with
uvloop the shared buffer is replaced by a fresh one whenever a write is left pending (an
allocation only then), and the old one stays the pending write's.

**Bounded output.** ``set_write_buffer_limits(0)``: the transport calls ``pause_writing`` as
soon as anything of an echo is unsent, and the protocol then ``pause_reading()``s — *the server
stops reading a client whose echo is not yet sent*, exactly as ``select`` does — and
``resume_writing`` (all sent) resumes reading. What the server holds per connection is at most
one read.

**Accepting** is the lab's, not asyncio's ``create_server``: the listening socket is a reader
of the loop whose callback accepts with :class:`~lab.sockets.accept.Acceptor` (the spare
descriptor and the back-off on EMFILE; asyncio's own accept loop only logs and retries after
a second) and hands each socket to ``loop.connect_accepted_socket`` — a task per connection,
as ``create_server`` makes too.

**Signals** come through the server's own wake-up pipe, a reader of the loop (never
``loop.add_signal_handler``, which would take the wake-up fd for the loop's self-pipe). uvloop
points the wake-up fd at its own self-pipe when it starts running; the first callback points it
back, and takes a signal that came before it (its byte went to uvloop's pipe). **The idle
timeout** is the coarse wheel of :mod:`lab.sockets.eventloop`, ticked by a
``call_later`` every ``--idle-timeout``/4 s (at most 1 s) while connections are open: per
message a protocol stores a tick number, nothing more. (Both loops read the clock once per
iteration anyway: asyncio's ``_run_once`` does, libuv's ``uv_update_time`` does.)

**What it costs**, with asyncio's loop: per message ``epoll_wait``, ``recvfrom``, ``sendto``
(3, as ``select``); per connection 18 — asyncio's transport adds ``ioctl(FIONBIO)``,
``getsockname``, ``getpeername``, ``epoll_ctl`` ADD and DEL, and an ``epoll_wait`` with a zero
timeout for each loop iteration that has callbacks ready (the task's steps). With uvloop a
message is ``epoll_pwait``, ``read``, ``write``, and a connection 17. In CPU the loop's own
Python (``_run_once``, the transport's read and write paths, a task per connection) is what
``select`` saves; uvloop does those parts in C.

**--service kv**: each connection is a :class:`KvConnectionProtocol` (the echo's protocol is
untouched) that feeds what comes to its :class:`~lab.sockets.kv.KvSession` and writes the
replies, with the echo's bound: when the transport holds unsent replies, reading pauses, and
input beyond a batch of replies waits in the session until they are sent. The process's one
Store is opened in :meth:`AsyncioServer.start`. The SQLite calls run in the loop's thread and
**block the loop** while a command waits for the disk or the write lock, as in ``select``. Not
the default executor, on purpose: the commands of one connection must stay in order (one at a
time per connection, so a queue per connection), each executor thread would need its own Store
(sqlite3 connections are per thread), and one process's writes take turns on SQLite's one write
lock anyway — the executor would add a thread hop and a future per command for little overlap
beyond reads. Blocking is this design's honest cost, and simple to reason about.
"""

from __future__ import annotations

import asyncio
import os
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
    from typing import Any, ClassVar

    from lab.sockets.kv import KvSession, Store

LOOPS = ("asyncio", "uvloop")


def uvloop_module() -> Any:
    """uvloop, imported (only --loop uvloop does); ConfigError naming the fix when missing."""
    import importlib

    try:
        return importlib.import_module("uvloop")
    except ImportError as exc:
        import sys

        raise ConfigError(
            f"--loop uvloop: uvloop is not installed for {sys.executable} ({exc}): "
            "pip install 'lab[uvloop]' (or pip install uvloop), or use --loop asyncio"
        ) from None


class EchoProtocol(asyncio.BufferedProtocol):
    """One connection: echo what comes, stop reading while an echo is unsent."""

    __slots__ = ("bytes_in", "due", "held", "outcome", "seen", "server", "transport")

    def __init__(self, server: AsyncioServer) -> None:
        self.server = server
        # asyncio's transport, or uvloop's (which does not subclass asyncio.Transport)
        self.transport: Any = None
        self.bytes_in = 0
        self.held = 0  # bytes of echo the transport still holds (while writing is paused)
        self.outcome: str | None = None  # set when we end it (idle, stopped)
        self.seen = 0
        self.due = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.set_write_buffer_limits(0)  # pause_writing as soon as an echo is unsent
        self.server.opened(self)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.server.buffer

    def buffer_updated(self, nbytes: int) -> None:
        server = self.server
        self.bytes_in += nbytes
        self.seen = server.wheel.now
        if nbytes != server.last:
            server.out, server.last = server.view[:nbytes], nbytes
        if server.tracing:
            server.log.trace(f"The message from client: {printable(bytes(server.out))}")
        self.transport.write(server.out)
        if server.tracing and not self.held:
            server.log.trace("send() is OK")

    def pause_writing(self) -> None:
        transport = self.transport
        self.held = transport.get_write_buffer_size()
        transport.pause_reading()
        if self.server.keeps_views:  # uvloop holds a view of the shared buffer: let it have it
            self.server.new_buffer()

    def resume_writing(self) -> None:
        self.held = 0
        self.seen = self.server.wheel.now
        if self.server.tracing:
            self.server.log.trace("send() is OK")
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost(None) follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed(self, exc)

    def end(self, outcome: str) -> None:
        """Close it now (idle timeout, the grace period's end), counted as ``outcome``."""
        if self.outcome is None and self.transport is not None:
            self.outcome = outcome
            self.held = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # abort() closes: a FIN behind unsent bytes would never come
                abort_if_unsent(sock.fileno())
            self.transport.abort()


class KvConnectionProtocol(EchoProtocol):
    """One kv connection: run what comes, write the replies; while the transport holds unsent
    replies, do not read, and leave input beyond a batch of replies in the session."""

    __slots__ = ("session", "writing_paused", "written")

    def __init__(self, server: AsyncioServer, session: KvSession) -> None:
        super().__init__(server)
        self.session = session
        self.written = 0  # bytes handed to the transport (sent: written - held at the end)
        self.writing_paused = False

    def buffer_updated(self, nbytes: int) -> None:
        server = self.server
        self.bytes_in += nbytes
        self.seen = server.wheel.now
        data = bytes(server.view[:nbytes])  # the buffer is every connection's
        if server.tracing:
            server.log.trace(f"The message from client: {printable(data)}")
        # The SQLite statements run here, in the loop's thread (see the module docstring).
        self.write(self.session.receive(data))

    def write(self, replies: bytes) -> None:
        """Write replies, then the session's next batches until the transport holds some."""
        session = self.session
        while True:
            if replies:
                self.written += len(replies)
                self.transport.write(replies)  # pause_writing() here when not all was sent
                if self.server.tracing and not self.writing_paused:
                    self.server.log.trace(f"send() is OK: {printable(replies)}")
            if self.writing_paused or not session.unfed or self.transport is None:
                return
            replies = session.more()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.held = self.transport.get_write_buffer_size()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.held = 0
        self.seen = self.server.wheel.now
        if self.session.unfed:
            self.write(b"")
        if not self.writing_paused and self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # held: what the transport still had when writing paused (or when end() aborted it)
        self.server.closed(self, exc, self.written - self.held)


class AsyncioServer(Server):
    name = "asyncio"
    summary = "one process, asyncio protocols on its event loop (epoll); --loop uvloop: libuv's"
    origin = "MagicStack vmbench's asyncio and uvloop echo servers (protocols, not streams)"
    model = "an event loop"
    family = "epoll"
    serial_options = None  # it serves every connection it accepted, at once
    per_worker_stats = True
    # Per message, asyncio's loop (the test's): the wake-up, one read, one write. uvloop's:
    # epoll_wait, read, write.
    syscalls_per_message: ClassVar[dict[str, int]] = {
        "epoll_wait": 1,
        "recvfrom": 1,
        "sendto": 1,
    }
    # Per connection with one message, asyncio's loop (tests/test_syscall_budget.py): accept4
    # and the one that says EAGAIN; getsockname (socket.socket(fileno=)), then asyncio's
    # transport: ioctl(FIONBIO), getsockname, getpeername, epoll_ctl ADD (and DEL at close);
    # epoll_wait for the connection, its message, its EOF and the loop iterations with
    # callbacks ready (zero timeout: the task's steps, connection_made); recvfrom for the
    # message and the EOF, sendto; close. 18 in all. (No setsockopt(TCP_NODELAY): asyncio sets
    # it only when the socket's proto says IPPROTO_TCP, and like every design we leave Nagle on.)
    # uvloop, measured the same way: 17 — epoll_pwait ×4, read ×2, write, one io_uring_enter.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 2,
        "getsockname": 2,
        "getpeername": 1,
        "ioctl": 1,
        "epoll_ctl": 2,
        "epoll_wait": 6,
        "recvfrom": 2,
        "sendto": 1,
        "close": 1,
    }

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.loop not in LOOPS:
            raise ConfigError(f"--loop {config.loop!r}: choose asyncio or uvloop (if installed)")
        if config.loop == "uvloop":
            uvloop_module()

    def start(self) -> None:
        self.slot = self.counters.assign()
        self.counters.bind(self.slot, os.getpid())
        if self.config.loop == "uvloop":
            self.loop: asyncio.AbstractEventLoop = uvloop_module().new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.keeps_views = self.config.loop == "uvloop"
        self.conns: set[EchoProtocol] = set()
        self.connecting = 0  # accepted, not yet connection_made (connect_accepted_socket)
        self.wheel = IdleWheel(self.config.idle_timeout)
        self.ticker: asyncio.TimerHandle | None = None
        self.cutter: asyncio.TimerHandle | None = None
        self.cut_at: float | None = None
        self.listening = False
        self.shed_seen = 0
        self.protocol: Any = lambda: EchoProtocol(self)
        self.store: Store | None = None
        if self.config.service == "kv":
            from lab.sockets.kv import KvSession

            store = self.store = services.open_store(self.config.db_path)
            self.protocol = lambda: KvConnectionProtocol(self, KvSession(store))
        self.new_buffer()

    def new_buffer(self) -> None:
        """The buffer every connection reads into (a fresh one when uvloop kept the old)."""
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.out, self.last = self.view, 0

    def ready_details(self) -> dict[str, object]:
        return {"loop": self.config.loop}

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        loop = self.loop
        loop.add_reader(self.signal_queue.fileno(), self.signals_ready)
        if self.health is not None:
            loop.add_reader(self.health.fileno(), self.answer_health_probes)
        self._listen(True)
        loop.call_soon(self._own_wakeup_fd)
        try:
            loop.run_forever()
        finally:
            if self.listener.fileno() != -1:
                self._listen(False)
                self.listener.close()
            loop.close()
            if self.store is not None:
                self.store.close()

    def _own_wakeup_fd(self) -> None:
        """uvloop took the wake-up fd for its own self-pipe as it started: ours again, so a
        signal's byte lands in the pipe this loop reads (a no-op with asyncio's loop)."""
        signal.set_wakeup_fd(self.signal_queue.fds()[1], warn_on_full_buffer=False)
        # A signal that came before this callback wrote its byte into uvloop's pipe, and uvloop
        # ran our handler (it records): nothing will wake our reader for it, so take it now.
        if self.signal_queue.recorded():
            self.signals_ready()

    def _listen(self, on: bool) -> None:
        if on != self.listening and self.listener.fileno() != -1:
            if on:
                self.loop.add_reader(self.listener.fileno(), self.accept_batch)
            else:
                self.loop.remove_reader(self.listener.fileno())
            self.listening = on

    def signals_ready(self) -> None:
        self.on_signals()
        if self.stopping:
            self.wind_down()

    # -- connections -------------------------------------------------------------------
    def accept_batch(self, limit: int | None = None) -> None:
        accept, limit_n = self.acceptor.accept, self.config.connections
        for _ in range(self.accepts_per_wakeup if limit is None else limit):
            fd = accept()
            if fd is None:
                break
            self.slot.accepted()
            sock = socket.socket(self.listener.family, socket.SOCK_STREAM, 0, fileno=fd)
            self.connecting += 1
            self.loop.create_task(self.connect(sock))
            if limit_n and self.slot.get(stats.ACCEPTED) >= limit_n and not self.stopping:
                if self.tracing:
                    self.log.trace(f"served {limit_n} connection(s): stopping")
                self.begin_stop(drain=False)
                self.wind_down()
                break
        if self.acceptor.shed != self.shed_seen:
            self.slot.accepted_and_shed(self.acceptor.shed - self.shed_seen)
            self.shed_seen = self.acceptor.shed
        if self.acceptor.backoff and not self.stopping:
            remaining = self.acceptor.paused_until - time.monotonic()
            if remaining > 0:  # out of descriptors: stop watching the listener for a while
                self._listen(False)
                self.loop.call_later(remaining, self._resume_listening)

    def _resume_listening(self) -> None:
        if not self.stopping:
            self._listen(True)

    async def connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol, sock)
        except OSError as exc:  # the client went away before the transport was made
            sock.close()
            self.slot.ended(outcome_of(exc), 0, 0)
        finally:
            self.connecting -= 1
        self.check_done()

    def opened(self, protocol: EchoProtocol) -> None:
        self.conns.add(protocol)
        self.wheel.add(protocol)
        if self.ticker is None:
            self.ticker = self.loop.call_later(self.wheel.interval, self.tick)
        if self.cut_at is not None and time.monotonic() >= self.cut_at:
            protocol.end(stats.STOPPED)  # accepted before the deadline, made after it

    def closed(
        self, protocol: EchoProtocol, exc: Exception | None, sent: int | None = None
    ) -> None:
        """The connection ended; ``sent``: the bytes sent (None: the echo's, in - held)."""
        outcome = protocol.outcome or outcome_of(exc)
        if self.tracing:
            if outcome == stats.COMPLETED:
                self.log.trace("the client closed the connection")
            elif outcome == stats.RESET:
                self.log.trace("the client reset the connection")
            elif outcome == stats.ERROR:
                self.log.trace(f"socket error: {exc}")
            else:
                self.log.trace(f"closing the connection: {outcome}")
        self.conns.discard(protocol)
        self.wheel.remove(protocol)
        if sent is None:
            sent = protocol.bytes_in - protocol.held
        self.slot.ended(outcome, protocol.bytes_in, sent)
        protocol.transport = None
        self.check_done()

    def tick(self) -> None:
        """A tick of the idle wheel: close what has been idle for --idle-timeout."""
        for protocol in self.wheel.advance():
            protocol.end(stats.IDLE_TIMEOUT)
        if self.conns:
            self.ticker = self.loop.call_later(self.wheel.interval, self.tick)
        else:
            self.ticker = None

    # -- stopping ------------------------------------------------------------------------
    def wind_down(self) -> None:
        """While stopping: serve what was queued, close the listener, close at the deadline
        what is left (``stopped``), and stop the loop once nothing is open."""
        if self.listener.fileno() != -1:
            if self.drain_on_stop:
                while True:  # what the kernel had queued (close_the_door shrank the backlog)
                    before = self.slot.get(stats.ACCEPTED)
                    self.accept_batch()
                    if self.slot.get(stats.ACCEPTED) == before:
                        break
            self._listen(False)
            self.listener.close()  # from now on a connect is refused
        deadline = self.stop_deadline
        if deadline is not None and deadline != self.cut_at:  # first stop, or a second SIGTERM
            self.cut_at = deadline
            if self.cutter is not None:
                self.cutter.cancel()
            self.cutter = self.loop.call_later(max(0.0, deadline - time.monotonic()), self.cut)
        self.check_done()

    def cut(self) -> None:
        self.killing = True
        for protocol in list(self.conns):
            protocol.end(stats.STOPPED)
        self.check_done()

    def check_done(self) -> None:
        if self.stopping and self.listener.fileno() == -1 and not (self.conns or self.connecting):
            self.loop.stop()
