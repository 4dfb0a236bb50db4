"""One loader process: many non-blocking connections driven by one epoll loop.

A *slot* is one connection's worth of work: it connects, sends a message, reads the whole echo
back while comparing it byte for byte, and then — in the ``persistent`` workload, until it has
carried K messages — sends the next one on the same connection, or closes and starts over.
There is no thread per connection: every socket is non-blocking and one loop waits for all of
them (and for the next due request) in ``epoll_wait``.

**What a request costs the loader** is kept to about what a minimal blocking client pays (see
``scripts/loader_cost.py``): a socket is made non-blocking at birth (``SOCK_NONBLOCK``, no
``ioctl``), registered once for reading and writing, *edge-triggered* (``EPOLLET``: one event
when the connect completes, one when echo bytes arrive — no ``epoll_ctl`` per state change), its
connect result read only when epoll reports an error, and closing it removes it from the epoll
set (no ``epoll_ctl`` DEL). TCP_NODELAY is set only for messages too big for one ``send``: a
message that goes out whole is never held by Nagle's algorithm, since nothing of ours is unacked
when it is sent. With edge-triggered events a readable socket is read until its echo is in or
``recv`` says EAGAIN.

**Closed loop** (no rate): each slot sends its next request as soon as the last one is back (a
failed one first pauses :data:`ERROR_BACKOFF`, so a refusing server is not hammered in a
spin). A request's latency runs from when the slot began it — its connect included, if it
needed one.

**Open loop** (a rate): requests fall due on a fixed schedule, whatever the server does; this
process's share of the rate R is every P-th slot of the global schedule, so P processes
together send exactly R per second, evenly spaced. A due request takes a free slot; if none is
free it waits in the loader. Its latency runs from its *intended* send time, so time spent
waiting — for a free connection, in the server's backlog — is in the measurement, and a
stalled server cannot hide its stall by slowing the loader down (no coordinated omission).

**Measurement.** Requests begun (or, in open loop, due) before the warm-up ends are not
measured; from then, a request is measured until ``--duration`` has passed or this process's
share of ``--requests`` has been begun. Then no new request begins; those in flight (and, in
open loop, those already due) get :data:`DRAIN` seconds to finish; what is left is counted as
unfinished (or unsent), never silently dropped.

**Starvation.** A connection whose connect completed but whose first echo byte took longer than
``--starve-after`` to arrive — or had not arrived when the run ended — is *starved*: counted
once, with how long it waited, and never as an error or a timeout. (Once a connection has
been served, an echo that stalls for ``--timeout`` is a ``timeout`` error.)
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import errno
import random
import resource
import select
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from lab.measure.config import LoadConfig
from lab.measure.histogram import LatencyHistogram
from lab.measure.result import ERROR_KINDS, LoadResult, is_loader_bound
from lab.measure.target import Target

__all__ = [
    "DRAIN",
    "ERROR_BACKOFF",
    "Loader",
    "LoaderPlan",
    "raise_descriptor_limit",
    "share",
]

#: How long a closed-loop slot pauses after a failed request.
ERROR_BACKOFF = 0.01
#: Most seconds in-flight requests get to finish once measuring stops (at most ``--timeout``).
DRAIN = 2.0
#: How often connect and I/O timeouts are checked.
SWEEP = 0.05
#: Distinct payloads: each request's message starts at a random offset into one random block.
OFFSETS = 65536
#: Largest single recv().
RECV_CHUNK = 256 * 1024
#: Messages above this many bytes may need several ``send`` calls: only those get TCP_NODELAY.
NODELAY_ABOVE = 16 * 1024
#: Pending latencies folded into the histogram at the latest every this many (8 MB).
FOLD_EVERY = 1_000_000
#: The series' interval (``LoadConfig.series``), seconds.
SERIES_STEP = 0.1
_ERRORS = select.EPOLLERR | select.EPOLLHUP

# Slot states.
IDLE = 0  # no connection
CONNECTING = 1
SENDING = 2  # request under way, not all sent (reads accepted too: the echo may start early)
RECEIVING = 3  # all sent, reading the echo
READY = 4  # persistent connection open, no request (open loop: waiting for one to fall due)
BACKOFF = 5  # closed loop: pausing after a failure

_BUSY = (CONNECTING, SENDING, RECEIVING)
_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


def share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split as evenly as possible into ``parts``."""
    return total // parts + (1 if index < total % parts else 0)


@dataclass(frozen=True)
class LoaderPlan:
    """What one loader process is to do: its slice of the run."""

    index: int
    config: LoadConfig
    target: Target
    #: This process's connections (its share of ``--concurrency``).
    connections: int
    #: This process's measured requests (its share of ``--requests``), or None.
    requests: int | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "config": dataclasses.asdict(self.config),
            "target": {
                "host": self.target.host,
                "port": self.target.port,
                "family": self.target.family,
                "sockaddr": list(self.target.sockaddr),
            },
            "connections": self.connections,
            "requests": self.requests,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderPlan:
        target = data["target"]
        return cls(
            index=int(data["index"]),
            config=LoadConfig.from_dict(data["config"]),
            target=Target(
                host=str(target["host"]),
                port=int(target["port"]),
                family=int(target["family"]),
                sockaddr=tuple(target["sockaddr"]),
            ),
            connections=int(data["connections"]),
            requests=None if data["requests"] is None else int(data["requests"]),
            seed=int(data["seed"]),
        )


class _Slot:
    __slots__ = (
        "connect_started",
        "connected_at",
        "events",
        "first_echo",
        "floor",
        "got",
        "key",
        "last_progress",
        "measured",
        "offset",
        "op",
        "reply",
        "request",
        "reused",
        "sent",
        "sock",
        "start",
        "state",
        "uses",
        "wake",
    )

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.events = 0
        self.uses = 0  # requests completed on this connection
        self.connect_started = 0.0
        self.connected_at = 0.0
        self.first_echo = False  # has any echo byte arrived on this connection?
        self.reused = False  # is the current request on a connection that carried one before?
        self.start = 0.0  # the current request's latency origin
        self.measured = False
        self.offset = 0
        self.sent = 0
        self.got = 0
        self.last_progress = 0.0
        self.wake = 0.0
        # The kv workload's (lab.measure.kvload): the command, its key, its line, the reply.
        self.op = 0
        self.key = 0
        self.floor = 0
        self.request = b""
        self.reply = bytearray()


class Loader:
    """Runs one :class:`LoaderPlan` in this process and returns what it measured."""

    def __init__(self, plan: LoaderPlan) -> None:
        self.plan = plan
        config = plan.config
        self.config = config
        self.size = config.size
        self.rng = random.Random(plan.seed)
        # One random block; a message is ``size`` bytes of it from a random offset.
        self.block = memoryview(self.rng.randbytes(config.size + OFFSETS))
        self.scratch = bytearray(min(config.size, RECV_CHUNK))
        self.scratch_view = memoryview(self.scratch)
        self.family = plan.target.family
        self.sockaddr = plan.target.sockaddr
        self.timeout = config.timeout
        self.drain = min(DRAIN, config.timeout)
        self.poller = select.epoll()
        self.by_fd: dict[int, _Slot] = {}
        self.slots = [_Slot() for _ in range(plan.connections)]
        self.runnable: deque[_Slot] = deque()
        self.ready: list[_Slot] = []  # open loop: free slots with an open connection
        self.empty: list[_Slot] = []  # open loop: free slots without one
        self.backoff: deque[_Slot] = deque()  # closed loop, in wake order
        # What is measured.
        self.latency = LatencyHistogram()
        # Latencies (µs) wait here and go into the histogram in bulk (see _fold): an array
        # append is ~50 ns, a histogram record ~2.5 µs in pure Python.
        self.pending = array.array("q")
        self.waits = LatencyHistogram()
        self.requests = 0
        self.bytes_verified = 0
        self.errors: dict[str, int] = {}
        self.connections = 0
        self.starved = 0
        self.starved_waiting = 0
        self.unfinished = 0
        self.unsent = 0
        self.last_measured_end = 0.0
        # Open loop schedule: request k of this process is due at start + (index + k·P) / R.
        self.next_due = 0  # index of the next request to fall due
        self.next_send = 0  # index of the oldest due request not yet sent
        self.measured_begun = 0
        self.stopping = False
        self.stop_time = 0.0
        # Set when the run starts (monotonic seconds).
        self.t0 = self.measure_start = self.measure_stop = 0.0
        self.interval = self.phase = 0.0
        # The series (LoadConfig.series): counts per SERIES_STEP of the measured window. Only
        # then is _complete wrapped to count; the plain per-request path stays as it is.
        self.series_ok: list[int] | None = None
        self.series_errors: dict[str, list[int]] = {}
        if config.series:
            self.series_ok = []
            self._complete = self._complete_counted  # type: ignore[method-assign]

    # --- the run -----------------------------------------------------------------------------

    def run(self, start_at: float) -> LoadResult:
        """Wait until UNIX time ``start_at``, load, drain, and return the measurements."""
        config = self.config
        anchor_unix, anchor_mono = time.time(), time.monotonic()
        start = anchor_mono + (start_at - anchor_unix)
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        began = time.monotonic()
        lag = max(0.0, began - start)
        cpu_before = _cpu_seconds()

        self.t0 = start
        self.measure_start = start + config.warmup
        self.measure_stop = self.measure_start + config.duration
        if self.plan.requests == 0:  # nothing to measure here: stop at once
            self._stop(began)
        if config.open_loop:
            assert config.rate is not None
            self.interval = config.processes / config.rate
            self.phase = self.plan.index / config.rate
            self.empty.extend(self.slots)
        else:
            self.runnable.extend(self.slots)
        self._loop()
        self._fold()

        ended = time.monotonic()
        cpu = _cpu_seconds() - cpu_before  # the folding included: it is the loader's work
        wall = max(ended - began, 1e-9)
        to_unix = anchor_unix - anchor_mono
        measure_end = max(self.last_measured_end, min(self.stop_time, self.measure_stop))
        measure_end = max(measure_end, self.measure_start)
        return LoadResult(
            config=config.to_dict(),
            target=self.plan.target.to_dict(),
            start_at=start_at,
            measure_start=self.measure_start + to_unix,
            measure_end=measure_end + to_unix,
            end=ended + to_unix,
            requests=self.requests,
            bytes_verified=self.bytes_verified,
            errors=_with_all_kinds(self.errors),
            connections=self.connections,
            unfinished=self.unfinished,
            unsent=self.unsent,
            histogram=self.latency.encode(),
            starved=self.starved,
            starved_waiting=self.starved_waiting,
            starved_histogram=self.waits.encode(),
            loader_processes=1,
            loader_cpu_s=cpu,
            loader_wall_s=wall,
            loader_start_lag_s=lag,
            loader_bound=is_loader_bound(cpu, wall),
            series=self._series(),
        )

    def _series(self) -> dict[str, Any] | None:
        if self.series_ok is None:
            return None
        return {"step_s": SERIES_STEP, "ok": self.series_ok, "errors": self.series_errors}

    def _bucket(self, counts: list[int], now: float) -> None:
        """Count one event in its SERIES_STEP interval of the measured window."""
        i = int((now - self.measure_start) / SERIES_STEP)
        if i < 0:
            return
        if i >= len(counts):
            counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += 1

    def _complete_counted(self, slot: _Slot, now: float) -> None:
        if slot.measured and self.series_ok is not None:
            self._bucket(self.series_ok, now)
        type(self)._complete(self, slot, now)  # the class's own (a kv loader's too)

    def _loop(self) -> None:
        open_loop = self.config.open_loop
        poll, by_fd = self.poller.poll, self.by_fd
        next_sweep = 0.0
        while True:
            now = time.monotonic()
            if open_loop:
                self._schedule(now)
            elif not self.stopping and now >= self.measure_stop:
                self._stop(now)
            self._dispatch(now)
            if self.stopping and (now >= self.stop_time + self.drain or not self._outstanding()):
                break
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP
            timeout = self._wait_time(now, next_sweep)
            for fd, mask in poll(timeout):
                slot = by_fd.get(fd)
                if slot is not None:
                    self._on_event(slot, mask)
        self._finish(time.monotonic())

    def _fold(self) -> None:
        """Move the pending latencies into the histogram: one record per distinct value."""
        for value, count in collections.Counter(self.pending).items():
            self.latency.record(value, count)
        del self.pending[:]

    def _stop(self, now: float) -> None:
        """Begin no more requests (open loop: schedule no more); drain what is under way."""
        self.stopping = True
        self.stop_time = now
        if not self.config.open_loop:
            for slot in self.slots:
                if slot.state in (READY, BACKOFF):
                    self._close(slot, now)
                    slot.state = IDLE

    def _outstanding(self) -> bool:
        if any(slot.state in _BUSY for slot in self.slots):
            return True
        return self.config.open_loop and self.next_send < self.next_due

    def _wait_time(self, now: float, next_sweep: float) -> float:
        if self.runnable:
            return 0.0
        until = next_sweep
        if not self.stopping:
            until = min(until, self.measure_stop)
            if self.config.open_loop:
                until = min(until, self._due(self.next_due))
        else:
            until = min(until, self.stop_time + self.drain)
        if self.backoff:
            until = min(until, self.backoff[0].wake)
        return max(0.0, until - now)

    # --- what to begin, and when ---------------------------------------------------------------

    def _due(self, k: int) -> float:
        return self.t0 + self.phase + k * self.interval

    def _schedule(self, now: float) -> None:
        """Open loop: every request whose time has come falls due. Once no more measured
        request can fall due (past the window, or this process's share reached), stop — even
        if this loop woke late: what was due in the window is never skipped."""
        if self.stopping:
            return
        limit = self.plan.requests
        while True:
            due = self._due(self.next_due)
            if due >= self.measure_start and (
                due >= self.measure_stop or (limit is not None and self.measured_begun >= limit)
            ):
                self._stop(now)
                return
            if due > now:
                return
            if due >= self.measure_start:
                self.measured_begun += 1
            self.next_due += 1

    def _dispatch(self, now: float) -> None:
        if self.config.open_loop:
            self._dispatch_open(now)
        else:
            self._dispatch_closed(now)

    def _dispatch_closed(self, now: float) -> None:
        backoff = self.backoff
        while backoff and backoff[0].wake <= now:
            self.runnable.append(backoff.popleft())
        runnable = self.runnable
        limit = self.plan.requests
        while runnable:
            slot = runnable.popleft()
            if self.stopping:
                self._close(slot, now)
                continue
            if now >= self.measure_start:
                if limit is not None and self.measured_begun >= limit:
                    self._stop(now)
                    self._close(slot, now)
                    continue
                self.measured_begun += 1
            self._begin(slot, now, now)

    def _dispatch_open(self, now: float) -> None:
        runnable = self.runnable
        while runnable:
            slot = runnable.popleft()
            (self.ready if slot.sock is not None else self.empty).append(slot)
        while self.next_send < self.next_due and (self.ready or self.empty):
            slot = self.ready.pop() if self.ready else self.empty.pop()
            intended = self._due(self.next_send)
            self.next_send += 1
            self._begin(slot, intended, now)
            if runnable:  # it failed at once: keep it out of this round (no tight loop)
                break

    # --- one request -----------------------------------------------------------------------

    def _begin(self, slot: _Slot, origin: float, now: float) -> None:
        slot.start = origin
        slot.measured = origin >= self.measure_start
        slot.offset = self.rng.randrange(OFFSETS)
        slot.sent = slot.got = 0
        slot.last_progress = now
        if slot.sock is not None:
            slot.reused = True
            slot.state = SENDING
            self._send(slot, now)
        else:
            slot.reused = False
            self._connect(slot, now)

    def _connect(self, slot: _Slot, now: float) -> None:
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # out of descriptors, most likely
            self._fail(slot, now, _connect_kind(exc.errno))
            return
        if self.size > NODELAY_ABOVE:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.sock = sock
        slot.uses = 0
        slot.first_echo = False
        slot.connect_started = now
        slot.connected_at = 0.0
        code = sock.connect_ex(self.sockaddr)
        if code == 0:
            self._watch(slot)
            self._connected(slot, now)
        elif code in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            slot.state = CONNECTING
            self._watch(slot)
        else:
            self._fail(slot, now, _connect_kind(code))

    def _connected(self, slot: _Slot, now: float) -> None:
        self.connections += 1
        slot.connected_at = now
        slot.last_progress = now
        slot.state = SENDING
        self._send(slot, now)

    def _send(self, slot: _Slot, now: float) -> None:
        sock = slot.sock
        assert sock is not None
        size = self.size
        start = slot.offset
        try:
            while slot.sent < size:
                n = sock.send(self.block[start + slot.sent : start + size])
                slot.sent += n
                slot.last_progress = now
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(slot, now, self._io_kind(slot, exc.errno))
            return
        if slot.sent == size:
            slot.state = RECEIVING
        # Otherwise the socket's buffer is full: the next EPOLLOUT edge continues. Reading goes
        # on meanwhile (a large message's echo fills our receive buffer, and the server stops
        # reading while it cannot send: its back-pressure).

    def _receive(self, slot: _Slot, now: float) -> None:
        sock = slot.sock
        assert sock is not None
        if slot.state == READY:
            self._receive_idle(slot, now)
            return
        while True:  # edge-triggered: read until the echo is in, or nothing more is there
            want = min(self.size - slot.got, len(self.scratch))
            try:
                n = sock.recv_into(self.scratch, want)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(slot, now, self._io_kind(slot, exc.errno))
                return
            if n == 0:  # end of stream before the whole echo
                kind = "closed_idle" if self._closed_before_echo(slot) else "short_read"
                self._fail(slot, now, kind)
                return
            expected_at = slot.offset + slot.got
            if self.scratch_view[:n] != self.block[expected_at : expected_at + n]:
                self._fail(slot, now, "mismatch")
                return
            if not slot.first_echo:
                slot.first_echo = True
                self._end_wait(slot, now, still_waiting=False)
            slot.got += n
            slot.last_progress = now
            if slot.got == self.size:
                self._complete(slot, now)
                return
            # A short read is no proof the socket is empty: an end of stream that came with
            # the data shares its edge, so read on until EAGAIN.

    def _receive_idle(self, slot: _Slot, now: float) -> None:
        """A persistent connection waiting for its next request became readable."""
        sock = slot.sock
        assert sock is not None
        try:
            data = sock.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        # Closed (or reset) by the server: no request lost, but the connection is.
        # Bytes nobody asked for: an echo server does not send on its own.
        self._event(now, "closed_idle" if not data else "mismatch")
        self._close(slot, now)
        self._free(slot)

    def _complete(self, slot: _Slot, now: float) -> None:
        if slot.measured:
            self.pending.append(int((now - slot.start) * 1_000_000))
            if len(self.pending) >= FOLD_EVERY:
                self._fold()
            self.requests += 1
            self.bytes_verified += self.size
            self.last_measured_end = now
        slot.uses += 1
        if not self.config.persistent or slot.uses >= self.config.per_connection:
            self._close(slot, now)
        else:
            slot.state = READY  # still registered: an edge now means the server closed it
        self._free(slot)

    def _fail(self, slot: _Slot, now: float, kind: str) -> None:
        if slot.measured:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.last_measured_end = now
            if self.series_ok is not None:
                self._bucket(self.series_errors.setdefault(kind, []), now)
        self._close(slot, now)
        if self.config.open_loop:
            self._free(slot)
        else:
            slot.state = BACKOFF
            slot.wake = now + ERROR_BACKOFF
            self.backoff.append(slot)

    def _free(self, slot: _Slot) -> None:
        if slot.sock is None:
            slot.state = IDLE
        self.runnable.append(slot)

    def _event(self, now: float, kind: str) -> None:
        """An error that is no request's (a persistent connection closed between requests)."""
        if self.measure_start <= now and not self.stopping:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if self.series_ok is not None:
                self._bucket(self.series_errors.setdefault(kind, []), now)

    def _closed_before_echo(self, slot: _Slot) -> bool:
        # On a connection that carried a request before, nothing of this echo yet: the server
        # had closed the connection between requests.
        return slot.reused and slot.got == 0

    def _io_kind(self, slot: _Slot, code: int | None) -> str:
        if code in _RESET_ERRNOS:
            return "closed_idle" if self._closed_before_echo(slot) else "reset"
        if code == errno.ETIMEDOUT:
            return "timeout"
        return "other"

    # --- connections ---------------------------------------------------------------------------

    def _watch(self, slot: _Slot) -> None:
        """Register a new connection once, for both directions, edge-triggered."""
        sock = slot.sock
        assert sock is not None
        fd = sock.fileno()
        self.poller.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        self.by_fd[fd] = slot
        slot.events = 1

    def _close(self, slot: _Slot, now: float) -> None:
        sock = slot.sock
        if sock is None:
            return
        if slot.connected_at and not slot.first_echo:
            self._end_wait(slot, now, still_waiting=False)
            slot.first_echo = True
        if slot.events:  # closing the socket takes it out of the epoll set: no epoll_ctl
            self.by_fd.pop(sock.fileno(), None)
            slot.events = 0
        sock.close()
        slot.sock = None
        slot.uses = 0

    def _end_wait(self, slot: _Slot, now: float, *, still_waiting: bool) -> None:
        """The wait for a connection's first echo is over (or the run is): starved?"""
        wait = now - slot.connected_at
        starve_after = self.config.starve_after
        if wait < starve_after or now < self.measure_start:
            return
        # Starved during the measured window (not only during the warm-up or the drain).
        if slot.connected_at + starve_after > (self.stop_time if self.stopping else now):
            return
        self.starved += 1
        if still_waiting:
            self.starved_waiting += 1
        self.waits.record(int(wait * 1_000_000))

    def _sweep(self, now: float) -> None:
        timeout = self.timeout
        for slot in self.slots:
            state = slot.state
            if state == CONNECTING:
                if now - slot.connect_started >= timeout:
                    self._fail(slot, now, "connect_timeout")
            elif (
                state in (SENDING, RECEIVING)
                and slot.first_echo
                and now - slot.last_progress >= timeout
            ):
                self._fail(slot, now, "timeout")

    def _on_event(self, slot: _Slot, mask: int) -> None:
        now = time.monotonic()
        state = slot.state
        if state == CONNECTING:
            sock = slot.sock
            assert sock is not None
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if mask & _ERRORS else 0
            if code:
                self._fail(slot, now, _connect_kind(code))
            elif mask & (select.EPOLLOUT | _ERRORS):
                self._connected(slot, now)
            return
        if mask & (select.EPOLLIN | _ERRORS):
            self._receive(slot, now)
        if slot.state == SENDING and mask & (select.EPOLLOUT | _ERRORS):
            self._send(slot, now)

    def _finish(self, now: float) -> None:
        """The drain is over: count what is left, close everything."""
        for slot in self.slots:
            if slot.state in _BUSY:
                if slot.measured:
                    self.unfinished += 1
                if slot.connected_at and not slot.first_echo:
                    self._end_wait(slot, now, still_waiting=True)
                    slot.first_echo = True
            self._close(slot, now)
            slot.state = IDLE
        if self.config.open_loop:
            self.unsent = sum(
                1
                for k in range(self.next_send, self.next_due)
                if self._due(k) >= self.measure_start
            )
        self.poller.close()


def _connect_kind(code: int | None) -> str:
    if code == errno.ECONNREFUSED:
        return "refused"
    if code == errno.EADDRNOTAVAIL:
        return "port_exhaustion"
    if code == errno.ETIMEDOUT:
        return "connect_timeout"
    if code in _RESET_ERRNOS:
        return "reset"
    return "other"


def _with_all_kinds(errors: dict[str, int]) -> dict[str, int]:
    return {kind: errors.get(kind, 0) for kind in ERROR_KINDS} | errors


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_descriptor_limit(needed: int) -> bool:
    """Raise this process's soft RLIMIT_NOFILE towards the hard limit; True if ≥ ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft == resource.RLIM_INFINITY or soft >= needed
