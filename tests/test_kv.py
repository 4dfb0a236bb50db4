"""The kv service's core (lab/sockets/kv.py): its line protocol and its SQLite store.

No network: the protocol is sans-I/O, so each test feeds bytes to a KvProtocol over a Store on a
temporary SQLite file and reads the reply bytes. Concurrency is real where it matters (processes
on one file, a second connection holding the write lock); the interleavings that show why INCR
takes the write lock before it reads are made step by step, so no outcome depends on timing.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.sockets import kv
from lab.sockets.kv import MAX_KEY, MAX_LINE, SCAN_DEFAULT, SCAN_MAX, KvProtocol, Store


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "kv.db")


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    with Store(db) as opened:
        yield opened


@pytest.fixture
def ask(store: Store) -> Callable[..., list[bytes]]:
    """``ask(line, …)`` → the reply lines, each without its newline; one line per request."""
    protocol = KvProtocol(store)

    def ask(*lines: bytes) -> list[bytes]:
        replies = protocol.feed(b"".join(line + b"\n" for line in lines))
        assert replies.endswith(b"\n") or not lines
        return replies.split(b"\n")[:-1]

    return ask


Ask = Callable[..., list[bytes]]


# --- every command's replies ---


def test_get_of_a_missing_key_is_not_found(ask: Ask) -> None:
    assert ask(b"GET nothing") == [b"NOT_FOUND"]


def test_set_replies_ok_and_get_returns_the_rest_of_the_line(ask: Ask) -> None:
    assert ask(b"SET greeting hello, big  world ", b"GET greeting") == [
        b"OK",
        b"hello, big  world ",
    ]


def test_set_overwrites_the_value(ask: Ask) -> None:
    assert ask(b"SET k one", b"SET k two", b"GET k") == [b"OK", b"OK", b"two"]


def test_values_and_keys_may_be_any_utf8(ask: Ask) -> None:
    key, value = "клю́ч".encode(), "värde ✓ 値".encode()
    assert ask(b"SET " + key + b" " + value, b"GET " + key) == [b"OK", value]


def test_del_replies_ok_then_not_found(ask: Ask) -> None:
    assert ask(b"SET k v", b"DEL k", b"DEL k", b"GET k") == [
        b"OK",
        b"OK",
        b"NOT_FOUND",
        b"NOT_FOUND",
    ]


def test_commands_are_case_insensitive_keys_are_not(ask: Ask) -> None:
    assert ask(b"set K v", b"get k", b"Get K") == [b"OK", b"NOT_FOUND", b"v"]


def test_replies_come_in_request_order_for_a_pipelined_batch(ask: Ask) -> None:
    lines = [b"INCR n" for _ in range(50)]
    assert ask(*lines) == [str(i).encode() for i in range(1, 51)]


# --- INCR ---


def test_incr_of_a_missing_key_starts_at_zero(ask: Ask) -> None:
    assert ask(b"INCR a", b"INCR b 5", b"INCR c 0", b"GET c") == [b"1", b"5", b"0", b"0"]


def test_incr_adds_n_which_may_be_negative(ask: Ask) -> None:
    assert ask(b"INCR n 10", b"INCR n -3", b"INCR n +2", b"INCR n -20") == [
        b"10",
        b"7",
        b"9",
        b"-11",
    ]


def test_incr_works_on_a_value_set_as_an_integer(ask: Ask) -> None:
    assert ask(b"SET n 41", b"INCR n", b"GET n") == [b"OK", b"42", b"42"]


@pytest.mark.parametrize(
    "value", [b"x", b"1.5", b"012", b"+1", b"1 2", b"0x10", b"9223372036854775808"]
)
def test_incr_of_a_value_that_is_not_a_canonical_64_bit_integer_is_err_and_changes_nothing(
    ask: Ask, value: bytes
) -> None:
    assert ask(b"SET k " + value, b"INCR k", b"GET k") == [b"OK", b"ERR not an integer", value]


def test_incr_past_64_bits_is_overflow_and_changes_nothing(ask: Ask) -> None:
    top, bottom = str(kv.INT64_MAX).encode(), str(kv.INT64_MIN).encode()
    assert ask(b"SET t " + top, b"INCR t", b"INCR t -1", b"INCR b " + bottom, b"INCR b -1") == [
        b"OK",
        b"ERR overflow",
        str(kv.INT64_MAX - 1).encode(),
        bottom,
        b"ERR overflow",
    ]
    assert ask(b"INCR big 9223372036854775808", b"GET big") == [b"ERR overflow", b"NOT_FOUND"]


@pytest.mark.parametrize("n", [b"x", b"1.5", b"1_000", b"--1", b"-", "٥".encode(), b"\xff"])
def test_incr_with_an_n_that_is_not_a_decimal_integer_is_err(ask: Ask, n: bytes) -> None:
    assert ask(b"INCR k " + n, b"GET k") == [b"ERR n is not an integer", b"NOT_FOUND"]


def test_incr_holds_no_transaction_open_after_its_reply(ask: Ask, store: Store, db: str) -> None:
    """The RETURNING statement ran to its end (committed) before the reply: another connection
    can write at once."""
    assert ask(b"INCR k") == [b"1"]
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        other.execute("INSERT INTO kv VALUES ('other', '1')")
        assert other.execute("SELECT value FROM kv WHERE key = 'k'").fetchone() == ("1",)
    finally:
        other.close()


# --- SCAN ---


def test_scan_returns_matching_keys_in_key_order_space_separated(ask: Ask) -> None:
    ask(*(b"SET " + key + b" v" for key in [b"user:9", b"user:10", b"user:1", b"users", b"us"]))
    ask(b"SET user; v", b"SET user:\xf0\x9f\x99\x82 v", b"SET usez v")
    assert ask(b"SCAN user:") == ["user:1 user:10 user:9 user:🙂".encode()]
    assert ask(b"SCAN user") == ["user:1 user:10 user:9 user:🙂 user; users".encode()]


def test_scan_stops_at_the_limit(ask: Ask) -> None:
    ask(*(b"SET k%03d v" % i for i in range(20)))
    assert ask(b"SCAN k 3", b"SCAN k00 100") == [
        b"k000 k001 k002",
        b" ".join(b"k%03d" % i for i in range(10)),
    ]


def test_scan_without_a_limit_returns_at_most_the_default(ask: Ask) -> None:
    ask(*(b"SET k%04d v" % i for i in range(SCAN_DEFAULT + 5)))
    assert len(ask(b"SCAN k")[0].split()) == SCAN_DEFAULT


@pytest.mark.parametrize("limit", [b"0", b"-1", str(SCAN_MAX + 1).encode(), b"ten"])
def test_scan_with_a_limit_outside_its_range_is_err(ask: Ask, limit: bytes) -> None:
    assert ask(b"SCAN k " + limit) == [f"ERR limit must be 1..{SCAN_MAX}".encode()]


def test_scan_with_the_largest_limit_is_answered(ask: Ask) -> None:
    assert ask(b"SET k v", b"SCAN k %d" % SCAN_MAX) == [b"OK", b"k"]


def test_scan_with_no_match_is_an_empty_line(ask: Ask) -> None:
    assert ask(b"SET a v", b"SCAN b", b"GET a") == [b"OK", b"", b"v"]


@pytest.mark.parametrize(
    "prefix", ["a\U0010ffff", "\U0010ffff", "\U0010ffff\U0010ffff", "a\ud7ff", "a\uffff"]
)
def test_scan_of_a_prefix_at_the_top_of_unicode_finds_its_keys_only(
    store: Store, prefix: str
) -> None:
    """The prefix becomes a key range [prefix, successor): its successor skips the surrogates
    and carries over U+10FFFF."""
    inside = [prefix, prefix + "\U0010ffff", prefix + "x"]
    outside = ["a", "b", "a\ue000", "\U0010ffff" * 3 + "a", "a\U00010000", "a\U0010ffffb"]
    outside = [key for key in outside if not key.startswith(prefix)]
    for key in inside + outside:
        store.set(key, "v")
    assert store.scan(prefix, SCAN_MAX) == sorted(inside)


# --- malformed input: ERR, and the connection goes on ---


def test_an_unknown_command_is_err(ask: Ask) -> None:
    assert ask(b"FLUSHALL", b"GETX k", b"\xff\xfe", b"GET k") == [
        b"ERR unknown command",
        b"ERR unknown command",
        b"ERR unknown command",
        b"NOT_FOUND",
    ]


@pytest.mark.parametrize(
    ("line", "usage"),
    [
        (b"GET", b"GET key"),
        (b"GET a b", b"GET key"),
        (b"SET", b"SET key value"),
        (b"SET k", b"SET key value"),
        (b"DEL", b"DEL key"),
        (b"DEL a b", b"DEL key"),
        (b"INCR", b"INCR key [n]"),
        (b"INCR k 1 2", b"INCR key [n]"),
        (b"SCAN", b"SCAN prefix [limit]"),
        (b"SCAN p 1 2", b"SCAN prefix [limit]"),
    ],
)
def test_a_wrong_number_of_arguments_is_err_usage(ask: Ask, line: bytes, usage: bytes) -> None:
    assert ask(line, b"INCR ok") == [b"ERR usage: " + usage, b"1"]


def test_trailing_whitespace_is_not_an_argument(ask: Ask) -> None:
    assert ask(b"INCR k 2 \t", b"GET k  ", b"DEL k \x0b") == [b"2", b"2", b"OK"]


@pytest.mark.parametrize("line", [b"GET \xff", b"SET k \xc3(", b"SET \xe2\x82 v", b"SCAN \xff"])
def test_bad_utf8_in_a_key_or_value_is_err(ask: Ask, line: bytes) -> None:
    assert ask(line, b"GET k") == [b"ERR bad utf-8", b"NOT_FOUND"]


def test_an_empty_or_blank_line_is_err(ask: Ask) -> None:
    assert ask(b"", b" \t ", b"\r", b"GET k") == [
        b"ERR empty line",
        b"ERR empty line",
        b"ERR empty line",
        b"NOT_FOUND",
    ]


def test_a_key_longer_than_max_key_is_err(ask: Ask) -> None:
    longest = b"k" * MAX_KEY
    assert ask(b"SET " + longest + b" v", b"GET " + longest, b"SET " + longest + b"k v") == [
        b"OK",
        b"v",
        b"ERR key too long",
    ]


@pytest.mark.parametrize("value", [b"NOT_FOUND", b"ERR", b"ERR busy"])
def test_a_value_that_would_read_as_a_reply_is_refused(ask: Ask, value: bytes) -> None:
    assert ask(b"SET k " + value, b"GET k", b"SET k ERRATA", b"SET k NOT_FOUNDX") == [
        b"ERR reserved value",
        b"NOT_FOUND",
        b"OK",
        b"OK",
    ]


def test_a_line_of_max_line_bytes_is_answered(ask: Ask) -> None:
    prefix = b"SET k "
    value = b"v" * (MAX_LINE - len(prefix) - 1)  # + the newline: MAX_LINE bytes
    assert ask(prefix + value, b"GET k") == [b"OK", value]


def test_a_longer_line_is_err_and_the_next_line_is_answered(ask: Ask) -> None:
    too_long = b"SET k " + b"v" * (MAX_LINE - 6)  # MAX_LINE + 1 with its newline
    assert ask(too_long, b"GET k", b"SET k short", b"GET k") == [
        b"ERR line too long",
        b"NOT_FOUND",
        b"OK",
        b"short",
    ]


def test_a_huge_line_in_pieces_is_answered_once_and_discarded_to_its_newline(
    store: Store,
) -> None:
    protocol = KvProtocol(store)
    assert protocol.feed(b"SET k " + b"v" * 3000) == b""
    assert protocol.feed(b"v" * 3000) == b"ERR line too long\n"  # as soon as it cannot fit
    for _ in range(100):
        assert protocol.feed(b"v" * 10_000) == b""
        assert len(protocol._partial) < MAX_LINE
    assert protocol.feed(b"v\nGET k\n") == b"NOT_FOUND\n"
    assert protocol.feed(b"GET k\n") == b"NOT_FOUND\n"  # the skipping ended with that newline


def test_the_partial_line_buffer_stays_below_max_line(store: Store) -> None:
    protocol = KvProtocol(store)
    assert protocol.feed(b"GET " + b"k" * (MAX_LINE - 5)) == b""  # MAX_LINE - 1: could still fit
    assert len(protocol._partial) == MAX_LINE - 1
    assert protocol.feed(b"k") == b"ERR line too long\n"
    assert len(protocol._partial) == 0
    assert protocol.feed(b"\n") == b""  # the end of the long line: no second reply


@pytest.mark.parametrize("size", [MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, MAX_LINE + 2])
def test_every_split_near_the_limit_gets_the_replies_of_the_whole_stream(
    store: Store, size: int
) -> None:
    """Lines of MAX_LINE ± 1 bytes (newline included), cut once or twice anywhere near their
    start, their end or the next line: the replies are those of the stream fed whole, and the
    partial line stays below MAX_LINE. (GET of a long key: answered without a write.)"""
    long = b"GET " + b"k" * (size - 5) + b"\n"
    stream = b"GET a\n" + long + b"GET b\n"
    whole = KvProtocol(store).feed(stream)
    assert whole == b"NOT_FOUND\n%sNOT_FOUND\n" % (
        b"ERR key too long\n" if size <= MAX_LINE else b"ERR line too long\n"
    )
    edges = [6, 6 + len(long)]
    near = sorted({i for edge in edges for i in range(edge - 4, edge + 5)} | {0, len(stream)})
    for i in near:
        for j in near:
            if i > j:
                continue
            protocol = KvProtocol(store)
            got = b""
            for chunk in (stream[:i], stream[i:j], stream[j:]):
                got += protocol.feed(chunk)
                assert len(protocol._partial) < MAX_LINE
            assert got == whole, (i, j)


def test_a_line_the_connection_cuts_short_gets_no_reply(store: Store) -> None:
    protocol = KvProtocol(store)
    assert protocol.feed(b"SET k v\nSET k w") == b"OK\n"
    assert store.get("k") == "v"


def test_a_storage_error_is_err_storage_and_the_connection_goes_on(
    ask: Ask, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(key: str, value: str) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "set", disk_full)
    assert ask(b"SET k v", b"GET k") == [b"ERR storage", b"NOT_FOUND"]


def test_a_stored_value_that_is_not_utf8_is_err_storage(ask: Ask, db: str) -> None:
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("INSERT INTO kv VALUES ('k', CAST(x'ff41' AS TEXT))")
    other.close()
    assert ask(b"GET k", b"GET j") == [b"ERR storage", b"NOT_FOUND"]


# --- CRLF and chunking ---


def test_crlf_lines_get_the_same_replies_as_lf_lines(ask: Ask) -> None:
    lf = [b"SET k two words", b"GET k", b"INCR n 3", b"SCAN k", b"DEL k", b"BOGUS", b""]
    assert ask(*(line + b"\r" for line in lf)) == [
        b"OK",
        b"two words",
        b"3",
        b"k",
        b"OK",
        b"ERR unknown command",
        b"ERR empty line",
    ]


def test_crlf_is_not_part_of_the_value(ask: Ask) -> None:
    assert ask(b"SET k v\r", b"GET k", b"SET n 5\r", b"INCR n\r") == [b"OK", b"v", b"OK", b"6"]


_LINES = st.one_of(
    st.sampled_from(
        [
            b"GET a",
            b"GET b",
            b"SET a hello world",
            b"SET b 7",
            b"INCR b",
            b"INCR b -2",
            b"INCR a",
            b"INCR c x",
            b"DEL a",
            b"SCAN a",
            b"SCAN  2",
            b"SET a \xff",
            b"NOPE",
            b"",
            b"GET a\r",
            b"SET a v\r",
        ]
    ),
    st.binary(max_size=40),  # garbage, newlines included
    st.integers(MAX_LINE - 3, MAX_LINE + 3).map(lambda n: b"SET a " + b"x" * (n - 7)),
)


@settings(deadline=None, max_examples=40)
@given(
    lines=st.lists(_LINES, max_size=12),
    tail=st.binary(max_size=10),
    data=st.data(),
)
def test_any_chunking_of_a_stream_gets_the_replies_of_the_whole_stream(
    lines: list[bytes], tail: bytes, data: st.DataObject
) -> None:
    stream = b"".join(line + b"\n" for line in lines) + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    with (
        tempfile.TemporaryDirectory() as tmp,
        Store(f"{tmp}/whole.db") as whole,
        Store(f"{tmp}/chunked.db") as chunked,
    ):
        expected = KvProtocol(whole).feed(stream)
        protocol = KvProtocol(chunked)
        got = b"".join(protocol.feed(chunk) for chunk in chunks)
        assert len(protocol._partial) < MAX_LINE
        assert whole.scan("", SCAN_MAX) == chunked.scan("", SCAN_MAX)
    assert got == expected
    assert expected.count(b"\n") <= stream.count(b"\n")  # never more than one reply a line


# --- the store: WAL, persistence, busy ---


def test_the_file_is_in_wal_mode(store: Store, db: str) -> None:
    other = sqlite3.connect(db)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()


def test_a_store_without_wal_is_refused() -> None:
    with pytest.raises(kv.KvError, match="WAL"):
        Store(":memory:")


def test_a_sqlite_without_returning_is_refused(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(kv.KvError, match="too old"):
        Store(db)


def test_writes_persist_across_a_reopen(db: str) -> None:
    with Store(db) as first:
        protocol = KvProtocol(first)
        assert protocol.feed(b"SET a one\nINCR n 5\nSET gone x\nDEL gone\n") == b"OK\n5\nOK\nOK\n"
    with Store(db) as second:
        assert KvProtocol(second).feed(b"GET a\nINCR n\nGET gone\nSCAN \x01 1\n") == (
            b"one\n6\nNOT_FOUND\n\n"
        )
        assert second.scan("", SCAN_MAX) == ["a", "n"]


@pytest.fixture
def write_lock(db: str, store: Store) -> Iterator[sqlite3.Connection]:
    """Another connection that holds the database's write lock (BEGIN IMMEDIATE, uncommitted)."""
    store.set("k", "before")
    store.set("n", "1")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder
    finally:
        holder.close()


def test_a_write_past_the_busy_timeout_is_err_busy_and_changes_nothing(
    db: str, write_lock: sqlite3.Connection
) -> None:
    with Store(db, busy_timeout=0.05) as impatient:
        protocol = KvProtocol(impatient)
        assert protocol.feed(b"SET k after\nINCR n\nINCR new\nDEL k\n") == b"ERR busy\n" * 4
        write_lock.rollback()
        assert protocol.feed(b"GET k\nGET n\nGET new\n") == b"before\n1\nNOT_FOUND\n"
        assert protocol.feed(b"INCR n\n") == b"2\n"  # the lock is gone: writes go on


def test_reads_go_on_while_another_connection_writes(
    db: str, write_lock: sqlite3.Connection
) -> None:
    write_lock.execute("UPDATE kv SET value = 'uncommitted' WHERE key = 'k'")
    with Store(db, busy_timeout=0.05) as reader:
        assert KvProtocol(reader).feed(b"GET k\nSCAN k\n") == b"before\nk\n"


def test_incr_waits_for_the_write_lock_and_adds_to_the_committed_value(
    db: str, write_lock: sqlite3.Connection
) -> None:
    """The single-statement INCR takes its turn: it waits (up to the 5 s busy timeout) instead of
    failing, and adds to what the lock holder committed."""
    write_lock.execute("UPDATE kv SET value = '10' WHERE key = 'n'")
    replies: list[bytes] = []

    def incr() -> None:  # a thread opens its own Store
        with Store(db) as own:
            replies.append(KvProtocol(own).feed(b"INCR n\n"))

    thread = threading.Thread(target=incr)
    thread.start()
    time.sleep(0.1)  # not a measurement: whether INCR started waiting or not, the reply is 11
    write_lock.commit()
    thread.join(timeout=30)
    assert replies == [b"11\n"]


# --- concurrent writers on one key ---

WRITERS, INCRS = 4, 100


def _incr_many(db: str, start: Any, results: Any) -> None:
    """A writer process: its own Store on the shared file, INCRS × ``INCR hits``; puts the count
    of acknowledged (integer) replies and the other replies."""
    with Store(db) as own:
        protocol = KvProtocol(own)
        start.wait()
        acked, other = 0, []
        for _ in range(INCRS):
            reply = protocol.feed(b"INCR hits\n")
            if reply[:-1].lstrip(b"-").isdigit():
                acked += 1
            else:
                other.append(reply)
    results.put((acked, other))


def test_concurrent_incrs_on_one_key_lose_no_acknowledged_update(db: str) -> None:
    Store(db).close()  # the file, its WAL mode and table exist before the writers race
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(WRITERS), context.Queue()
    writers = [
        context.Process(target=_incr_many, args=(db, start, results)) for _ in range(WRITERS)
    ]
    for writer in writers:
        writer.start()
    outcomes = [results.get(timeout=60) for _ in writers]
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0
    acked = sum(count for count, _ in outcomes)
    assert all(reply == b"ERR busy\n" for _, other in outcomes for reply in other)
    assert acked > 0
    with Store(db) as check:
        assert check.get("hits") == str(acked)


# The broken way, written out: INCR as a read, then a write of the read value + n.


def _read(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return 0 if row is None else int(row[0])


def _write(db: sqlite3.Connection, key: str, value: int) -> None:
    db.execute(
        "INSERT INTO kv VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def test_a_read_then_write_incr_without_a_transaction_loses_an_update(
    db: str, store: Store
) -> None:
    """The check of the concurrent test can fail: a writer that commits between the broken INCR's
    read and its write is overwritten; two INCRs acknowledged, the key says 1."""
    broken = sqlite3.connect(db, isolation_level=None)
    try:
        read = _read(broken, "hits")
        acknowledged = [store.incr("hits")]  # another client's INCR lands in between
        _write(broken, "hits", read + 1)
        acknowledged.append(read + 1)
        assert acknowledged == [1, 1]
        assert store.get("hits") == "1"  # != 2 acknowledged INCRs: a lost update
    finally:
        broken.close()


def test_a_read_then_write_incr_in_a_deferred_transaction_is_busy_without_waiting(
    db: str, store: Store
) -> None:
    """In WAL mode a deferred transaction that read cannot become a writer once another
    connection committed since its read (SQLITE_BUSY_SNAPSHOT) or while another holds the write
    lock: SQLite fails it at once, the busy timeout notwithstanding (an hour here: had it waited,
    the test would time out). That is why INCR is a single write statement: it takes the write
    lock before it reads."""
    broken = sqlite3.connect(db, isolation_level=None, timeout=3600)
    try:
        broken.execute("BEGIN")
        read = _read(broken, "hits")
        assert store.incr("hits") == 1  # commits after the broken read
        with pytest.raises(sqlite3.OperationalError) as snapshot:
            _write(broken, "hits", read + 1)
        assert snapshot.value.sqlite_errorname == "SQLITE_BUSY_SNAPSHOT"
        broken.rollback()

        holder = sqlite3.connect(db, isolation_level=None)
        broken.execute("BEGIN")
        read = _read(broken, "hits")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as locked:
            _write(broken, "hits", read + 1)
        assert locked.value.sqlite_errorname == "SQLITE_BUSY"
        broken.rollback()
        holder.rollback()
        holder.close()
        assert store.get("hits") == "1"  # nothing lost: the broken writes failed, visibly
        assert KvProtocol(store).feed(b"INCR hits\n") == b"2\n"
    finally:
        broken.close()
