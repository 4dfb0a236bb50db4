"""The kv service: a line protocol over a SQLite file, sans I/O.

A client sends lines; every line gets exactly one reply line, in order, so a client may pipeline.
A line ends with ``\\n`` (a ``\\r`` before it is dropped, so ``\\r\\n`` works too) and is at most
:data:`MAX_LINE` bytes including the newline. Fields are separated by runs of ASCII whitespace;
command names are case-insensitive::

    GET key              → the value | NOT_FOUND
    SET key value        → OK           (value: the rest of the line after the key)
    INCR key [n]         → the new value, an integer (n defaults to 1, may be negative)
    DEL key              → OK | NOT_FOUND
    SCAN prefix [limit]  → the keys that start with prefix, in key order, space-separated,
                           at most limit of them (default SCAN_DEFAULT, 1..SCAN_MAX);
                           an empty line when none match

Anything else is ``ERR <reason>`` and the connection goes on: an unknown command, the wrong number
of arguments (``ERR usage: …``), a key or value that is not UTF-8, a key longer than :data:`MAX_KEY`
bytes, a line longer than MAX_LINE (``ERR line too long`` as soon as it cannot fit; the rest of it,
up to its newline, is discarded), an empty line, an ``n`` or ``limit`` that is not a decimal
integer. INCR works on 64-bit integers: a stored value that is not one in canonical decimal form
(``-12``, not ``+12`` or ``012``) is ``ERR not an integer``, a result outside 64 bits ``ERR
overflow``; a missing key counts from 0. A value may not be ``NOT_FOUND``, ``ERR`` or start with
``ERR `` (``ERR reserved value``): GET replies with the bare value, which must not read as a miss or
an error. A line that the connection's end cuts short (no newline) gets no reply.

Storage is :class:`Store`: one SQLite connection in WAL mode, each command one statement and so
one transaction (autocommit). A write that cannot take the database's write lock within the busy
timeout is ``ERR busy`` and did not happen; every other reply to a write means it committed.
:class:`KvProtocol` turns received bytes into reply bytes and does no I/O, so a blocking design
and an event loop drive the same code. A sqlite3 connection must not cross a ``fork()`` or be
shared by threads: each process and each thread opens its own Store (sqlite3's own thread check
enforces the second). Only the standard library is used (the socket layer's rule).
"""

from __future__ import annotations

import sqlite3

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

MAX_LINE = 4096  # bytes in a request line, the newline included
MAX_KEY = 250  # bytes of UTF-8 in a key (memcached's limit)
SCAN_DEFAULT = 100  # keys a SCAN returns when no limit is given
SCAN_MAX = 1000  # the largest limit: a reply line is at most ~251 KB
DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a write waits for another connection's write lock
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

OK = b"OK\n"
NOT_FOUND = b"NOT_FOUND\n"
TOO_LONG = b"ERR line too long\n"
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class KvError(Exception):
    """A command that cannot be done; its message is the reply's reason (``ERR <reason>``)."""


_SCHEMA = (
    # WITHOUT ROWID: the rows live in the key's B-tree, so a lookup or a range is one search.
    "CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
)
_GET = "SELECT value FROM kv WHERE key = ?"
_SET = (
    "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)
_DEL = "DELETE FROM kv WHERE key = ?"
# INCR is one statement (SQLite >= 3.35 has RETURNING; 3.40 here). A read-modify-write done as a
# SELECT then an UPDATE in a deferred transaction starts as a reader: in WAL mode its upgrade to
# writer fails with SQLITE_BUSY at once, without the busy timeout, when another connection holds
# the write lock or has committed since the read (SQLITE_BUSY_SNAPSHOT; waiting could not help).
# A write statement in autocommit mode takes the write lock before it reads, as BEGIN IMMEDIATE
# would, so it waits up to the busy timeout and reads the latest value: no lost update, and one
# call instead of four. The WHERE makes the update a no-op (no row returned) when the stored
# value is not a canonical 64-bit integer (the CAST round trip changes it: 'x', '012', a number
# past 64 bits) or the sum would leave 64 bits (SQLite's + then yields a REAL). A missing key
# inserts n (TEXT affinity stores it as its decimal text).
_INCR = (
    "INSERT INTO kv(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE"
    " SET value = CAST(value AS INTEGER) + ?2"
    " WHERE CAST(CAST(value AS INTEGER) AS TEXT) = value"
    " AND typeof(CAST(value AS INTEGER) + ?2) = 'integer'"
    " RETURNING value"
)
# A prefix as a key range, so the primary key's B-tree is searched, not scanned (LIKE is
# case-insensitive and GLOB needs escaping). BINARY collation compares UTF-8 bytes, which order
# as code points do, as Python's str comparison does.
_SCAN = "SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?"
_SCAN_TO_END = "SELECT key FROM kv WHERE key >= ? ORDER BY key LIMIT ?"


class Store:
    """The kv table in a SQLite file, created if missing; one connection, for one process and
    thread. Every method is one statement in autocommit mode, so one transaction.

    ``busy_timeout`` is how long (seconds) a statement waits for a lock another connection holds;
    past it the statement fails with ``sqlite3.OperationalError`` (SQLITE_BUSY) and nothing was
    written. WAL mode lets readers go on while one connection writes (writes still take turns).
    ``synchronous`` stays at its default, FULL: a commit is on disk before the reply says so."""

    def __init__(self, path: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        if sqlite3.sqlite_version_info < (3, 35):  # RETURNING (INCR); the upserts need 3.24
            raise KvError(f"SQLite {sqlite3.sqlite_version} is too old: the kv store needs 3.35")
        self.path = path
        # isolation_level=None: sqlite3 opens no transactions of its own; each statement is one.
        self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # e.g. ':memory:', or a filesystem without shared memory
                raise KvError(f"{path}: SQLite could not use WAL mode (journal_mode is {mode})")
            self._db.execute(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def get(self, key: str) -> str | None:
        row = self._db.execute(_GET, (key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, key: str, value: str) -> None:
        self._db.execute(_SET, (key, value))

    def delete(self, key: str) -> bool:
        """True when the key was there."""
        return self._db.execute(_DEL, (key,)).rowcount > 0

    def incr(self, key: str, n: int = 1) -> int:
        """Add n to the integer at key (missing: 0) and return the sum; KvError when the value is
        not a 64-bit integer or the sum is not (the value is then unchanged)."""
        if not INT64_MIN <= n <= INT64_MAX:
            raise KvError("overflow")
        # fetchall(): the statement runs to its end, where autocommit commits, and a failed
        # commit raises here: the sum is returned only once it is committed.
        rows = self._db.execute(_INCR, (key, n)).fetchall()
        if rows:
            return int(rows[0][0])
        # Nothing was written. Name the reason from a second read: a write between the two can
        # make it the wrong one, never make the refusal wrong.
        value = self.get(key)
        raise KvError("overflow" if value is not None and is_int64(value) else "not an integer")

    def scan(self, prefix: str, limit: int = SCAN_DEFAULT) -> list[str]:
        """The keys that start with prefix, in order, at most limit."""
        end = _successor(prefix)
        if end is None:
            rows = self._db.execute(_SCAN_TO_END, (prefix, limit))
        else:
            rows = self._db.execute(_SCAN, (prefix, end, limit))
        return [row[0] for row in rows]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_int64(text: str) -> bool:
    """True when text is a 64-bit integer in canonical decimal form, as INCR requires (the
    statement's CAST round trip, in Python)."""
    try:
        number = int(text)
    except ValueError:
        return False
    return str(number) == text and INT64_MIN <= number <= INT64_MAX


def _successor(prefix: str) -> str | None:
    """The least string above every string that starts with prefix (None: there is none)."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if code <= 0x10FFFF:
            if code == 0xD800:  # surrogates are not text and are never stored: skip them
                code = 0xE000
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None


def _integer(token: bytes) -> int | None:
    """A decimal integer: an optional sign and ASCII digits (int() alone would take '1_000')."""
    digits = token[1:] if token[:1] in (b"-", b"+") else token
    return int(token) if digits.isdigit() else None  # bytes.isdigit(): ASCII digits only


def _key(token: bytes) -> str:
    if len(token) > MAX_KEY:
        raise KvError("key too long")
    return token.decode()  # UnicodeDecodeError: ERR bad utf-8


def _optional(parts: list[bytes], usage: str) -> bytes | None:
    """The optional third field, one token (split(None, 2) leaves the rest of the line in it)."""
    if len(parts) == 2:
        return None
    rest = parts[2].split()
    if len(rest) != 1:
        raise KvError(usage)
    return rest[0]


class KvProtocol:
    """One connection's protocol state: ``feed(received) -> replies``, for any chunking.

    Holds at most MAX_LINE - 1 bytes of a line whose newline has not come yet; a line that
    cannot fit is answered ``ERR line too long`` at once and skipped up to its newline."""

    __slots__ = ("_discarding", "_partial", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self._partial = bytearray()  # the start of the current line, < MAX_LINE bytes
        self._discarding = False  # skipping the rest of a line that was too long

    def feed(self, data: bytes) -> bytes:
        """The replies to every line that ``data`` completes, concatenated (b"" for none)."""
        pos = 0
        if self._discarding:
            pos = data.find(b"\n") + 1
            if not pos:
                return b""
            self._discarding = False
        replies = []
        partial = self._partial
        if partial:
            end = data.find(b"\n", pos)
            if end < 0:
                if len(partial) + len(data) - pos >= MAX_LINE:
                    partial.clear()
                    self._discarding = True
                    return TOO_LONG
                partial += data[pos:]
                return b""
            if len(partial) + end + 1 - pos > MAX_LINE:
                replies.append(TOO_LONG)
            else:
                replies.append(self.execute(bytes(partial) + data[pos:end]))
            partial.clear()
            pos = end + 1
        execute = self.execute
        while (end := data.find(b"\n", pos)) >= 0:
            replies.append(TOO_LONG if end + 1 - pos > MAX_LINE else execute(data[pos:end]))
            pos = end + 1
        if len(data) - pos >= MAX_LINE:
            replies.append(TOO_LONG)
            self._discarding = True
        elif pos < len(data):
            partial += data[pos:]
        return b"".join(replies)

    def execute(self, line: bytes) -> bytes:
        """The reply to one line (without its newline); never raises for what a client sent.

        A SQLite error other than a busy or locked database (disk full, I/O error) is
        ``ERR storage``: nothing was committed, and the connection goes on."""
        if line[-1:] == b"\r":
            line = line[:-1]
        parts = line.split(None, 2)
        if not parts:
            return b"ERR empty line\n"
        command = _COMMANDS.get(parts[0].upper())
        if command is None:
            return b"ERR unknown command\n"
        try:
            return command(self.store, parts)
        except KvError as exc:
            return b"ERR %s\n" % str(exc).encode()
        except UnicodeDecodeError:
            return b"ERR bad utf-8\n"
        except sqlite3.OperationalError as exc:
            # Errors the sqlite3 module raises itself (a stored value that is not UTF-8) have
            # no code. The extended codes (SQLITE_BUSY_SNAPSHOT …) share the low byte.
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            return b"ERR busy\n" if code in _BUSY else b"ERR storage\n"
        except sqlite3.ProgrammingError:  # our bug (a closed Store …), not the client's
            raise
        except sqlite3.DatabaseError:  # a corrupt file
            return b"ERR storage\n"


def _get(store: Store, parts: list[bytes]) -> bytes:
    if len(parts) != 2:
        raise KvError("usage: GET key")
    value = store.get(_key(parts[1]))
    return NOT_FOUND if value is None else value.encode() + b"\n"


def _set(store: Store, parts: list[bytes]) -> bytes:
    if len(parts) != 3:
        raise KvError("usage: SET key value")
    value = parts[2]
    if value == b"NOT_FOUND" or value == b"ERR" or value.startswith(b"ERR "):
        raise KvError("reserved value")
    store.set(_key(parts[1]), value.decode())
    return OK


def _incr(store: Store, parts: list[bytes]) -> bytes:
    if len(parts) < 2:
        raise KvError("usage: INCR key [n]")
    token = _optional(parts, "usage: INCR key [n]")
    n = 1 if token is None else _integer(token)
    if n is None:
        raise KvError("n is not an integer")
    return b"%d\n" % store.incr(_key(parts[1]), n)


def _del(store: Store, parts: list[bytes]) -> bytes:
    if len(parts) != 2:
        raise KvError("usage: DEL key")
    return OK if store.delete(_key(parts[1])) else NOT_FOUND


def _scan(store: Store, parts: list[bytes]) -> bytes:
    if len(parts) < 2:
        raise KvError("usage: SCAN prefix [limit]")
    token = _optional(parts, "usage: SCAN prefix [limit]")
    limit = SCAN_DEFAULT if token is None else _integer(token)
    if limit is None or not 1 <= limit <= SCAN_MAX:
        raise KvError(f"limit must be 1..{SCAN_MAX}")
    return " ".join(store.scan(_key(parts[1]), limit)).encode() + b"\n"


_COMMANDS: dict[bytes, Callable[[Store, list[bytes]], bytes]] = {
    b"GET": _get,
    b"SET": _set,
    b"INCR": _incr,
    b"DEL": _del,
    b"SCAN": _scan,
}


FEED_CHUNK = 256  # bytes of requests fed to the protocol at a time by a KvSession
REPLY_BATCH = 64 * 1024  # a KvSession's replies are handed out in batches of about this much


class KvSession:
    """A :class:`KvProtocol` with bounded output, for a server that reads a buffer at a time.

    One read can hold thousands of pipelined commands, and a reply can be far longer than its
    request (a 12-byte ``SCAN a 1000`` answers up to ~251 KB), so the replies to a whole 64 KiB
    read are not bounded by the read. :meth:`receive` takes what was read and feeds it
    ``FEED_CHUNK`` bytes at a time, stopping once about ``REPLY_BATCH`` bytes of replies are
    made; the rest of the input waits in :attr:`unfed` until the caller has sent that batch and
    asks for :meth:`more`. A server reads again only when nothing is unfed, so what it holds per
    connection is one read plus one batch (plus at most one chunk's replies beyond it). A small
    read, the usual case, is fed whole in one call."""

    __slots__ = ("_pos", "protocol", "unfed")

    def __init__(self, store: Store) -> None:
        self.protocol = KvProtocol(store)
        self.unfed = b""  # received, not yet fed (true while a batch is being sent)
        self._pos = 0

    def receive(self, data: bytes) -> bytes:
        """The first batch of replies to ``data`` (b"" for none); call only when not unfed."""
        if len(data) <= FEED_CHUNK:
            return self.protocol.feed(data)
        self.unfed, self._pos = data, 0
        return self.more()

    def more(self) -> bytes:
        """The next batch of replies to what is unfed (b"" when it completed no line)."""
        data, pos, feed = self.unfed, self._pos, self.protocol.feed
        replies: list[bytes] = []
        size = 0
        while pos < len(data) and size < REPLY_BATCH:
            reply = feed(data[pos : pos + FEED_CHUNK])
            pos += FEED_CHUNK
            if reply:
                replies.append(reply)
                size += len(reply)
        if pos >= len(data):
            self.unfed, self._pos = b"", 0
        else:
            self._pos = pos
        return b"".join(replies)
