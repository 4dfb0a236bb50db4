"""What a connection gets: the echo (the default) or the kv store (``--service kv``).

A blocking design serves a connection with one call, ``serve(fd, serving) -> outcome``; it picks
that function once, before its accept loop (``serve = services.for_config(config)``), and calls
it where it called :func:`lab.sockets.echo.echo`. With ``--service echo`` the function *is*
``echo``: the echo's path has no extra call, branch or import (this module imports neither
sqlite3 nor :mod:`lab.sockets.kv` until kv is asked for — a fork design's parent stays small).

:func:`serve_kv`'s function has echo's contract: the same outcomes (``completed`` on EOF,
``reset`` when the peer went away, ``idle_timeout`` when ``SO_RCVTIMEO``/``SO_SNDTIMEO`` said
EAGAIN, ``stopped`` when the grace period's shutdown cut it, ``error`` otherwise), counted with
bytes in and out in ``serving.slot``; it never raises OSError. It reads what came, runs the
commands (:class:`~lab.sockets.kv.KvSession`: bounded replies) and writes the replies before it
reads again, so a client that pipelines without reading is stopped by TCP's flow control, as
with the echo.

**Where the Store is opened.** A sqlite3 connection must not cross ``fork()`` (the child would
share the parent's open file and cached pages, and its locks would not be its own) nor be used
by two threads. So the kv function opens its :class:`~lab.sockets.kv.Store` lazily, at the first
connection a thread serves, and keeps it in a ``threading.local`` for the life of that thread:
once per process for the process designs (the process that serves — the fork child, the pool
worker, the iterative server), once per thread for the thread designs (a pool thread keeps its
Store; the ``thread`` design's thread lives for one connection, so there it is one Store per
connection, closed as the connection ends). The parents never open one after :func:`prepare`,
which runs (and closes) before any worker exists; a child forked by a thread that held a Store
forgets it (``register_at_fork``) without closing it — closing could checkpoint or remove the
WAL under the parent.
"""

from __future__ import annotations

import os

from lab.sockets import stats
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.echo import abort_if_unsent, echo, outcome_of, write_rest
from lab.sockets.log import printable
from lab.sockets.serving import BUFFER_SIZE, Serving

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from collections.abc import Callable

    from lab.sockets.kv import Store

    Service = Callable[[int, Serving], str]


def for_config(config: ServerConfig, thread_per_connection: bool = False) -> Service:
    """The function that serves one connection of this server: ``echo`` itself, or kv's.

    ``thread_per_connection``: each thread serves one connection and ends (the ``thread``
    design), so kv closes the thread's Store as the connection ends. Left to the thread's end,
    it would be freed only by the cycle collector (a sqlite3 connection's statement cache
    refers back to it), and its descriptors would linger meanwhile."""
    if config.service == "kv":
        return serve_kv(config.db_path, close_after=thread_per_connection)
    return echo


def prepare(config: ServerConfig) -> None:
    """Create the kv database (its file, WAL mode, the table) once, in the server's first
    process, before any worker or child exists: otherwise the first connections of several
    workers would race to switch the new file's journal mode (a write that takes the database
    lock: one of them gets SQLITE_BUSY at once). WAL mode is a property of the file, so every
    later connection finds it set. Nothing stays open (nothing to carry across a fork).
    ConfigError (one line) when the file cannot be used."""
    if config.service != "kv":
        return
    import sqlite3

    from lab.sockets.kv import KvError, Store

    path = config.db_path
    try:
        Store(path).close()
    except (sqlite3.Error, KvError) as exc:
        raise ConfigError(
            f"--db {path}: cannot use it as the kv store ({exc}): "
            "give a writable path on a local filesystem"
        ) from None


def open_store(path: str) -> Store:
    """One Store for the calling process or thread (see the module docstring)."""
    from lab.sockets.kv import Store

    return Store(path)


_FIELD = stats.OUTCOME_FIELD


def serve_kv(path: str, close_after: bool = False) -> Service:
    """The kv service on the file at ``path``: a function with echo's contract.
    ``close_after``: close the thread's Store when each connection ends (see for_config)."""
    import sqlite3
    import threading

    from lab.sockets.kv import KvError, KvSession

    local = threading.local()  # .store: this thread's Store, opened at its first connection
    orphans: list[object] = []

    def forget_in_child() -> None:
        # A Store the forking thread held is the parent's: never use it, never close it here
        # (closing may checkpoint or delete the WAL the parent still uses). Keep it referenced
        # so that its finalizer does not close it either.
        store = getattr(local, "store", None)
        if store is not None:
            orphans.append(store)
            local.store = None

    os.register_at_fork(after_in_child=forget_in_child)
    read, write = os.read, os.write

    def serve(fd: int, serving: Serving) -> str:
        tracing = serving.tracing
        bytes_in = bytes_out = 0
        if serving.cut:  # the grace period ran out between accept() and here
            outcome = stats.STOPPED
        else:
            store = getattr(local, "store", None)
            if store is None:
                try:
                    store = local.store = open_store(path)
                except (sqlite3.Error, KvError) as exc:
                    serving.log.notice(f"kv: cannot open {path} ({exc}): closing the connection")
                    return _count(serving, stats.ERROR, 0, 0)
            session = KvSession(store)
            serving.current = fd
            try:
                while True:
                    data = read(fd, BUFFER_SIZE)
                    if not data:
                        break
                    bytes_in += len(data)
                    if tracing:
                        serving.log.trace(f"The message from client: {printable(data)}")
                    replies = session.receive(data)
                    while True:
                        if replies:
                            # As echo's: a client that sends commands and never reads is cut
                            # after --idle-timeout in all, with a reset (below).
                            n = len(replies)
                            sent = write(fd, replies)
                            if sent != n:
                                sent += write_rest(
                                    fd, memoryview(replies), sent, n, serving.idle_timeout
                                )
                            bytes_out += sent
                            if tracing:
                                serving.log.trace(f"send() is OK: {printable(replies)}")
                        if not session.unfed:
                            break
                        replies = session.more()
                outcome = stats.STOPPED if serving.cut else stats.COMPLETED
            except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO: no progress for --idle-timeout
                outcome = stats.STOPPED if serving.cut else stats.IDLE_TIMEOUT
                abort_if_unsent(fd)
            except OSError as exc:
                outcome = stats.STOPPED if serving.cut else outcome_of(exc)
                if tracing and outcome == stats.ERROR:
                    serving.log.trace(f"socket error: {exc}")
            finally:
                serving.current = -1
                if close_after:
                    local.store = None
                    store.close()
            if tracing:
                serving.log.trace(f"closing the connection: {outcome}")
        return _count(serving, outcome, bytes_in, bytes_out)

    return serve


def _count(serving: Serving, outcome: str, bytes_in: int, bytes_out: int) -> str:
    """The connection's end in its slot, as echo counts it."""
    slot = serving.slot
    cells, base = slot.cells, slot.base
    cells[base + _FIELD[outcome]] += 1
    cells[base + stats.BYTES_IN] += bytes_in
    cells[base + stats.BYTES_OUT] += bytes_out
    return outcome
