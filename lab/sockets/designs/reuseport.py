"""reuseport — N pre-started workers, each blocking in accept() on a listening socket of its own.

Every worker's socket is bound to the same address and port with ``SO_REUSEPORT``: together
they form one *reuseport group*, and for each new connection (each SYN) the kernel chooses one
socket of the group by a hash of the connection's addresses and ports. Each socket has its own
accept queue, and each worker accepts only from its own — there is no shared queue, no lock and
no herd: a worker is woken only by connections already assigned to it. The price is that the
hash does not know who is busy: a connection can queue behind a long one on a busy worker while
another worker idles (nginx's ``reuseport``; Cloudflare measured the spread in 2017).

The parent binds a socket of its own with ``SO_REUSEPORT`` but never listens on it: it holds
the port (and learns it for ``--port 0``) without joining the group — only listening sockets
receive connections. Before forking each worker it creates that worker's socket (``socket``,
``setsockopt``, ``bind``, ``listen``, the idle timeout's ``SO_RCVTIMEO``/``SO_SNDTIMEO``), and
closes its own copy once the worker has it, so the worker's is the only one: the socket lives
exactly as long as its worker. A replacement gets a new socket, which joins the group.

What a worker's death does to its queue: the socket closes with the process, and the
connections completed in its queue (and handshakes in flight to it) are reset — unless
``net.ipv4.tcp_migrate_req`` is 1 (Linux 5.14, per network namespace): then the kernel moves
them to another socket of the group, where another worker accepts them. The server reads the
setting at start and says in a notice when it is off (the lab sets it in the server's
container where the kernel has it: images/compose.migrate-req.yaml). The same holds when a
worker leaves at a stop: each worker shrinks its own backlog (``listen(fd, 0)``) as soon as
it is told to stop, serves what was queued on its socket, and exits; with the setting on, a
connection that raced into its queue meanwhile moves to a worker still open instead of being
reset.

A connection costs its worker ``accept4``, the messages' ``readv``/``write``, the EOF ``readv``
and ``close`` — as ``multi-accept``, nothing of the lab's; the parent makes none. Starting a
worker costs the parent four more calls (its socket) — per worker, not per connection.
"""

from __future__ import annotations

import socket

from lab.sockets.base import BindError
from lab.sockets.designs.multi_accept import AcceptWorker, WorkersAcceptPool
from lab.sockets.serving import set_timeouts
from lab.sockets.stats import Slot

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def migrate_req() -> int | None:
    """``net.ipv4.tcp_migrate_req`` in this network namespace; None: the kernel has none."""
    try:
        with open(MIGRATE_REQ, "rb") as setting:
            return int(setting.read().strip() or b"0")
    except (OSError, ValueError):
        return None


class ReuseportServer(WorkersAcceptPool):
    name = "reuseport"
    summary = "N workers, each with its own SO_REUSEPORT listening socket; the kernel hashes"
    origin = "nginx's listen … reuseport (Linux 3.9 SO_REUSEPORT); Cloudflare 2017"
    model = "a pool of processes, a listening socket each"
    family = "epoll"  # its ×C reference: the C peer's event loops, nginx's own model
    # Each worker has its own accept queue, chosen by hash: a newcomer can wait behind a busy
    # worker while another is idle (the tests derive which guarantees hold from this).
    queue_per_worker: ClassVar[bool] = True
    # One worker serves one connection at a time (PoolServer's value also pins --max-workers,
    # which this design does not take; its inferred type is narrower: hence the ignore).
    serial_options: ClassVar[tuple[str, ...] | None] = ("--workers", "1")  # type: ignore[assignment]
    # Per connection with one message (tests/test_syscall_budget.py): accept4, the message's
    # readv and write, the EOF readv, close — all in the worker the hash chose.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
    }

    def bind_and_listen(self, port: int, backlog: int, quiet: bool = False) -> socket.socket:
        if quiet:  # the health port: the parent's own, as in every design
            return super().bind_and_listen(port, backlog, quiet)
        holder = self.reserve(port)
        self.address = holder.getsockname()
        self.family_ = holder.family
        return holder

    def reserve(self, port: int) -> socket.socket:
        """The parent's socket: bound with SO_REUSEPORT, never listening (see the docstring)."""
        host = self.config.host
        sock, address = self.passive_socket(port)
        self.log.trace("socket() is OK")
        try:
            self._reuse(sock)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise BindError(self._bind_hint(exc, host, port, "--port / LAB_PORT")) from None
        self.log.trace("bind() is OK")
        return sock

    @staticmethod
    def _reuse(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def open_listener(self) -> socket.socket:
        """A worker's listening socket, in the group: blocking, with the idle timeout."""
        sock = socket.socket(self.family_, socket.SOCK_STREAM)
        try:
            self._reuse(sock)
            sock.bind(self.address)
            sock.listen(self.backlog)
            set_timeouts(sock, self.config.idle_timeout)
        except OSError:
            sock.close()
            raise
        if self.tracing:
            self.log.trace("listen() is OK: a listening socket for the next worker")
        return sock

    def start(self) -> None:
        setting = migrate_req()
        if setting is None:
            self.log.notice(
                "this kernel has no net.ipv4.tcp_migrate_req (Linux < 5.14): a worker's death "
                "resets the connections queued on its socket"
            )
        elif setting == 0:
            self.log.notice(
                "net.ipv4.tcp_migrate_req is 0: a worker's death resets the connections queued "
                "on its socket (sysctl -w net.ipv4.tcp_migrate_req=1 in the server's network "
                "namespace moves them to another worker)"
            )
        self.next_listener: socket.socket | None = None
        super().start()

    def close_the_door(self) -> None:
        """Each worker shrinks the backlog of its own socket (the parent's does not listen)."""

    def spawn_worker(self) -> int:
        self.next_listener = self.open_listener()
        try:
            return super().spawn_worker()
        finally:
            # The worker holds the only copy from now on: the socket closes when it exits.
            self.next_listener.close()
            self.next_listener = None

    def worker_keeps(self) -> list[int]:
        assert self.next_listener is not None
        return [self.next_listener.fileno()]

    def worker_main(self, slot: Slot) -> int:
        assert self.next_listener is not None
        listener = self.next_listener
        return AcceptWorker(listener, self.config, self.log, slot, own_listener=True).run()
