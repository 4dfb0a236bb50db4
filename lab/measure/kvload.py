"""The kv workload's loader: the echo loader's slots and loop, speaking the kv service's lines.

A request is one command line of ``--mix`` (``get=80,set=15,incr=5``) on a key picked from
``--keys`` keys, uniformly or by Zipf's law (``--distribution``); a connection carries
``--per-connection`` commands, one at a time (no pipelining: a command's latency is its own).
The keys live in two namespaces so every reply can be checked against what this loader knows:

* ``load:k:<i>`` — GET, SET and DEL. A SET stores ``<i>.<value>`` (``--size`` bytes of value),
  so a GET must answer ``NOT_FOUND`` or a value that begins ``<i>.``: another key's value, or
  bytes that are no value at all, are a ``mismatch``. SET must answer ``OK``, DEL ``OK`` or
  ``NOT_FOUND``.
* ``load:c:<tag>:<i>`` — INCR, on counters of this run alone (``tag`` is the run's). When this
  loader sends an INCR, every INCR of that counter it has had acknowledged has committed, so
  the reply must be at least one more than those: a lower one is a ``mismatch`` (an update
  lost, or not made, before this one).

Every INCR is counted per counter — acknowledged, or sent without a reply (a reset, a timeout,
the run's end: it may have committed) — warm-up and drain included, and goes into the result
as ``kv_incr``: what :mod:`lab.measure.kvcheck` compares with the database at the end.

``ERR busy`` (the write lock not had in time: the write did not happen) and any other ``ERR``
are errors of their own kinds (``busy``, ``kv_error``); the connection is closed and the slot
starts over, as after any failed request.

What it costs the loader per command, over the echo loader's: a key and a command drawn (two
``random()`` calls, a ``bisect`` for Zipf), one ``bytes`` formatted for the line, the reply
line's ``find`` and comparison. The loader's CPU is reported beside the server's as for echo.
"""

from __future__ import annotations

import bisect
import itertools

from lab.measure.config import KV_OPS, parse_mix, zipf_exponent
from lab.measure.loader import _BUSY, READY, RECEIVING, SENDING, Loader, LoaderPlan, _Slot
from lab.measure.result import LoadResult

__all__ = ["KvLoader", "counter_key", "counter_prefix", "item_key"]

NONE, GET, SET, INCR, DEL = range(5)
_OPS = {"get": GET, "set": SET, "incr": INCR, "del": DEL}
assert set(_OPS) == set(KV_OPS)
#: Largest reply line accepted: a GET's value (at most the service's 4,096-byte line).
MAX_REPLY = 8192
RECV_BUFFER = 16 * 1024
_VALUE_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789"


def item_key(i: int) -> str:
    """The key GET, SET and DEL use for key number ``i``."""
    return f"load:k:{i}"


def counter_prefix(tag: str) -> str:
    """What every counter of the run named ``tag`` begins with."""
    return f"load:c:{tag}:"


def counter_key(tag: str, i: int) -> str:
    """The counter INCR uses for key number ``i`` in the run named ``tag``."""
    return f"{counter_prefix(tag)}{i}"


class KvLoader(Loader):
    """A :class:`~lab.measure.loader.Loader` whose requests are kv commands (see the module)."""

    def __init__(self, plan: LoaderPlan) -> None:
        super().__init__(plan)
        config = plan.config
        self.size = 0  # the echo loader's message: none (bytes_verified counts lines here)
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        weights = parse_mix(config.mix)
        self.ops = [_OPS[op] for op, weight in weights.items() if weight]
        self.op_cumulative = list(itertools.accumulate(w for w in weights.values() if w))
        self.keys = config.keys
        exponent = zipf_exponent(config.distribution)
        self.key_cumulative: list[float] | None = None
        if exponent is not None:
            self.key_cumulative = list(
                itertools.accumulate((k + 1) ** -exponent for k in range(config.keys))
            )
        # A SET's value after its "<i>." prefix: --size bytes (the prefix counts in them).
        self.value = bytes(self.rng.choice(_VALUE_CHARS) for _ in range(config.size))
        self.counter_line = f"INCR {counter_prefix(config.tag)}".encode()
        self.tag = config.tag
        self.acked = [0] * config.keys
        self.unanswered = [0] * config.keys

    def run(self, start_at: float) -> LoadResult:
        result = super().run(start_at)
        counters = {
            str(i): [acked, unanswered]
            for i, (acked, unanswered) in enumerate(zip(self.acked, self.unanswered, strict=True))
            if acked or unanswered
        }
        result.kv_incr = {"tag": self.tag, "counters": counters}
        return result

    # --- one command -----------------------------------------------------------------------

    def _pick_key(self) -> int:
        cumulative = self.key_cumulative
        if cumulative is None:
            return int(self.rng.random() * self.keys)
        return min(bisect.bisect(cumulative, self.rng.random() * cumulative[-1]), self.keys - 1)

    def _begin(self, slot: _Slot, origin: float, now: float) -> None:
        cumulative = self.op_cumulative
        op = self.ops[bisect.bisect(cumulative, self.rng.random() * cumulative[-1])]
        key = self._pick_key()
        slot.op, slot.key = op, key
        if op == GET:
            slot.request = b"GET load:k:%d\n" % key
        elif op == SET:
            prefix = b"%d." % key
            slot.request = b"SET load:k:%d %s%s\n" % (key, prefix, self.value[len(prefix) :])
        elif op == INCR:
            slot.floor = self.acked[key] + 1
            slot.request = b"%s%d\n" % (self.counter_line, key)
        else:
            slot.request = b"DEL load:k:%d\n" % key
        if slot.reply:
            slot.reply.clear()
        super()._begin(slot, origin, now)

    def _send(self, slot: _Slot, now: float) -> None:
        sock = slot.sock
        assert sock is not None
        request = slot.request
        try:
            while slot.sent < len(request):
                slot.sent += sock.send(request[slot.sent :] if slot.sent else request)
                slot.last_progress = now
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(slot, now, self._io_kind(slot, exc.errno))
            return
        if slot.sent == len(request):
            slot.state = RECEIVING

    def _receive(self, slot: _Slot, now: float) -> None:
        if slot.state == READY:
            self._receive_idle(slot, now)
            return
        sock = slot.sock
        assert sock is not None
        buffer = self.buffer
        while True:  # edge-triggered: read until the reply line is in, or nothing more is there
            try:
                n = sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(slot, now, self._io_kind(slot, exc.errno))
                return
            if n == 0:
                kind = "closed_idle" if self._closed_before_echo(slot) else "short_read"
                self._fail(slot, now, kind)
                return
            if not slot.first_echo:
                slot.first_echo = True
                self._end_wait(slot, now, still_waiting=False)
            slot.got += n
            slot.last_progress = now
            end = buffer.find(b"\n", 0, n)
            if end < 0:
                slot.reply += self.view[:n]
                if len(slot.reply) > MAX_REPLY:
                    self._fail(slot, now, "mismatch")
                    return
                continue
            if end != n - 1:  # more than one line: replies nobody asked for
                self._fail(slot, now, "mismatch")
                return
            if slot.reply:
                slot.reply += self.view[:end]
                line = bytes(slot.reply)
            else:
                line = bytes(self.view[:end])
            self._check(slot, line, now)
            return

    def _check(self, slot: _Slot, line: bytes, now: float) -> None:
        """The reply ``line`` (its newline stripped) to the slot's command."""
        op = slot.op
        if line.startswith(b"ERR"):
            if op == INCR and line == b"ERR busy":
                slot.op = NONE  # known not to have happened: not unanswered
            self._fail(slot, now, "busy" if line == b"ERR busy" else "kv_error")
            return
        if op == GET:
            good = line == b"NOT_FOUND" or line.startswith(b"%d." % slot.key)
        elif op == SET:
            good = line == b"OK"
        elif op == INCR:
            good = line.isdigit() and int(line) >= slot.floor
        else:
            good = line in (b"OK", b"NOT_FOUND")
        if not good:
            self._fail(slot, now, "mismatch")  # an INCR answered wrongly: counted unanswered
            return
        if op == INCR:
            self.acked[slot.key] += 1
        slot.op = NONE
        if slot.measured:
            self.bytes_verified += len(slot.request) + len(line) + 1
        self._complete(slot, now)

    def _fail(self, slot: _Slot, now: float, kind: str) -> None:
        if slot.op == INCR and slot.sent and slot.state in (SENDING, RECEIVING):
            self.unanswered[slot.key] += 1  # it may have committed before the failure
        slot.op = NONE
        super()._fail(slot, now, kind)

    def _finish(self, now: float) -> None:
        for slot in self.slots:
            if slot.state in _BUSY and slot.op == INCR and slot.sent:
                self.unanswered[slot.key] += 1
            slot.op = NONE
        super()._finish(now)
