"""What the event-loop designs (``select``, ``asyncio``) share: the idle timeout without a clock
read per message, and how a socket error ends a connection.

**Why the idle timeout needs its own timer here.** The blocking designs get it from the kernel:
``SO_RCVTIMEO``/``SO_SNDTIMEO`` make a blocked ``recv``/``send`` fail after ``--idle-timeout``
(:mod:`lab.sockets.serving`). An event loop never blocks in ``recv`` or ``send`` — it waits in
``epoll_wait`` for every connection at once — so those options never fire. Timing every
connection with a timer of its own (a heap entry re-armed on every message, as asyncio's
``call_later`` would be) costs a clock read and a heap operation per message.

**A coarse, lazy wheel** (:class:`IdleWheel`) instead. Time is counted in *ticks* of
``interval`` seconds (``--idle-timeout`` / 4, at most 1 s), driven by a periodic timer the loop
owns (an interval ``ITIMER_REAL`` in ``select``, ``call_later`` in ``asyncio``) and running only
while connections are open. Per message a connection only stores the current tick number in
``seen``: no clock read, no allocation, no system call. Each connection sits in exactly one
bucket, the tick at which it could first have been idle long enough (``due``). When a tick
comes, only that tick's bucket is looked at: a connection still idle is closed, one that was
active since is moved to the bucket its last activity makes due. So a busy connection is touched
once per ``--idle-timeout``, not once per message, and idle ones cost nothing until their time
comes: many idle connections add nothing to a wake-up.

A connection is closed after ``--idle-timeout`` with no progress, at most one ``interval`` later
(ticks that arrive while the loop is busy are counted once, which can only make the close later,
never earlier).
"""

from __future__ import annotations

import math

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import Any  # a connection: any object with `seen` and `due` (ints)


def tick_interval(idle_timeout: float) -> float:
    """Seconds per tick: a quarter of the idle timeout, at most one second."""
    return min(1.0, max(idle_timeout / 4, 0.001))


class IdleWheel:
    """The connections with no progress for ``timeout`` seconds, found once per tick."""

    def __init__(self, timeout: float) -> None:
        self.interval = tick_interval(timeout)
        # Progress during tick s happened at most `interval` before tick s + 1 began, so after
        # span - 1 ≥ timeout / interval whole ticks the connection is idle for at least timeout.
        self.span = math.ceil(timeout / self.interval - 1e-9) + 1
        self.now = 0  # ticks so far: what a connection stores in `seen` on progress
        self._due: dict[int, set[Any]] = {}

    def add(self, conn: Any) -> None:
        conn.seen = self.now
        self._put(conn, self.now + self.span)

    def _put(self, conn: Any, due: int) -> None:
        conn.due = due
        bucket = self._due.get(due)
        if bucket is None:
            self._due[due] = {conn}
        else:
            bucket.add(conn)

    def remove(self, conn: Any) -> None:
        bucket = self._due.get(conn.due)
        if bucket is not None:
            bucket.discard(conn)
            if not bucket:
                del self._due[conn.due]

    def advance(self) -> list[Any]:
        """One tick has passed: the connections now idle for at least the timeout (they stay
        in the wheel until :meth:`remove`)."""
        self.now += 1
        bucket = self._due.pop(self.now, None)
        if not bucket:
            return []
        expired = []
        for conn in bucket:
            if self.now - conn.seen >= self.span:
                expired.append(conn)
                self._put(conn, self.now + 1)  # where remove() finds it
            else:
                self._put(conn, conn.seen + self.span)
        return expired

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._due.values())
