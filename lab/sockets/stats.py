"""Server statistics, kept where they cost no system call.

The process that prints statistics (the server, or the supervising parent) is often not the one
that served the connection: a forked child or a pool worker did. Each such process counts in its
own *slot* of a shared memory region (:class:`Counters`) that the parent maps before ``fork()``:
``mmap(-1, …)`` is anonymous and ``MAP_SHARED``, so parent and children see the same pages. A
slot is a row of 64-bit integers that only its process writes (an aligned 8-byte store is
atomic on the machines we run on, so the parent never reads half a number). Counting is a store
to memory — no ``write()`` per connection, no parent woken to read a record — and the counts
outlive the process: when a worker dies the parent folds its slot into the totals, and whatever
the slot had accepted but not ended is what the death cost. The parent reads the slots only when
it needs a figure (SIGUSR1, the final line, ``lab bench``).

A program that ``spawn`` starts is not a fork of ours and cannot share the mapping; the lab's own
worker program writes one record per connection to a pipe instead (:class:`ReportPipe`).
"""

from __future__ import annotations

import mmap
import os
import time
from collections import Counter

COMPLETED = "completed"  # the client closed its side after every byte it sent was echoed
# Failure reasons (``failed`` counts by these):
RESET = "reset"  # the client reset the connection, or went away while we wrote
IDLE_TIMEOUT = "idle_timeout"  # no progress either way for --idle-timeout seconds
STOPPED = "stopped"  # still open when the server's --grace ran out
WORKER_DIED = "worker_died"  # the process serving it died mid-connection
SPAWN_FAILED = "spawn_failed"  # posix_spawn()/fork() failed (EAGAIN, ENOMEM)
ERROR = "error"  # any other socket error


class Stats:
    """A server's counts (no dataclass: see lab.sockets.config on the server's imports)."""

    def __init__(self, design: str, per_worker_enabled: bool = True) -> None:
        self.design = design
        self.accepted = 0
        self.completed = 0
        self.failed: Counter[str] = Counter()
        self.shed = 0  # accepted and closed at once: no descriptor, no room in the queue
        self.bytes_in = 0
        self.bytes_out = 0
        self.per_worker: Counter[str] = Counter()  # connections served, by worker pid
        self.workers_alive = 0
        self.health_probes = 0  # answered on the health port; not connections
        self.report_errors = 0  # malformed records on the report pipe, skipped
        self.started = time.monotonic()
        self.per_worker_enabled = per_worker_enabled  # count connections by serving pid

    def copy(self) -> Stats:
        twin = Stats(self.design, self.per_worker_enabled)
        twin.__dict__.update(self.__dict__)
        twin.failed, twin.per_worker = Counter(self.failed), Counter(self.per_worker)
        return twin

    def ended(self, outcome: str, bytes_in: int, bytes_out: int, worker: int | None) -> None:
        if outcome == COMPLETED:
            self.completed += 1
        else:
            self.failed[outcome] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if worker is not None and self.per_worker_enabled:
            self.per_worker[str(worker)] += 1

    @property
    def in_flight(self) -> int:
        return self.accepted - self.completed - sum(self.failed.values()) - self.shed

    def to_json(self) -> str:
        """One JSON line. Written by hand, not with the json module: it would be one more
        import in every forked process's image, or an import at the moment descriptors ran out
        (SIGUSR1 during EMFILE must still answer)."""
        fields: list[tuple[str, object]] = [
            ("event", "stats"),
            ("design", self.design),
            ("pid", os.getpid()),
            ("uptime_s", round(time.monotonic() - self.started, 3)),
            ("accepted", self.accepted),
            ("completed", self.completed),
            ("failed", dict(sorted(self.failed.items()))),
            ("shed", self.shed),
            ("in_flight", self.in_flight),
            ("bytes_in", self.bytes_in),
            ("bytes_out", self.bytes_out),
            ("per_worker", dict(sorted(self.per_worker.items()))),
            ("workers_alive", self.workers_alive),
            ("health_probes", self.health_probes),
        ]
        if self.report_errors:
            fields.append(("report_errors", self.report_errors))
        return _object(fields)


def _value(value: object) -> str:
    if isinstance(value, dict):
        return _object(list(value.items()))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)  # int, float


def _object(items: list[tuple[str, object]]) -> str:
    return "{" + ", ".join(f"{_value(str(k))}: {_value(v)}" for k, v in items) + "}"


# -- shared-memory counters ------------------------------------------------------------------------
# A slot's fields, in order. ACCEPTED: connections this process accept()ed itself; RECEIVED:
# connections handed to it (a descriptor by recvmsg(), a fork child's one connection); the ended
# ones by outcome; STATE: what a pool worker is doing (sendmsg's pool rules read it).
PID, ACCEPTED, RECEIVED, SHED, BYTES_IN, BYTES_OUT, STATE = range(7)
OUTCOMES = (COMPLETED, RESET, IDLE_TIMEOUT, STOPPED, ERROR)
OUTCOME_FIELD = {outcome: 7 + i for i, outcome in enumerate(OUTCOMES)}
SLOT_FIELDS = 7 + len(OUTCOMES)
IDLE, BUSY = 0, 1  # values of STATE


class Slot:
    """One process's row of counters; only that process writes it. Every method is a few
    stores to shared memory: no system call, no allocation beyond Python's own integers."""

    __slots__ = ("base", "cells")

    def __init__(self, cells: memoryview, index: int) -> None:
        self.cells = cells
        self.base = index * SLOT_FIELDS

    def accepted(self) -> None:
        self.cells[self.base + ACCEPTED] += 1

    def received(self) -> None:
        self.cells[self.base + RECEIVED] += 1

    def shed(self, count: int = 1) -> None:
        """Connections taken (and counted as taken) that were closed at once."""
        self.cells[self.base + SHED] += count

    def accepted_and_shed(self, count: int) -> None:
        """accept()ed only to be closed for want of descriptors (the spare-descriptor trick)."""
        self.cells[self.base + ACCEPTED] += count
        self.cells[self.base + SHED] += count

    def ended(self, outcome: str, bytes_in: int, bytes_out: int) -> None:
        cells, base = self.cells, self.base
        cells[base + OUTCOME_FIELD[outcome]] += 1
        cells[base + BYTES_IN] += bytes_in
        cells[base + BYTES_OUT] += bytes_out

    def set_state(self, state: int) -> None:
        self.cells[self.base + STATE] = state

    def get(self, field_: int) -> int:
        return int(self.cells[self.base + field_])

    def in_flight(self) -> int:
        """Connections taken and not yet ended (what this process's death would cost)."""
        cells, base = self.cells, self.base
        ended = sum(cells[base + f] for f in OUTCOME_FIELD.values()) + cells[base + SHED]
        return int(cells[base + ACCEPTED] + cells[base + RECEIVED] - ended)

    def clear(self, pid: int = 0) -> None:
        for f in range(SLOT_FIELDS):
            self.cells[self.base + f] = 0
        self.cells[self.base + PID] = pid


class Counters:
    """The parent's side: a region of ``size`` slots, mapped before any fork. The parent hands a
    free slot to each process it starts (:meth:`assign`), and folds it into :class:`Stats` when
    that process has been reaped (:meth:`retire`)."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, max(1, size) * SLOT_FIELDS * 8)  # anonymous, MAP_SHARED
        self.cells = memoryview(self.map).cast("q")
        self.free = list(range(size - 1, -1, -1))
        self.by_pid: dict[int, Slot] = {}

    def assign(self) -> Slot:
        """A zeroed slot for the next process (call before fork(); then :meth:`bind`)."""
        slot = Slot(self.cells, self.free.pop())
        slot.clear()
        return slot

    def bind(self, slot: Slot, pid: int) -> None:
        slot.cells[slot.base + PID] = pid
        self.by_pid[pid] = slot

    def release(self, slot: Slot) -> None:
        """A slot whose process never started (fork failed)."""
        self.free.append(slot.base // SLOT_FIELDS)

    def live(self) -> list[Slot]:
        return list(self.by_pid.values())

    def retire(self, pid: int, stats: Stats, lost_as: str) -> int:
        """Fold a reaped process's slot into ``stats``; its connections still in flight count as
        ``lost_as`` (worker_died, or stopped past the grace period). Returns how many."""
        slot = self.by_pid.pop(pid, None)
        if slot is None:
            return 0
        lost = add_slot(stats, slot)
        if lost > 0:
            stats.failed[lost_as] += lost
        self.free.append(slot.base // SLOT_FIELDS)
        return lost

    def snapshot(self, stats: Stats) -> Stats:
        """``stats`` plus what every live slot has counted so far (a copy: nothing is folded)."""
        total = stats.copy()
        for slot in self.by_pid.values():
            add_slot(total, slot, in_flight=True)
        return total

    def close(self) -> None:
        self.cells.release()
        self.map.close()


def add_slot(stats: Stats, slot: Slot, in_flight: bool = False) -> int:
    """Add a slot's counts to ``stats``; returns the connections it had in flight."""
    get = slot.get
    stats.accepted += get(ACCEPTED)
    stats.shed += get(SHED)
    stats.bytes_in += get(BYTES_IN)
    stats.bytes_out += get(BYTES_OUT)
    served = 0
    for outcome, f in OUTCOME_FIELD.items():
        count = get(f)
        served += count
        if outcome == COMPLETED:
            stats.completed += count
        elif count:
            stats.failed[outcome] += count
    if stats.per_worker_enabled and get(PID):
        stats.per_worker[str(get(PID))] += served
    return slot.in_flight()


class ReportPipe:
    """The statistics of programs that ``spawn`` starts: one record per connection on a pipe.

    The lab's worker program (``spawn_worker.py``) writes ``d PID OUTCOME BYTES_IN BYTES_OUT`` to
    descriptor 3 when its connection ends; a write of at most PIPE_BUF (4096) bytes to a pipe is
    atomic, so records from many writers never interleave. Only the lab's own program gets the
    pipe (``--worker-cmd`` programs do not), and the parent trusts nothing on it: a malformed
    record is skipped and counted (``report_errors``).

    :attr:`open` counts, per pid, connections handed to a process and not yet reported ended.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.open: Counter[int] = Counter()
        self._partial = b""

    def opened(self, pid: int) -> None:
        """The parent handed a connection to ``pid`` (it counted the accept itself)."""
        self.open[pid] += 1

    def drain(self, stats: Stats) -> None:
        """Fold every waiting record into ``stats``."""
        chunks = [self._partial]
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        *lines, self._partial = b"".join(chunks).split(b"\n")
        if len(self._partial) > 4096:  # no record is this long: garbage without a newline
            self._partial = b""
            stats.report_errors += 1
        for line in lines:
            record = self.parse(line)
            if record is None:
                stats.report_errors += 1
                continue
            pid, outcome, bytes_in, bytes_out = record
            stats.ended(outcome, bytes_in, bytes_out, worker=None)
            self.open[pid] -= 1

    @staticmethod
    def parse(line: bytes) -> tuple[int, str, int, int] | None:
        parts = line.split()
        if len(parts) != 5 or parts[0] != b"d":
            return None
        try:
            pid, bytes_in, bytes_out = int(parts[1]), int(parts[3]), int(parts[4])
            outcome = parts[2].decode("ascii")
        except (ValueError, UnicodeDecodeError):
            return None
        if outcome not in OUTCOMES or min(pid, bytes_in, bytes_out) < 0:
            return None
        return pid, outcome, bytes_in, bytes_out

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
