"""Replacing a worker that died — a process or a thread — without a tight loop.

A worker that keeps dying at once (a bug, a missing resource) must not make the server start
replacements as fast as they die: after :attr:`Respawning.CRASH_LIMIT` unexpected deaths within
:attr:`~Respawning.CRASH_WINDOW` seconds, replacements wait :attr:`~Respawning.RESPAWN_DELAY`
seconds (the supervising loop's ``poll()`` timeout brings it back then). The process pools
(``pool.py``) and the thread pools (``threads.py``) share the rule.
"""

from __future__ import annotations

import time
from collections import deque

from lab.sockets.base import Server
from lab.sockets.config import ServerConfig
from lab.sockets.log import Log


class Respawning(Server):
    """Mixed in by a design that keeps a pool of workers: :meth:`replace` after a death."""

    CRASH_LIMIT = 5
    CRASH_WINDOW = 5.0
    RESPAWN_DELAY = 1.0

    def __init__(self, config: ServerConfig, log: Log | None = None) -> None:
        super().__init__(config, log)
        self.deaths: deque[float] = deque(maxlen=self.CRASH_LIMIT)
        self.respawn_at: float | None = None  # when replacements may start again

    def maintain_pool(self) -> int:
        """Start workers until the pool has what it needs; returns how many were started."""
        raise NotImplementedError

    def replace(self, cause: str, kind: str) -> None:
        """A worker died unexpectedly (``cause`` says how): replace it now, or — when ``kind``
        (workers, threads) keep dying — after the delay. One notice line either way."""
        now = time.monotonic()
        self.deaths.append(now)
        if len(self.deaths) == self.CRASH_LIMIT and now - self.deaths[0] < self.CRASH_WINDOW:
            self.respawn_at = now + self.RESPAWN_DELAY
            self.log.notice(f"{cause}; {kind} keep dying: replacing in {self.RESPAWN_DELAY:g} s")
            return
        started = self.maintain_pool() if self.respawn_at is None else 0
        self.log.notice(cause + (": started a replacement" if started else ""))

    def poll_timeout(self, now: float) -> float | None:
        timeout = super().poll_timeout(now)
        if self.respawn_at is not None:
            wait = max(0.0, self.respawn_at - now)
            timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def tick(self) -> None:
        if self.respawn_at is not None and time.monotonic() >= self.respawn_at:
            self.respawn_at = None
            self.maintain_pool()
