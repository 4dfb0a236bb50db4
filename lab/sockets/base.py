"""The server lifecycle every design shares, in the spirit of CPython's ``socketserver``:

    bind → listen → start → [ready] → loop: get_request → process_request → close_request
    → on SIGTERM/SIGINT: drain what was queued → finish in-flight work (≤ --grace) → exit 0

A design is a subclass that overrides one step: ``process_request`` (fork, spawn, hand the
descriptor to a worker) and, for designs with helper processes, ``start`` and ``finish``; a design
whose single process serves connections itself (``iterative``) overrides ``run``. Child
processes — starting, reaping, explaining, killing at the deadline — are not here but in
:class:`~lab.sockets.supervise.ChildProcesses`, which the process designs mix in (as
``socketserver`` keeps forking in ``ForkingMixIn``); thread and event-loop designs do without.

The loop here is a *supervising* loop: it waits in ``poll()`` on the listening socket, the
signal pipe, the health port and any descriptor a design adds, and it accepts until the queue
is empty before it waits again — so under load a ``poll()`` is paid per batch of connections,
not per connection. Signals are recorded by the handler and handled here
(:class:`~lab.sockets.signals.SignalQueue`).

Stopping drains the listen queue without letting newcomers in: ``listen(fd, 0)`` on the
listening socket shrinks its backlog, so the kernel queues no new handshakes (it drops their
SYNs: the clients retry and find the listener closed), while the connections already queued —
their number is ``tcpi_unacked`` of the listener's ``TCP_INFO`` — are accepted and served. Then
the listener is closed; a connection that raced into the queue in between is reset by the
kernel (one or two at most, under load).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import signal
import socket
import struct
import time

from lab.sockets import signals
from lab.sockets.accept import Acceptor
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.log import Log
from lab.sockets.serving import set_timeouts
from lab.sockets.stats import Counters, ReportPipe, Stats

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

# Named exit codes of a server process.
EXIT_OK = 0
EXIT_FATAL = 1  # an unexpected error (it is printed)
EXIT_USAGE = 2  # a bad option: one line says which and how to fix it
EXIT_BIND = 3  # could not bind/listen (port in use, no permission, address not here)

MESSAGE_BUDGET = {"readv": 1, "write": 1}  # per echoed message, every design
HEALTH_BACKLOG = 16  # health probes come every second or two; they never pile up
# The signals every server process routes to its owner (children inherit the handlers).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD, signal.SIGALRM)


class BindError(Exception):
    """Binding or listening failed: the message names the fix."""


def accept_queue_length(listener: socket.socket) -> int:
    """How many completed connections wait in a listening socket's accept queue: Linux reports
    it as ``tcpi_unacked`` in the listener's TCP_INFO (and the backlog as ``tcpi_sacked``)."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(struct.unpack_from("8B6I", info)[12])
    except OSError:
        return 0


class Server:
    # -- what a design declares --------------------------------------------------------
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: how it works
    origin: ClassVar[str] = ""  # where it comes from
    # The C reference peer this design is measured against (the report's ×C column):
    # ``peer-c-<family>``. "prefork": a process (or thread) that accepts and serves;
    # "fork": a new process per connection; "epoll": event loops on the shared listener.
    family: ClassVar[str] = "prefork"
    # The listen backlog: how many connections the kernel completes and queues (the three-way
    # handshake is done, accept() not yet called) while the server is busy. Linux caps it at
    # net.core.somaxconn. When it is full, Linux does not refuse: it drops the SYN and the
    # client's kernel retransmits it after about 1, 3, 7 … seconds.
    default_backlog: ClassVar[int] = 128
    # Whether statistics count connections by worker pid (pool designs).
    per_worker_stats: ClassVar[bool] = False
    # How it serves many clients, in a few words ("a process per connection", "a pool of
    # threads" …): `lab designs`, the report and the claims read it.
    model: ClassVar[str] = ""
    # What --workers sizes: "processes", "threads", or None (the design takes no --workers).
    # The measurements give every design with a pool the same number.
    pool_of: ClassVar[str | None] = None
    # Whether its pool grows under load up to --max-workers (the sweep pins it to --workers).
    grows: ClassVar[bool] = False
    # Options that make it serve one connection at a time (its queue then holds the rest); None:
    # it cannot (an event loop serves every connection it accepted).
    serial_options: ClassVar[tuple[str, ...] | None] = None
    # At most this many accept() calls per wake-up, so signals and children are looked after.
    accepts_per_wakeup: ClassVar[int] = 64
    # The system-call budget, held by tests/test_syscall_budget.py: per echoed message (one
    # client, one message in flight) exactly these — for the blocking designs one readv and one
    # write (MESSAGE_BUDGET); an event loop adds its wake-up (epoll_wait) — and per connection
    # (with one message, a client that connects one at a time, tracing off) at most these, by
    # name, for every process and thread of the server together ("total": a bound on the sum).
    syscalls_per_message: ClassVar[dict[str, int]] = MESSAGE_BUDGET
    syscalls_per_connection: ClassVar[dict[str, int]] = {}
    # --accept-lock values this design takes → the system calls the lock adds per connection
    # (the budget test holds each variant to the design's budget plus these); any other value
    # is refused.
    accept_locks: ClassVar[dict[str, dict[str, int]]] = {"none": {}}
    # Whether --worker-cmd (a program that serves each connection) applies.
    takes_worker_cmd: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        """Reject options this design cannot honour (raise ConfigError)."""
        if config.worker_cmd is not None and not cls.takes_worker_cmd:
            raise ConfigError(f"--worker-cmd applies only to --design spawn, not {cls.name}")
        if config.accept_lock not in cls.accept_locks:
            if len(cls.accept_locks) == 1:
                raise ConfigError(
                    f"--accept-lock {config.accept_lock} does not apply to {cls.name} (no lock "
                    "around its accept()): leave it at none (`lab designs` says which take one)"
                )
            raise ConfigError(
                f"--accept-lock {config.accept_lock} does not apply to {cls.name}: use "
                + " or ".join(cls.accept_locks)
            )

    def __init__(self, config: ServerConfig, log: Log | None = None) -> None:
        self.config = config
        self.log = log if log is not None else Log(config.trace)
        self.tracing = self.log.tracing
        self.stats = Stats(self.name, per_worker_enabled=self.per_worker_stats)
        self.backlog = config.resolved_backlog(self.default_backlog)
        self.stopping = False
        self._stop_deadline: float | None = None
        self.drain_on_stop = True
        self.killing = False  # past the grace period: what is still in flight is being cut
        self.counters = Counters(self.counter_slots())
        self.report: ReportPipe | None = None  # spawn's programs report on a pipe
        self._extra: dict[int, int] = {}  # descriptor → poll events, added by designs
        self.health: socket.socket | None = None

    def counter_slots(self) -> int:
        """How many processes count at once (shared-memory slots); 1: the server itself."""
        return 1

    @property
    def stop_deadline(self) -> float | None:
        return self._stop_deadline

    def on_signals(self) -> None:
        for signum in self.signal_queue.pending():
            handler = getattr(self, signals.handler_name(signum), None)
            if handler is not None:
                handler()

    def answer_health_probes(self) -> None:
        """A probe on the health port gets "ok" and a close. Probes are counted apart from
        connections, never traced and never count towards --connections."""
        assert self.health is not None
        while True:
            try:
                probe, _ = self.health.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors, or the probe went away: it will retry
            with contextlib.suppress(OSError):
                probe.setblocking(False)
                probe.send(b"ok\n")
            probe.close()
            self.stats.health_probes += 1

    # -- lifecycle ----------------------------------------------------------------------
    def serve_forever(self) -> int:
        self.signal_queue = signals.SignalQueue(SIGNALS)
        self.listener = self.bind_and_listen(self.config.port, self.backlog)
        # Inherited by every accepted socket (and by a descriptor passed on): the idle timeout
        # costs no system call per connection or message. See lab.sockets.serving.
        set_timeouts(self.listener, self.config.idle_timeout)
        self.health = (
            self.bind_and_listen(self.config.health_port, HEALTH_BACKLOG, quiet=True)
            if self.config.health_port
            else None
        )
        self.acceptor = Acceptor(self.listener, self.log)
        self.start()
        self.announce_ready()
        try:
            self.run()
            self.finish()
        finally:
            self.close()
        self.log.line(self.stats_line())
        return EXIT_OK

    def passive_socket(self, port: int) -> tuple[socket.socket, tuple[object, ...]]:
        """A TCP socket for --host's first address (``getaddrinfo`` with AI_PASSIVE), not yet
        bound, and the address to bind it to."""
        host = self.config.host
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )[0]
        except socket.gaierror as exc:
            raise BindError(
                f"cannot use --host {host!r} ({exc.strerror}): give an address "
                "of this host, e.g. 0.0.0.0 or ::"
            ) from None
        return socket.socket(family, kind, proto), address

    def bind_and_listen(self, port: int, backlog: int, quiet: bool = False) -> socket.socket:
        host = self.config.host
        trace = (lambda text: None) if quiet else self.log.trace
        sock, address = self.passive_socket(port)
        trace("socket() is OK")
        # SO_REUSEADDR lets a restarted server bind while old connections sit in TIME_WAIT;
        # it does not let two servers listen on one port (that would be SO_REUSEPORT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            trace("bind() is OK")
            sock.listen(backlog)
            trace("listen() is OK")
        except OSError as exc:
            sock.close()
            flag = "--health-port / LAB_HEALTH_PORT" if quiet else "--port / LAB_PORT"
            raise BindError(self._bind_hint(exc, host, port, flag)) from None
        sock.setblocking(False)  # we poll() it; accept() must never block the loop
        return sock

    @staticmethod
    def _bind_hint(exc: OSError, host: str, port: int, flag: str) -> str:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} is already in use on {host}: stop whatever holds it "
                f"(ss -ltnp) or choose another with {flag}"
            )
        if exc.errno == errno.EACCES:
            return f"no permission to bind port {port}: choose a port above 1023 with {flag}"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this host: use 0.0.0.0, :: or one of its own"
        return f"cannot listen on {host}:{port}: {exc.strerror}"

    def start(self) -> None:
        """Start helper processes (pool designs). Runs after listen(), before ready."""

    def announce_ready(self) -> None:
        host, port = self.listener.getsockname()[:2]
        extra = "".join(f" {k}={v}" for k, v in self.ready_details().items())
        self.log.line(
            f"ready design={self.name} address={host} port={port} pid={os.getpid()} "
            f"backlog={self.backlog}{extra}"
        )

    def ready_details(self) -> dict[str, object]:
        return {}

    def run(self) -> None:
        """Accept and dispatch until asked to stop; then drain what the kernel had queued when
        the stop began (see the module docstring) — waiting for room where a design is at its
        cap — or until the grace period is over."""
        poller = select.poll()
        signal_fd = self.signal_queue.fileno()
        poller.register(signal_fd, select.POLLIN)
        report_fd = self.report.read_fd if self.report is not None else -1
        if report_fd >= 0:
            poller.register(report_fd, select.POLLIN)
        health_fd = self.health.fileno() if self.health is not None else -1
        if health_fd >= 0:
            poller.register(health_fd, select.POLLIN)
        listener_fd = self.listener.fileno()
        registered: dict[int, int] = {}
        listening = False
        while True:
            ready = self.accepting() and not self.acceptor.paused(time.monotonic())
            if self.stopping:
                now = time.monotonic()
                if not self.drain_on_stop or now >= (self._stop_deadline or now):
                    break
                if ready:
                    fd = self.get_request()
                    if fd is None:
                        break  # the queue is empty
                    self.handle(fd)
                    continue
            if self._extra != registered:
                for fd in registered.keys() - self._extra.keys():
                    poller.unregister(fd)
                for fd, events in self._extra.items():
                    poller.register(fd, events)  # register() also modifies
                registered = dict(self._extra)
            want = ready and not self.stopping
            if want != listening:
                if want:
                    poller.register(listener_fd, select.POLLIN)
                else:
                    poller.unregister(listener_fd)
                listening = want
            timeout = self.poll_timeout(time.monotonic())
            if self.stopping and self._stop_deadline is not None:
                timeout = min(timeout or math.inf, self._stop_deadline - time.monotonic())
            for fd, events in poller.poll(None if timeout is None else max(0.0, timeout) * 1000):
                if fd == listener_fd:
                    if not self.stopping:
                        self.accept_ready()
                elif fd == signal_fd:
                    self.on_signals()
                elif fd == report_fd:
                    self.collect()
                elif fd == health_fd:
                    self.answer_health_probes()
                else:
                    self.on_ready(fd, events)
            self.tick()
        # Close the listening socket: connections that arrive from now on are refused.
        self.listener.close()

    def accepting(self) -> bool:
        """Whether the loop should accept now (designs at their cap say no, through
        :meth:`at_cap`)."""
        return True

    _said_at_cap = False

    def at_cap(self, cap: int, option: str) -> bool:
        """A design at its cap of connections at once: say so the first time (one line for
        the server's life, not one per wake-up: a lab under a storm stays at the cap); the
        clients wait in the backlog meanwhile. Returns False, for ``accepting()``. (The event
        loops' cap is the descriptor limit: accept()'s EMFILE policy says it once an episode.)"""
        if not self._said_at_cap:
            self._said_at_cap = True
            self.log.notice(
                f"at the cap of {cap} connection(s) at once ({option}): not accepting until one "
                "ends; newcomers wait in the backlog (said once)"
            )
        return False

    def poll_timeout(self, now: float) -> float | None:
        if self.acceptor.paused(now):
            return self.acceptor.paused_until - now
        return None

    def accept_ready(self) -> None:
        for _ in range(self.accepts_per_wakeup):
            fd = self.get_request()
            if fd is None:
                break
            self.handle(fd)
            if self.stopping or not self.accepting():
                break

    def get_request(self) -> int | None:
        shed_before = self.acceptor.shed
        fd = self.acceptor.accept()
        if self.acceptor.shed != shed_before:
            shed = self.acceptor.shed - shed_before
            self.stats.accepted += shed
            self.stats.shed += shed
        return fd

    def handle(self, fd: int) -> None:
        self.stats.accepted += 1
        try:
            self.process_request(fd)
        finally:
            self.close_request(fd)
        limit = self.config.connections
        if limit and self.stats.accepted >= limit and not self.stopping:
            self.log.trace(f"served {limit} connection(s): stopping")
            self.begin_stop(drain=False)

    def process_request(self, fd: int) -> None:
        raise NotImplementedError

    def close_request(self, fd: int) -> None:
        os.close(fd)

    def on_ready(self, fd: int, events: int) -> None:
        """A descriptor a design registered in ``_extra`` is ready."""

    def tick(self) -> None:
        """Once per loop iteration: timers and pool rules."""

    # -- stopping -----------------------------------------------------------------------
    def begin_stop(self, drain: bool = True) -> None:
        if self.stopping:
            # A second SIGTERM/SIGINT: stop waiting for in-flight connections.
            self._stop_deadline = time.monotonic()
            return
        self.stopping = True
        self.drain_on_stop = drain
        self._stop_deadline = time.monotonic() + self.config.grace
        if drain:
            self.close_the_door()

    def close_the_door(self) -> None:
        """Let no new connection into the queue; those already queued will be served."""
        queued = accept_queue_length(self.listener)
        with contextlib.suppress(OSError):
            self.listener.listen(0)
        if self.tracing:
            self.log.trace(f"stopping: serving the {queued} queued connection(s), no new ones")

    def handle_term(self) -> None:
        self.begin_stop()

    def handle_int(self) -> None:
        self.begin_stop()

    def handle_usr1(self) -> None:
        self.collect()
        self.log.line(self.stats_line())

    def finish(self) -> None:
        """After the loop: what is still in flight ends within the grace period. A design that
        serves in the loop's own process has nothing left here; those with helper processes or
        threads wait for them (:class:`~lab.sockets.supervise.ChildProcesses`)."""

    def collect(self) -> None:
        """Fold records from spawned programs into the statistics."""
        if self.report is not None:
            self.report.drain(self.stats)

    def current_stats(self) -> Stats:
        return self.counters.snapshot(self.stats)

    def stats_line(self) -> str:
        stats = self.current_stats()
        stats.workers_alive = self.workers_alive()
        return stats.to_json()

    def workers_alive(self) -> int:
        """Pre-started workers now running (the stats line's ``workers_alive``)."""
        return 0

    def close(self) -> None:
        if self.listener.fileno() != -1:
            self.listener.close()
        if self.health is not None:
            self.health.close()
        self.acceptor.close()
