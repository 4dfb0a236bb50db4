"""A small impairment proxy: delay, jitter and stalls on a TCP path (Toxiproxy's model, ours).

This kernel has no ``netem`` qdisc, so ``lab fault delay`` and ``lab fault stall`` put this
proxy in the path instead. It runs in a helper container that shares a client's network
namespace; an ``iptables -t nat … REDIRECT`` rule there sends the client's connections to the
server's port to the proxy's port on loopback, and the proxy connects on to where each one was
going — the address the kernel kept for the redirected connection (``SO_ORIGINAL_DST``). Its
own connections are left alone by the rule: they are root's, the client's are the lab user's
(``-m owner --uid-owner 0 -j RETURN``).

What it does to the bytes, per direction:

* **delay/jitter**: each chunk read is written ``delay ± jitter`` later, never before the chunk
  read ahead of it (TCP is a byte stream: jitter may bunch chunks, never reorder them);
* **stall**: nothing is forwarded while stalled; bytes wait, in order, until the end;
* an end of stream (FIN) travels as a chunk of its own (``shutdown(SHUT_WR)`` on the far side,
  after the same delay); a reset on one side resets the other (``SO_LINGER`` 0), so the client
  sees what the server did.

Flow control: a direction holding more than ``HOLD_MAX`` bytes stops reading its source until
it has sent some, so a fast sender behind a stall backs up into its own socket buffers rather
than into this process's memory.

One thread, one epoll set, level-triggered; the timeout of each wait is the next chunk due. At
the end (SIGTERM) the caller has removed the redirect first; the proxy then stops delaying,
forwards what it holds, and carries the connections it has until they close (``--drain``
seconds at most), so ending a fault cuts no connection.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>: the destination before a REDIRECT/DNAT
HOLD_MAX = 1 << 20  # bytes one direction may hold before it stops reading its source
CHUNK = 1 << 16
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_RESET = b"\0reset"  # in a direction's chunks, by identity: the source reset the connection


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (IPv4: ``struct sockaddr_in``)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


class Impairment:
    """What the proxy does to the bytes (all of it lifted by :meth:`Proxy.drain`)."""

    def __init__(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, stalled: bool = False):
        self.delay = delay_ms / 1000.0
        self.jitter = jitter_ms / 1000.0
        self.stalled = stalled
        self.random = random.Random()

    def due(self, now: float) -> float:
        if self.jitter:
            return now + max(0.0, self.delay + self.random.uniform(-self.jitter, self.jitter))
        return now + self.delay


class Direction:
    """Bytes read from ``src``, held until due, written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.chunks: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.held = 0
        self.last_due = 0.0
        self.read_eof = False  # the source sent its FIN (queued as a None chunk)
        self.write_blocked = False  # dst's buffer was full: wait for EPOLLOUT
        self.timer_due: float | None = None  # when its head chunk's timer fires, if set

    def reading(self) -> bool:
        return not self.read_eof and self.held < HOLD_MAX

    def done(self) -> bool:
        return self.read_eof and not self.chunks


class Link:
    """One proxied connection: the client's side, the server's side, both directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connecting = True  # upstream's connect() in progress
        self.up = Direction(client, upstream)  # client → server
        self.down = Direction(upstream, client)  # server → client
        self.closed = False


class Proxy:
    def __init__(self, port: int, impairment: Impairment, host: str = "127.0.0.1") -> None:
        self.impairment = impairment
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.poller = select.epoll()
        self.poller.register(self.listener, select.EPOLLIN)
        self.by_fd: dict[int, Link] = {}
        self.masks: dict[int, int] = {}
        self.timers: list[tuple[float, int, Direction]] = []  # (due, tiebreak, direction)
        self._tiebreak = 0
        self.links = 0  # connections proxied, for the final line
        self.destination: tuple[str, int] | None = None  # fixed upstream (tests), else original

    # -- the loop --------------------------------------------------------------------------
    def run(self, until: float | None = None, stop_fd: int | None = None) -> None:
        """Serve until ``until`` (monotonic) or until ``stop_fd`` is readable."""
        if stop_fd is None:
            self._loop(until, -1)
            return
        self.poller.register(stop_fd, select.EPOLLIN)
        try:
            self._loop(until, stop_fd)
        finally:
            self.poller.unregister(stop_fd)  # (drain runs on without it: no wake-up per turn)

    def _loop(self, until: float | None, stop_fd: int) -> None:
        while True:
            now = time.monotonic()
            if until is not None and now >= until:
                return
            timeout = -1.0
            if self.timers and not self.impairment.stalled:
                timeout = max(0.0, self.timers[0][0] - now)
            if until is not None:
                timeout = min(until - now, timeout) if timeout >= 0 else until - now
            for fd, events in self.poller.poll(timeout):
                if fd == stop_fd:
                    return
                if fd == self.listener.fileno():
                    self._accept()
                    continue
                link = self.by_fd.get(fd)
                if link is not None and not link.closed:
                    self._ready(link, fd, events)
            self._flush_due()

    def drain(self, seconds: float) -> None:
        """No more delay or stall: forward what is held, carry the open connections until they
        close (or ``seconds`` pass), then close what is left."""
        self.impairment.delay = self.impairment.jitter = 0.0
        self.impairment.stalled = False
        self.poller.unregister(self.listener)
        self.listener.close()
        deadline = time.monotonic() + seconds
        while self.by_fd and time.monotonic() < deadline:
            self.run(until=min(deadline, time.monotonic() + 0.1))
        for link in list({id(v): v for v in self.by_fd.values()}.values()):
            self._close(link, reset=False)

    # -- connections -----------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # out of descriptors: the connection waits in the backlog
                continue  # that connection failed before we took it
            conn.setblocking(False)
            try:
                destination = self.destination or original_destination(conn)
                upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            upstream.setblocking(False)
            for sock in (conn, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(conn, upstream)
            self.links += 1
            code = upstream.connect_ex(destination)
            if code not in (0, errno.EINPROGRESS):
                self._close(link, reset=True)
                continue
            self.by_fd[conn.fileno()] = link
            self.by_fd[upstream.fileno()] = link
            self.masks[conn.fileno()] = self.masks[upstream.fileno()] = 0
            self._update(link)

    def _ready(self, link: Link, fd: int, events: int) -> None:
        if fd == link.upstream.fileno() and link.connecting:
            if events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                code = link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._close(link, reset=True)  # refused or unreachable: tell the client
                    return
                link.connecting = False
                self._flush(link.up)
                self._update(link)
            return
        if events & select.EPOLLOUT:
            for direction in (link.up, link.down):
                if direction.dst.fileno() == fd:
                    direction.write_blocked = False
                    self._flush(direction)
        if link.closed:
            return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            # A reset (EPOLLERR) is read too: the bytes that came before it first, then the
            # error, which travels behind them as the reset it was (see _read).
            for direction in (link.up, link.down):
                if direction.src.fileno() == fd and (
                    direction.reading() or (events & select.EPOLLERR and not direction.read_eof)
                ):
                    self._read(link, direction)
        if not link.closed:
            self._update(link)

    def _read(self, link: Link, direction: Direction) -> None:
        try:
            data: bytes | None = direction.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset: it travels, behind what came before it, as a reset
            data = _RESET
        due = max(direction.last_due, self.impairment.due(time.monotonic()))
        direction.last_due = due
        if data is _RESET or not data:
            direction.read_eof = True
            direction.chunks.append((due, data or None))
        else:
            direction.chunks.append((due, data))
            direction.held += len(data)
        if len(direction.chunks) == 1:
            self._schedule(due, direction)

    def _schedule(self, due: float, direction: Direction) -> None:
        if direction.timer_due == due:
            return  # already set (a write that blocked comes back here)
        direction.timer_due = due
        self._tiebreak += 1
        heapq.heappush(self.timers, (due, self._tiebreak, direction))

    def _flush_due(self) -> None:
        if self.impairment.stalled:
            return
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            due, _, direction = heapq.heappop(self.timers)
            if direction.timer_due != due:
                continue  # superseded
            direction.timer_due = None
            link = self.by_fd.get(direction.src.fileno())
            if link is None or link.closed:
                continue
            self._flush(direction)
            if not link.closed:
                self._update(link)

    def _flush(self, direction: Direction) -> None:
        """Write every chunk that is due, in order, until dst's buffer is full."""
        link = self.by_fd.get(direction.src.fileno())
        if link is None or link.closed or link.connecting or self.impairment.stalled:
            return
        now = time.monotonic()
        while direction.chunks and not direction.write_blocked:
            due, data = direction.chunks[0]
            if due > now:
                self._schedule(due, direction)
                return
            if data is _RESET:  # the source reset the connection: so does the far side
                self._close(link, reset=True)
                return
            if data is None:  # the source's FIN, passed on
                direction.chunks.popleft()
                with contextlib.suppress(OSError):
                    direction.dst.shutdown(socket.SHUT_WR)
                if link.up.done() and link.down.done():
                    self._close(link, reset=False)
                return
            try:
                sent = direction.dst.send(data)
            except (BlockingIOError, InterruptedError):
                direction.write_blocked = True
                return
            except OSError:
                self._close(link, reset=True)
                return
            direction.held -= sent
            if sent < len(data):
                direction.chunks[0] = (due, data[sent:])
                direction.write_blocked = True
                return
            direction.chunks.popleft()

    def _update(self, link: Link) -> None:
        """Each socket's epoll mask from what its two directions need."""
        for sock, reader, writer in (
            (link.client, link.up, link.down),
            (link.upstream, link.down, link.up),
        ):
            mask = select.EPOLLIN if reader.reading() else 0
            if writer.write_blocked or (sock is link.upstream and link.connecting):
                mask |= select.EPOLLOUT
            fd = sock.fileno()
            old = self.masks.get(fd)
            if old == mask:
                continue
            if old == 0 or old is None:
                if mask:
                    self.poller.register(fd, mask)
            elif mask:
                self.poller.modify(fd, mask)
            else:
                self.poller.unregister(fd)
            self.masks[fd] = mask

    def _close(self, link: Link, reset: bool) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.client, link.upstream):
            fd = sock.fileno()
            if fd < 0:
                continue
            self.by_fd.pop(fd, None)
            if self.masks.pop(fd, 0):
                with contextlib.suppress(OSError):
                    self.poller.unregister(fd)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()

    def close(self) -> None:
        for link in list({id(v): v for v in self.by_fd.values()}.values()):
            self._close(link, reset=False)
        self.poller.close()
        if self.listener.fileno() >= 0:
            self.listener.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGTERM, then drain."""
    parser = argparse.ArgumentParser(prog="python -m lab.sockets.proxy")
    parser.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--delay", type=float, default=0.0, help="milliseconds per chunk")
    parser.add_argument("--jitter", type=float, default=0.0, help="± milliseconds")
    parser.add_argument("--stall", action="store_true", help="start stalled")
    parser.add_argument("--to", help="HOST:PORT to connect to (default: where it was going)")
    parser.add_argument("--drain", type=float, default=5.0)
    args = parser.parse_args(argv)
    proxy = Proxy(args.port, Impairment(args.delay, args.jitter, args.stall))
    if args.to:
        host, _, port = args.to.rpartition(":")
        proxy.destination = (host, int(port))
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)

    def on_term(signum: int, frame: object) -> None:
        os.write(stop_w, b"x")  # only queue: the loop acts

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"proxy ready port={proxy.port}", flush=True)
    proxy.run(stop_fd=stop_r)
    proxy.drain(args.drain)
    print(f"proxy done links={proxy.links}", flush=True)
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
