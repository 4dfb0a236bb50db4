"""sendmsg — the server accepts; pre-started workers receive each connection as a descriptor.

The server makes an AF_UNIX socketpair (no filesystem path: only processes that inherit an end
can use it), forks the workers, then loops accept() → sendmsg() → close(). The descriptor rides
in an ``SCM_RIGHTS`` control message: the kernel installs a new descriptor for the same open
connection in whichever worker receives the message with recvmsg(). While the message waits in
the socket's queue, the kernel holds the connection open for it — so the server may close its
copy at once, and may send to a worker that "does not exist yet": the queue is the hand-off.

The pair is SOCK_SEQPACKET: each sendmsg() is one message, received whole by one recvmsg(), so
two workers never split a message. The queue is bounded by the socket's send buffer — a few
hundred descriptors — after which sendmsg() says EAGAIN.

Pool rules: workers tell the server over the same socketpair when they are idle (``I pid``),
busy (``B pid``) or retiring (``R pid``). When a descriptor is queued and no worker is idle, the
server starts another, up to --max-workers; the new worker takes what is queued. Workers above
--workers that stay idle for --worker-idle seconds retire. sendmsg() never blocks accept(): when
the queue is full the server grows the pool and holds that one connection until the queue has
room, or — at the maximum — closes it and counts it as shed.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time

from lab.sockets import process
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.echo import echo
from lab.sockets.log import Log
from lab.sockets.pool import PoolServer, PoolWorker
from lab.sockets.stats import ReportPipe

CONNECTION = b"c"  # a message carrying a descriptor
STOP = b"q"  # a message telling one worker to leave (after everything queued before it)
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


class SendmsgServer(PoolServer):
    name = "sendmsg"
    summary = "the server accepts and passes each descriptor (SCM_RIGHTS) to recvmsg() workers"
    origin = "the chapter's sendmsg()/recvmsg() server; Stevens UNP ch. 30 server 5"

    def start(self) -> None:
        self.channel, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.setblocking(False)
        self.worker_end.setblocking(False)  # workers poll it; two may wake for one message
        self.state: dict[int, str] = {}  # worker pid → "idle", "busy" or "retiring"
        self.queued = 0  # descriptors sent and not yet picked up (as far as we know)
        self.held: socket.socket | None = None  # a connection waiting for room in the queue
        self._extra[self.channel.fileno()] = select.POLLIN
        self.next_extra = False  # whether the worker being forked is above --workers
        super().start()

    def ready_details(self) -> dict[str, object]:
        return {"workers": self.config.pool_size, "max_workers": self.config.pool_max}

    # -- the pool ------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.pool_max < config.pool_size:
            raise ConfigError(
                f"--max-workers {config.pool_max} is below --workers {config.pool_size}: raise it"
            )

    def spawn_worker(self) -> int:
        # Decided here, in the parent, before fork(): the child cannot see itself counted.
        self.next_extra = len(self.workers) >= self.config.pool_size
        pid = super().spawn_worker()
        self.state[pid] = "idle"  # counted idle from birth: it will take what is queued
        return pid

    def worker_keeps(self) -> list[int]:
        return [self.worker_end.fileno()]

    def worker_main(self) -> int:
        worker = DescriptorWorker(
            self.worker_end, self.config, self.report, self.log, self.next_extra
        )
        return worker.run()

    def idle_workers(self) -> int:
        return sum(1 for s in self.state.values() if s == "idle")

    def grow_if_needed(self) -> bool:
        self.read_worker_messages()  # decide on what the workers said, not on stale state
        if self.queued > self.idle_workers() and len(self.workers) < self.config.pool_max:
            pid = self.spawn_worker()
            self.log.trace(f"{self.queued} queued, none idle: worker {pid} added to the pool")
            return True
        return False

    def expected_exit(self, pid: int) -> bool:
        return self.state.pop(pid, None) == "retiring"

    def child_exited(self, pid: int, status: int, role: str) -> None:
        self.state.setdefault(pid, "dead")
        super().child_exited(pid, status, role)
        self.state.pop(pid, None)

    def maintain_pool(self) -> int:
        """At least --workers, and one more while descriptors wait and no worker is idle."""
        started = super().maintain_pool()
        if not self.stopping and self.grow_if_needed():
            started += 1
        return started

    # -- accept → sendmsg → close --------------------------------------------------------
    def accepting(self) -> bool:
        return self.held is None

    def process_request(self, conn: socket.socket, address: object) -> None:
        if not self.pass_descriptor(conn):
            if len(self.workers) < self.config.pool_max:
                # Queue full: hold this one connection (a dup: close_request closes ours),
                # stop accepting, and start a worker to empty the queue.
                self.held = conn.dup()
                self._extra[self.channel.fileno()] = select.POLLIN | select.POLLOUT
                self.spawn_worker()
            else:
                self.stats.shed += 1
                self.log.trace("descriptor queue full and pool at --max-workers: shed")

    def pass_descriptor(self, conn: socket.socket) -> bool:
        fds = array.array("i", [conn.fileno()])
        try:
            self.channel.sendmsg([CONNECTION], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # ETOOMANYREFS: too many descriptors in flight for this user
            return False
        self.queued += 1
        self.log.trace("sendmsg() is OK: descriptor queued for the workers")
        self.grow_if_needed()
        return True

    def on_ready(self, fd: int, events: int) -> None:
        if events & select.POLLOUT and self.held is not None and self.pass_descriptor(self.held):
            self.held.close()
            self.held = None
            self._extra[self.channel.fileno()] = select.POLLIN
        if events & select.POLLIN:
            self.read_worker_messages()

    def read_worker_messages(self) -> None:
        while True:
            try:
                message = self.channel.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            kind, _, pid_text = message.partition(b" ")
            pid = int(pid_text or 0)
            if pid not in self.state:
                continue
            if kind == b"B":
                self.state[pid] = "busy"
                self.queued = max(0, self.queued - 1)
                self.report.opened(pid)
            elif kind == b"I":
                self.state[pid] = "idle"
            elif kind == b"R":
                self.state[pid] = "retiring"
        # (a worker that dies between recvmsg() and "B" loses that connection: it is counted
        # when the worker is reaped only if it said "B" first; the queue estimate may drift up
        # by one, which at worst starts one worker too many)

    def collect(self) -> None:
        super().collect()
        self.read_worker_messages()  # a reaped worker's "B"/"R" count before its exit does

    def tick(self) -> None:
        super().tick()
        if not self.stopping:
            self.grow_if_needed()

    # -- stopping --------------------------------------------------------------------------
    def finish(self) -> None:
        """Everything queued is served first: after the backlog is drained, one STOP message per
        worker goes into the same queue, behind the descriptors."""
        if self.held is not None:
            self.channel.setblocking(True)
            self.channel.settimeout(max(0.0, (self.stop_deadline or 0) - time.monotonic()))
            if not self.pass_descriptor(self.held):
                self.stats.shed += 1
            self.held.close()
            self.held = None
        self.channel.setblocking(True)
        for _ in self.workers:
            remaining = (self.stop_deadline or 0) - time.monotonic()
            if remaining <= 0:
                break
            self.channel.settimeout(remaining)
            try:
                self.channel.send(STOP)
            except OSError:
                break
        self.channel.setblocking(False)  # back to polling: workers' last messages, then exits
        self.wait_for_children()

    def close(self) -> None:
        super().close()
        self.channel.close()
        self.worker_end.close()


class DescriptorWorker(PoolWorker):
    """One worker: recvmsg() a descriptor, serve that connection to its end, again."""

    def __init__(
        self,
        channel: socket.socket,
        config: ServerConfig,
        report: ReportPipe,
        log: Log,
        extra: bool,
    ) -> None:
        super().__init__(config, report, log)
        self.channel = channel
        self.extra = extra  # started above --workers: retires after --worker-idle idle seconds
        self.pid = os.getpid()

    def tell(self, kind: bytes) -> None:
        """Tell the server our state; the channel is shared and non-blocking, so wait for
        room rather than lose the message."""
        message = kind + b" %d" % self.pid
        while True:
            try:
                self.channel.send(message)
                return
            except (BlockingIOError, InterruptedError):
                select.select([], [self.channel], [], 1.0)
            except (BrokenPipeError, ConnectionRefusedError, ConnectionResetError):
                # The server's end is closed: it died, and our death signal is on its way.
                os._exit(process.EXIT_PARENT_GONE)

    def run(self) -> int:
        # EPOLLEXCLUSIVE: one idle worker wakes per message, not all (the thundering herd).
        poller = select.epoll()
        poller.register(self.channel, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        poller.register(self.signal_queue.fileno(), select.EPOLLIN)
        self.tell(b"I")
        idle_since = time.monotonic()
        while not self.stopping:
            timeout = -1.0
            if self.extra:
                timeout = idle_since + self.config.worker_idle - time.monotonic()
                if timeout <= 0:
                    self.tell(b"R")
                    self.log.trace(f"idle for {self.config.worker_idle:g} s: worker retires")
                    return process.EXIT_OK
            for fd, _ in poller.poll(timeout):
                if fd == self.signal_queue.fileno():
                    self.on_housekeeping(fd)
                    continue
                received = self.receive()
                if received is STOP:
                    return process.EXIT_OK
                if isinstance(received, socket.socket):
                    self.serve(received)
                    self.tell(b"I")
                    idle_since = time.monotonic()
        return process.EXIT_OK

    def receive(self) -> socket.socket | bytes | None:
        try:
            message, ancillary, _flags, _ = self.channel.recvmsg(16, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return None  # another worker took it
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if message == STOP:
            return STOP
        if not fds:
            return None  # MSG_CTRUNC: we had no descriptor free to receive it into
        self.log.trace("recvmsg() is OK: got a connection")
        return socket.socket(fileno=fds[0])

    def serve(self, conn: socket.socket) -> None:
        self.tell(b"B")
        outcome, bytes_in, bytes_out = echo(conn, self.config.idle_timeout, self.log, self)
        conn.close()
        self.report.ended(outcome, bytes_in, bytes_out)
