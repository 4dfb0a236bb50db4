"""sendmsg — the server accepts; pre-started workers receive each connection as a descriptor.

The server makes an AF_UNIX socketpair (no filesystem path: only processes that inherit an end
can use it), forks the workers, then loops accept() → sendmsg() → close(), waiting for the next
connection blocked in accept() rather than in poll() (:mod:`lab.sockets.blocking`: one system
call per connection less, and no EAGAIN when the queue runs dry). The descriptor rides
in an ``SCM_RIGHTS`` control message: the kernel installs a new descriptor for the same open
connection in whichever worker receives the message with recvmsg(). While the message waits in
the socket's queue, the kernel holds the connection open for it — so the server may close its
copy at once, and may send to a worker that "does not exist yet": the queue is the hand-off.

The pair is SOCK_SEQPACKET: each sendmsg() is one message, received whole by one recvmsg(), so
two workers never split a message. Workers block in ``recvmsg()`` on their shared end; like
``accept()``, a blocking receive on a Unix socket is an exclusive wait, so one worker wakes per
message. The queue is bounded by the socket's send buffer — a few hundred descriptors — after
which sendmsg() says EAGAIN. A socket option rides along: the listening socket's
``SO_RCVTIMEO``/``SO_SNDTIMEO`` (the idle timeout) belong to the socket, so the passed
connection has them in the worker too.

Pool rules, read from shared memory (no message per connection): each worker's slot says how
many descriptors it received and whether it is busy. Queued = sent − received: exact, except for
a worker that died between ``recvmsg()`` and counting — so whenever the count says a worker is
needed, the kernel is asked first (``SIOCOUTQ``: bytes this end sent that nobody has received
yet; 0 means the queue is empty and the count is resynchronised). When descriptors are queued
and no worker is idle, the server starts another, up to --max-workers; workers above --workers
that wait --worker-idle seconds for a descriptor (the shared end's ``SO_RCVTIMEO``) retire.
sendmsg() never blocks accept(): when the queue is full the server grows the pool and holds that
one connection until the queue has room, or — at the maximum — closes it and counts it as shed.

Stopping: the server drains the listen queue, then puts one STOP message per worker into the
same queue, behind the descriptors, so everything queued is served first. Workers ignore SIGTERM
and SIGINT (a worker that left on its own would strand what is queued for it): STOP, or the
parent's SIGKILL at the end of the grace period, ends them.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import termios
import time

from lab.sockets import process, services
from lab.sockets.blocking import BlockingAccept
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.log import Log
from lab.sockets.pool import PoolServer
from lab.sockets.serving import Serving, set_timeouts
from lab.sockets.stats import BUSY, IDLE, RECEIVED, STATE, STOPPED, Slot

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

CONNECTION = b"c"  # a message carrying a descriptor
STOP = b"q"  # a message telling one worker to leave (after everything queued before it)
RETIRING = 2  # a slot's STATE: an extra worker leaving after --worker-idle idle seconds
_FD = struct.Struct("i")  # one descriptor in an SCM_RIGHTS control message (a C int)
_FD_SPACE = socket.CMSG_SPACE(_FD.size)
_MESSAGE = [CONNECTION]  # sendmsg()'s buffers, the same list every time
_SOL, _RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS


def unsent_bytes(sock: socket.socket) -> int:
    """SIOCOUTQ (= TIOCOUTQ) of a Unix socket: bytes it sent that are not yet received."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except OSError:
        return -1


class SendmsgServer(BlockingAccept, PoolServer):
    name = "sendmsg"
    summary = "the server accepts and passes each descriptor (SCM_RIGHTS) to recvmsg() workers"
    origin = "the chapter's sendmsg()/recvmsg() server; Stevens UNP ch. 30 server 5"
    model = "a pool of processes fed descriptors"
    grows = True
    # Per connection with one message (tests/test_syscall_budget.py). Parent: accept4 (blocked
    # in it: no poll, no EAGAIN), sendmsg, close. Worker: recvmsg, the message's readv and
    # write, the EOF readv, close.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 1,
        "sendmsg": 1,
        "close": 2,
        "recvmsg": 1,
        "readv": 2,
        "write": 1,
    }

    def start(self) -> None:
        self.channel, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.setblocking(False)
        # Workers block in recvmsg(); an extra worker gives up after --worker-idle seconds.
        set_timeouts(self.worker_end, self.config.worker_idle)
        self.sent = 0  # descriptors sent
        self.received_gone = 0  # descriptors received by workers that have since ended
        self.held: int | None = None  # a connection waiting for room in the queue
        self.next_extra = False  # whether the worker being forked is above --workers
        self.may_grow = self.config.pool_max > self.config.pool_size
        self.counted = bool(self.config.connections)  # --connections: the general path counts
        self.too_many_refs = False  # inside an ETOOMANYREFS episode
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
        return super().spawn_worker()

    def worker_keeps(self) -> list[int]:
        return [self.worker_end.fileno()]

    def worker_main(self, slot: Slot) -> int:
        worker = DescriptorWorker(self.worker_end, self.config, self.log, slot, self.next_extra)
        return worker.run()

    def queued(self) -> int:
        """Descriptors sent and not yet received (see the docstring)."""
        received = self.received_gone + sum(s.get(RECEIVED) for s in self.counters.live())
        if self.sent < received:  # over-corrected by a resync that raced a worker: re-base
            self.sent = received
        return self.sent - received

    def idle_workers(self) -> int:
        return sum(1 for s in self.counters.live() if s.get(STATE) == IDLE)

    def grow_if_needed(self) -> bool:
        if len(self.children) >= self.config.pool_max:  # every child here is a worker
            return False
        queued = self.queued()
        if queued <= 0 or queued <= self.idle_workers():
            return False
        if unsent_bytes(self.channel) == 0:  # the kernel says the queue is empty: resync
            self.sent -= queued
            return False
        pid = self.spawn_worker()
        if self.tracing:
            self.log.trace(f"{queued} queued, none idle: worker {pid} added to the pool")
        return True

    def expected_exit(self, pid: int) -> bool:
        slot = self.counters.by_pid.get(pid)
        return slot is not None and slot.get(STATE) == RETIRING

    def child_exited(self, pid: int, status: int, role: str) -> None:
        slot = self.counters.by_pid.get(pid)
        if slot is not None:
            self.received_gone += slot.get(RECEIVED)
        super().child_exited(pid, status, role)

    def maintain_pool(self) -> int:
        """At least --workers, and one more while descriptors wait and no worker is idle."""
        started = super().maintain_pool()
        if not self.stopping and self.grow_if_needed():
            started += 1
        return started

    # -- accept → sendmsg → close --------------------------------------------------------
    def accepting(self) -> bool:
        return self.held is None

    def hand_off(self, fd: int) -> bool:
        """accept → sendmsg → close, flat: the general path (handle → process_request →
        pass_descriptor → close_request, then accepting()) is five calls more per connection.
        Anything but a plain hand-off — queue full, ETOOMANYREFS, a --connections limit —
        takes it."""
        if self.counted:
            return super().hand_off(fd)
        try:
            self.channel.sendmsg(_MESSAGE, [(_SOL, _RIGHTS, _FD.pack(fd))])
        except OSError:
            return super().hand_off(fd)  # it tries once more, then holds, sheds or says why
        os.close(fd)
        self.stats.accepted += 1
        self.sent += 1
        if self.tracing:
            self.log.trace("sendmsg() is OK: descriptor queued for the workers")
        if self.may_grow:
            self.grow_if_needed()
        return True

    def process_request(self, fd: int) -> None:
        if self.pass_descriptor(fd):
            return
        if self.stopping and self._send_blocking(lambda: self.pass_descriptor(fd)):
            return  # draining: wait (within the grace period) for the workers to make room
        if len(self.workers) < self.config.pool_max and not self.stopping:
            # Queue full: hold this one connection (a dup: close_request closes ours),
            # stop accepting, and start a worker to empty the queue.
            self.held = os.dup(fd)
            self._extra[self.channel.fileno()] = select.POLLOUT
            self.spawn_worker()
        else:
            self.stats.shed += 1
            if self.tracing:
                self.log.trace("descriptor queue full and pool at --max-workers: shed")

    def pass_descriptor(self, fd: int) -> bool:
        """Whether the connection was dealt with (queued, or shed for good reason); False: the
        queue is full, try again when it has room."""
        try:
            self.channel.sendmsg(_MESSAGE, [(_SOL, _RIGHTS, _FD.pack(fd))])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                raise
            # Too many descriptors in flight for this user (RLIMIT_NOFILE): waiting for the
            # socket to become writable would spin — it is writable. Shed this connection.
            self.stats.shed += 1
            if not self.too_many_refs:
                self.too_many_refs = True
                self.log.notice(
                    "sendmsg() failed with ETOOMANYREFS (more descriptors in flight than "
                    "RLIMIT_NOFILE): shedding connections until workers catch up "
                    "(raise ulimit -n, or add workers)"
                )
            return True
        if self.too_many_refs:
            self.too_many_refs = False
            self.log.notice("sendmsg() recovered from ETOOMANYREFS")
        self.sent += 1
        if self.tracing:
            self.log.trace("sendmsg() is OK: descriptor queued for the workers")
        if not self.stopping:
            self.grow_if_needed()
        return True

    def on_ready(self, fd: int, events: int) -> None:
        if events & select.POLLOUT and self.held is not None and self.pass_descriptor(self.held):
            os.close(self.held)
            self.held = None
            self._extra.pop(self.channel.fileno(), None)

    def tick(self) -> None:
        super().tick()
        if not self.stopping and self.sent:
            self.grow_if_needed()

    # -- stopping --------------------------------------------------------------------------
    def finish(self) -> None:
        """Everything queued is served first: after the backlog is drained, one STOP message per
        worker goes into the same queue, behind the descriptors. Workers never write to the
        channel, so waiting here for room cannot deadlock with them."""
        if self.held is not None:
            if not self._send_blocking(lambda: self.pass_descriptor(self.held or -1)):
                self.stats.shed += 1
            os.close(self.held)
            self.held = None
        for _ in self.workers:
            if not self._send_blocking(lambda: self._send_stop()):
                break
        self.wait_for_children()
        # Descriptors still queued when the last worker went die with the channel: cut.
        lost = self.queued()
        if lost > 0:
            self.stats.failed[STOPPED] += lost

    def _send_stop(self) -> bool:
        try:
            self.channel.send(STOP)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def _send_blocking(self, attempt: object) -> bool:
        """Retry ``attempt`` until it succeeds or the deadline passes (the queue drains as the
        workers serve)."""
        assert callable(attempt)
        writable = select.poll()
        writable.register(self.channel, select.POLLOUT)
        while True:
            try:
                if attempt():
                    return True
            except OSError:
                return False
            remaining = (self.stop_deadline or 0) - time.monotonic()
            if remaining <= 0:
                return False
            writable.poll(remaining * 1000)

    def close(self) -> None:
        super().close()
        self.channel.close()
        self.worker_end.close()


class DescriptorWorker:
    """One worker: recvmsg() a descriptor, serve that connection to its end, again."""

    def __init__(
        self, channel: socket.socket, config: ServerConfig, log: Log, slot: Slot, extra: bool
    ) -> None:
        self.channel = channel
        self.config = config
        self.log = log
        self.slot = slot
        self.extra = extra  # started above --workers: retires after --worker-idle idle seconds
        self.serving = Serving(config, log, slot, stop_signals=())
        # echo, or kv: the worker (a forked process) opens its Store at its first connection
        self.service = services.for_config(config)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # see the module docstring
        self.serving.own_signals()
        # Per connection, flat: the counts are stores to this worker's slot (no method call),
        # and the one control message with one descriptor is unpacked in place.
        slot, recvmsg, serving, close = self.slot, self.channel.recvmsg, self.serving, os.close
        serve = self.service
        cells, received, state = slot.cells, slot.base + RECEIVED, slot.base + STATE
        tracing = serving.tracing
        while True:
            try:
                message, ancillary, _flags, _ = recvmsg(16, _FD_SPACE)
            except BlockingIOError:  # SO_RCVTIMEO: --worker-idle seconds without work
                if self.extra:
                    slot.set_state(RETIRING)
                    if tracing:
                        self.log.trace(f"idle for {self.config.worker_idle:g} s: worker retires")
                    return process.EXIT_OK
                continue
            if message == STOP:
                return process.EXIT_OK
            cells[received] += 1
            try:
                # The usual: one control message — SCM_RIGHTS, the only kind on this private
                # pair (no SO_PASSCRED), with one descriptor.
                ((_level, _kind, data),) = ancillary
            except ValueError:
                fd = _descriptor(ancillary)
            else:
                fd = _FD.unpack(data)[0] if len(data) == _FD.size else _descriptor(ancillary)
            if fd is None:  # MSG_CTRUNC: we had no descriptor free to receive it into
                slot.shed()
                continue
            if tracing:
                self.log.trace("recvmsg() is OK: got a connection")
            cells[state] = BUSY
            serve(fd, serving)
            close(fd)
            cells[state] = IDLE


def _descriptor(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    if len(ancillary) == 1:  # the usual: one control message with one descriptor
        level, kind, data = ancillary[0]
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) == _FD.size:
            return int(_FD.unpack(data)[0])
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for extra in fds[1:]:  # only ever one is sent; never leak a surprise
        os.close(extra)
    return fds[0] if fds else None
