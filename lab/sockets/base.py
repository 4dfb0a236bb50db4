"""The server lifecycle every design shares, in the spirit of CPython's ``socketserver``:

    bind → listen → start → [ready] → loop: get_request → process_request → close_request
    → on SIGTERM/SIGINT: drain the backlog → finish in-flight work (≤ --grace) → exit 0

A design is a subclass that overrides one step: ``process_request`` (serve inline, fork,
spawn, hand the descriptor to a worker) and, for designs with helper processes, ``start`` and
``finish``. The loop waits in ``poll()`` on the listening socket, the signal pipe and any
descriptors a design adds, so it wakes for connections and signals alike.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import signal
import socket
import time
from typing import ClassVar

from lab.sockets import process, signals
from lab.sockets.accept import Acceptor
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.log import Log
from lab.sockets.stats import STOPPED, WORKER_DIED, ReportPipe, Stats

# Named exit codes of a server process.
EXIT_OK = 0
EXIT_FATAL = 1  # an unexpected error (it is printed)
EXIT_USAGE = 2  # a bad option: one line says which and how to fix it
EXIT_BIND = 3  # could not bind/listen (port in use, no permission, address not here)

HEALTH_BACKLOG = 16  # health probes come every second or two; they never pile up


class BindError(Exception):
    """Binding or listening failed: the message names the fix."""


class Server:
    # -- what a design declares --------------------------------------------------------
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: how it works
    origin: ClassVar[str] = ""  # where it comes from
    # The listen backlog: how many connections the kernel completes and queues (the three-way
    # handshake is done, accept() not yet called) while the server is busy. Linux caps it at
    # net.core.somaxconn. When it is full, Linux does not refuse: it drops the SYN and the
    # client's kernel retransmits it after about 1, 3, 7 … seconds.
    default_backlog: ClassVar[int] = 128
    # The C reference peer this design is measured against (the report's ×C column):
    # ``peer-c-<family>``. "prefork": a process (or thread) that accepts and serves;
    # "fork": a new process per connection; "epoll": event loops on the shared listener.
    family: ClassVar[str] = "prefork"
    # Whether statistics count connections by worker pid (pool designs).
    per_worker_stats: ClassVar[bool] = False
    # At most this many accept() calls per wake-up, so signals and children are looked after.
    accepts_per_wakeup: ClassVar[int] = 64

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        """Reject options this design cannot honour (raise ConfigError)."""
        if config.worker_cmd is not None:
            raise ConfigError(f"--worker-cmd applies only to --design spawn, not {cls.name}")

    def __init__(self, config: ServerConfig, log: Log | None = None) -> None:
        self.config = config
        self.log = log if log is not None else Log(config.trace)
        self.stats = Stats(self.name)
        self.backlog = config.resolved_backlog(self.default_backlog)
        self.stopping = False
        self._stop_deadline: float | None = None
        self.drain_on_stop = True
        self.children: dict[int, str] = {}  # pid → what it is ("worker", "child")
        self.killing = False  # past the grace period: children are being killed
        self.report = ReportPipe(per_worker=self.per_worker_stats)
        self._extra: dict[int, int] = {}  # descriptor → poll events, added by designs
        self.health: socket.socket | None = None

    # -- the Host protocol the echo loop uses -------------------------------------------
    def housekeeping_fds(self) -> tuple[int, ...]:
        fds = (self.signal_queue.fileno(),)
        return fds + ((self.health.fileno(),) if self.health is not None else ())

    def on_housekeeping(self, fd: int) -> None:
        if fd == self.signal_queue.fileno():
            self.on_signals()
        else:
            self.answer_health_probes()

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
        connections, never traced and never count towards --connections — and they are
        answered even while a connection is being served (the echo loop watches this port),
        so a busy iterative server is not reported unhealthy."""
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
        self.signal_queue = signals.SignalQueue(
            (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD)
        )
        self.listener = self.bind_and_listen(self.config.port, self.backlog)
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

    def bind_and_listen(self, port: int, backlog: int, quiet: bool = False) -> socket.socket:
        host = self.config.host
        trace = (lambda text: None) if quiet else self.log.trace
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )[0]
        except socket.gaierror as exc:
            raise BindError(
                f"cannot use --host {host!r} ({exc.strerror}): give an address "
                "of this host, e.g. 0.0.0.0 or ::"
            ) from None
        sock = socket.socket(family, kind, proto)
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
        """Accept and dispatch until asked to stop. A stop with drain (SIGTERM/SIGINT) then
        keeps the loop going until the backlog is empty — serving what the kernel already
        completed instead of resetting it, waiting for room where a design is at its cap —
        or until the grace period is over."""
        poller = select.poll()
        poller.register(self.signal_queue.fileno(), select.POLLIN)
        poller.register(self.report.read_fd, select.POLLIN)
        if self.health is not None:
            poller.register(self.health, select.POLLIN)
        listening = False
        while True:
            now = time.monotonic()
            ready = self.accepting() and not self.acceptor.paused(now)
            if self.stopping:
                if not self.drain_on_stop or now >= (self._stop_deadline or now):
                    break
                if ready:
                    request = self.get_request()
                    if request is None:
                        break  # the backlog is empty
                    self.handle(*request)
                    continue
            for fd, events in self._extra.items():
                poller.register(fd, events)  # register() also modifies
            want = ready and not self.stopping
            if want != listening:
                if want:
                    poller.register(self.listener, select.POLLIN)
                else:
                    poller.unregister(self.listener)
                listening = want
            timeout = self.poll_timeout(now)
            if self.stopping and self._stop_deadline is not None:
                timeout = min(timeout or math.inf, self._stop_deadline - now)
            for fd, events in poller.poll(None if timeout is None else timeout * 1000):
                if fd == self.signal_queue.fileno():
                    self.on_signals()
                elif fd == self.listener.fileno():
                    if not self.stopping:
                        self.accept_ready()
                elif fd == self.report.read_fd:
                    self.collect()
                elif self.health is not None and fd == self.health.fileno():
                    self.answer_health_probes()
                else:
                    self.on_ready(fd, events)
            self.tick()
        # Close the listening socket: connections that arrive from now on are refused.
        self.listener.close()

    def accepting(self) -> bool:
        """Whether the loop should accept now (designs at their cap say no)."""
        return True

    def poll_timeout(self, now: float) -> float | None:
        if self.acceptor.paused(now):
            return self.acceptor.paused_until - now
        return None

    def accept_ready(self) -> None:
        for _ in range(self.accepts_per_wakeup):
            request = self.get_request()
            if request is None:
                break
            self.handle(*request)
            if self.stopping or not self.accepting():
                break

    def get_request(self) -> tuple[socket.socket, object] | None:
        shed_before = self.acceptor.shed
        request = self.acceptor.accept()
        shed = self.acceptor.shed - shed_before
        self.stats.accepted += shed
        self.stats.shed += shed
        return request

    def handle(self, conn: socket.socket, address: object) -> None:
        self.stats.accepted += 1
        try:
            self.process_request(conn, address)
        finally:
            self.close_request(conn)
        limit = self.config.connections
        if limit and self.stats.accepted >= limit and not self.stopping:
            self.log.trace(f"served {limit} connection(s): stopping")
            self.begin_stop(drain=False)

    def process_request(self, conn: socket.socket, address: object) -> None:
        raise NotImplementedError

    def close_request(self, conn: socket.socket) -> None:
        conn.close()

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

    def handle_term(self) -> None:
        self.begin_stop()

    def handle_int(self) -> None:
        self.begin_stop()

    def handle_usr1(self) -> None:
        self.collect()
        self.log.line(self.stats_line())

    def handle_chld(self) -> None:
        # Reap first, then read the report pipe: a child writes its record before it exits,
        # so every record of a reaped child is in the pipe by now (the other order can see the
        # exit but not yet the record, and count the connection twice).
        ended = process.reap()
        self.collect()
        for pid, status in ended:
            role = self.children.pop(pid, None)
            if role is not None:
                self.child_exited(pid, status, role)

    def finish(self) -> None:
        """Let in-flight work finish until the deadline, then kill what is left; reap all."""
        self.wait_for_children()

    def wait_for_children(self) -> None:
        poller = select.poll()
        poller.register(self.signal_queue.fileno(), select.POLLIN)
        poller.register(self.report.read_fd, select.POLLIN)
        while self.children:
            remaining = (self._stop_deadline or 0.0) - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                if fd == self.report.read_fd:
                    self.collect()
                else:
                    self.on_signals()
            self.handle_chld()
        if self.children:
            self.killing = True
            self.log.notice(f"grace period over: killing {len(self.children)} process(es)")
            for pid in self.children:
                self._kill(pid, signal.SIGKILL)
            for pid in list(self.children):
                try:
                    _, status = os.waitpid(pid, 0)
                except ChildProcessError:
                    continue
                role = self.children.pop(pid)
                self.collect()
                self.child_exited(pid, status, role)

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signum)

    def child_exited(self, pid: int, status: int, role: str) -> None:
        """A child ended: count the connections it held and never reported."""
        lost = self.report.open.pop(pid, 0)
        if lost > 0:
            reason = STOPPED if self.killing else WORKER_DIED
            self.stats.failed[reason] += lost
            if not self.killing:
                self.log.notice(
                    f"{role} {pid} {signals.explain_status(status)} "
                    f"while serving {lost} connection(s)"
                )

    def collect(self) -> None:
        """Fold records from the processes that serve into the statistics."""
        self.report.drain(self.stats)

    def stats_line(self) -> str:
        self.stats.workers_alive = sum(1 for r in self.children.values() if r == "worker")
        return self.stats.to_json()

    def close(self) -> None:
        if self.listener.fileno() != -1:
            self.listener.close()
        if self.health is not None:
            self.health.close()
        self.acceptor.close()
