"""sendmsg's pool rules: the queue count resynchronises with the kernel, ETOOMANYREFS sheds
instead of spinning, and descriptors left queued at the end are counted, not lost."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import time

from harness import ServerFactory, cpu_seconds, require, server_command, wait_until

from lab.sockets.config import ServerConfig
from lab.sockets.designs.sendmsg import CONNECTION, SendmsgServer, unsent_bytes
from lab.sockets.stats import RECEIVED, STOPPED


class Pool(SendmsgServer):
    """The parent's pool rules alone: no worker is forked (spawn_worker only counts)."""

    def __init__(self) -> None:
        super().__init__(ServerConfig(design="sendmsg", workers=1, max_workers=4))
        self.channel, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.setblocking(False)
        self.sent = self.received_gone = 0
        self.started = 0
        self.held: int | None = None
        self.too_many_refs = False
        self.worker = self.counters.assign()
        self.counters.bind(self.worker, 4242)
        self.children[4242] = "worker"

    def spawn_worker(self) -> int:
        self.started += 1
        return 0

    def wait_for_children(self) -> None:
        """No child was forked; nothing to wait for."""


def test_a_queue_count_that_drifted_up_is_resynchronised_with_the_kernel() -> None:
    pool = Pool()
    pool.worker.set_state(1)  # busy
    pool.sent = 3  # we think three wait; the kernel's queue is empty (a worker died mid-count)
    assert unsent_bytes(pool.channel) == 0
    assert pool.grow_if_needed() is False and pool.started == 0
    assert pool.queued() == 0  # resynchronised: no phantom worker later either


def test_descriptors_really_queued_with_no_idle_worker_grow_the_pool() -> None:
    pool = Pool()
    pool.worker.set_state(1)  # busy
    for _ in range(2):
        pool.channel.send(CONNECTION)  # (no descriptor needed for the count)
        pool.sent += 1
    assert unsent_bytes(pool.channel) > 0
    assert pool.grow_if_needed() is True and pool.started == 1
    pool.worker.cells[pool.worker.base + RECEIVED] += 2  # the workers took them
    assert pool.queued() == 0


def test_etoomanyrefs_sheds_connections_without_spinning(start_server: ServerFactory) -> None:
    require(shutil.which("setpriv") is not None, "needs setpriv (Debian: util-linux)")
    # The kernel refuses more descriptors in flight than RLIMIT_NOFILE to a process without
    # CAP_SYS_RESOURCE/CAP_SYS_ADMIN: drop every capability (we may be root) and lower the limit.
    command = [
        "setpriv", "--bounding-set", "-all", "--inh-caps", "-all",
        *server_command("sendmsg", "--workers", "1", "--max-workers", "1", "--grace", "1"),
    ]  # fmt: skip
    server = start_server(
        "sendmsg",
        command=command,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)),
    )
    busy = socket.create_connection(("127.0.0.1", server.port))
    busy.sendall(b"x")
    assert busy.recv(1) == b"x"  # the only worker is held: descriptors pile up in flight
    cpu_before = cpu_seconds(server.pid)
    clients = []
    for _ in range(80):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"hi")
        clients.append(sock)
    server.wait_for_line(r"ETOOMANYREFS")
    time.sleep(1.0)  # a while under the condition (a load duration, not a measurement)
    used = cpu_seconds(server.pid) - cpu_before
    assert used < 0.5, f"{used:.2f} s of CPU: sendmsg() spins on ETOOMANYREFS"

    def closed(sock: socket.socket) -> bool:
        sock.setblocking(False)
        try:
            return sock.recv(16) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    assert wait_until(lambda: sum(map(closed, clients)) >= 20)  # shed: told at once
    stats = server.stats()
    assert (
        stats["shed"] >= 20 and len([line for line in server.lines if "ETOOMANYREFS" in line]) == 1
    )
    busy.close()
    for sock in clients:
        sock.close()
    assert server.stop() == 0
    final = server.final_stats()
    assert final["in_flight"] == 0, final  # what stayed queued is counted, not lost


def test_a_connection_held_at_the_stop_is_queued_without_blocking_on_the_channel() -> None:
    # Once: finish() made the channel blocking with the grace period as its timeout, and the
    # held connection's successful sendmsg() went on to read worker messages from it — with
    # nothing to read it blocked for the grace period, then raised an uncaught TimeoutError
    # (exit 1, no statistics line). Run against that code this test raised it.
    pool = Pool()
    pool.children.clear()  # no worker at all: nothing will ever be said on the channel
    pool.counters.release(pool.worker)
    a, b = socket.socketpair()  # stands for the connection
    pool.held = os.dup(a.fileno())
    pool.stopping = True
    pool._stop_deadline = time.monotonic() + 0.5
    pool.finish()
    assert pool.held is None
    assert unsent_bytes(pool.channel) > 0  # the held connection went into the queue …
    assert pool.sent == 1
    assert pool.stats.failed.get(STOPPED) == 1  # … and, with no worker to take it, is counted cut
    a.close()
    b.close()
