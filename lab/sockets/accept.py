"""accept() and what to do when it fails.

Two kinds of failure, two policies (the kernel's accept(2) page and trio's
``_highlevel_socket.py`` reason the same way):

* The process or the system is out of a resource (descriptors, buffers, memory). Retrying at
  once fails again and spins a core at 100 %, while the waiting connection keeps the listening
  socket readable. So: back off exponentially, log once per episode, and make room for the
  waiting client by the *spare descriptor* technique — keep one descriptor open for this
  moment; close it, accept the connection and close that at once (the client learns at once
  — a reset if it had sent data we never read — instead of waiting in the backlog), then
  reopen the spare.
* The *connection* failed between the handshake and accept() (the client reset it, a firewall
  refused it): Linux reports such errors from accept() itself. Skip it, accept the next one.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from lab.sockets.log import Log

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)

SKIP_AT_MOST = 64  # failed connections skipped in one call before giving the loop back
BACKOFF_FIRST = 0.01  # seconds; doubles per failure within an episode …
BACKOFF_MAX = 1.0  # … up to this


class Acceptor:
    """Accepts from a listening socket, applying the policy above. Connections come back as
    descriptor numbers (``socket._accept()``): the designs hand them on (fork, posix_spawn,
    sendmsg) or serve them with os-level calls, so no socket object is built per connection."""

    def __init__(self, listener: socket.socket, log: Log) -> None:
        self.listener = listener
        self._accept = listener._accept  # type: ignore[attr-defined]
        self.log = log
        self.tracing = log.tracing
        self.spare: int | None = self._open_spare()
        self.backoff = 0.0
        self.paused_until = 0.0
        self.shed = 0  # connections accepted only to be closed for want of descriptors
        self._episode_shed = 0
        self._exhausted = False  # inside an out-of-descriptors episode

    @staticmethod
    def _open_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def accept(self) -> int | None:
        """A new connection's descriptor, or None (nothing waiting on a non-blocking listener,
        a failed connection skipped, or backing off: see :attr:`paused_until`). On a blocking
        listener it waits (up to its SO_RCVTIMEO: then None)."""
        try:
            fd, _ = self._accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return self._failed(exc)
        if self._exhausted or self.backoff:
            self._recovered()
        if self.tracing:
            self.log.trace("accept() is OK")
        return int(fd)

    def after_failure(self, exc: OSError) -> tuple[int | None, int]:
        """The policy for a failed accept() (:meth:`_failed`): a connection taken instead (or
        None), and how many connections it shed on the way (the caller counts them as
        accepted and shed)."""
        shed = self.shed
        fd = self._failed(exc)
        return fd, self.shed - shed

    def _failed(self, exc: OSError) -> int | None:
        for _ in range(SKIP_AT_MOST):
            if exc.errno in RESOURCE_ERRNOS:
                self._out_of_resources(exc)
                return None
            if exc.errno not in CONNECTION_ERRNOS:
                raise exc
            try:  # that connection failed; the next one may be fine
                fd, _ = self._accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as again:
                exc = again
                continue
            if self.tracing:
                self.log.trace("accept() is OK")
            return int(fd)
        return None

    def _recovered(self) -> None:
        if self._exhausted:
            self.log.notice(
                f"accept() recovered; {self._episode_shed} connection(s) shed while out of "
                "descriptors"
            )
            self._exhausted = False
            self._episode_shed = 0
        self.backoff = 0.0

    def _out_of_resources(self, exc: OSError) -> None:
        if not self._exhausted:
            self._exhausted = True
            name = errno.errorcode.get(exc.errno or 0, "?")
            self.log.notice(
                f"accept() failed with {name} ({exc.strerror}): shedding waiting connections "
                "and backing off until descriptors free up (raise the limit: ulimit -n)"
            )
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
            try:
                fd, _ = self._accept()
                os.close(fd)
                self.shed += 1
                self._episode_shed += 1
            except OSError:
                pass
            self.spare = self._open_spare()
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self.backoff * 2))
        self.paused_until = time.monotonic() + self.backoff

    def pause(self) -> None:
        """Back off for another reason of the same kind (e.g. posix_spawn() said EAGAIN)."""
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self.backoff * 2))
        self.paused_until = time.monotonic() + self.backoff

    def close(self) -> None:
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
