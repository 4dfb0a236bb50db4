"""``--service kv`` end to end, on every server design: real processes on loopback only.

Each design is started with ``--service kv --db FILE`` (a fresh file per test) and talked to
over TCP: the protocol's replies, errors that leave the connection open, data that outlives a
restart on the same file, no lost update when several connections INCR one key at once, and
bounded memory when a client pipelines without reading. Plus the options' errors (one line,
exit 2) and the echo still being the default. The protocol itself is tests/test_kv.py's.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import threading
from pathlib import Path

import pytest
from harness import (
    ALL_DESIGNS,
    POOL_DESIGNS,
    RunningServer,
    ServerFactory,
    echo_once,
    processes_in_group,
    wait_until,
)
from test_server_errors import RUNNERS, assert_one_error_line, run

from lab.sockets import kv
from lab.sockets.designs import DESIGNS

GUARD = 30.0  # a bound against hangs, never a timing assertion
CLIENTS, INCRS = 4, 50  # the lost-update test: 200 INCRs over 4 connections at once


def kv_args(design: str, db: Path) -> tuple[str, ...]:
    args: tuple[str, ...] = ("--service", "kv", "--db", str(db))
    if design in POOL_DESIGNS:
        args += ("--workers", "2")
    if DESIGNS[design].grows:
        args += ("--worker-idle", "120")
    return args


class Client:
    """One kv connection: ``ask(line)`` → the reply line (without its newline)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
        self.file = self.sock.makefile("rb")

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\n")
        reply = self.file.readline()
        assert reply.endswith(b"\n"), f"no reply line to {line[:60]!r}: got {reply!r}"
        return reply[:-1]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def stored(db: Path, key: str) -> str | None:
    """The value in the file itself, read with sqlite3 (not through the server)."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    conn.close()
    return None if row is None else str(row[0])


# --- every design -------------------------------------------------------------------------------


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_commands_errors_and_a_restart(
    design: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "kv.sqlite3"
    server = start_server(design, *kv_args(design, db))
    client = Client(server.port)
    try:
        assert client.ask(b"SET greeting hello kv world") == b"OK"
        assert client.ask(b"GET greeting") == b"hello kv world"
        assert client.ask(b"INCR n") == b"1"
        assert client.ask(b"INCR n 41") == b"42"
        assert client.ask(b"SET gone x") == b"OK"
        assert client.ask(b"DEL gone") == b"OK"
        assert client.ask(b"DEL gone") == b"NOT_FOUND"
        assert client.ask(b"GET gone") == b"NOT_FOUND"
        assert client.ask(b"SCAN g") == b"greeting"
        assert client.ask(b"SCAN zzz") == b""
        # Bad input: one ERR line each, and the connection goes on.
        assert client.ask(b"BOGUS") == b"ERR unknown command"
        assert client.ask(b"x" * (kv.MAX_LINE + 100)) == b"ERR line too long"
        assert client.ask(b"INCR greeting") == b"ERR not an integer"
        # Pipelined: one reply per line, in order.
        client.sock.sendall(b"INCR p\nINCR p\nGET p\n")
        assert [client.file.readline() for _ in range(3)] == [b"1\n", b"2\n", b"2\n"]
        assert client.ask(b"GET n") == b"42"
    finally:
        client.close()
    assert server.stop() == 0
    assert stored(db, "n") == "42"
    again = start_server(design, *kv_args(design, db))  # the same file: the data is there
    client = Client(again.port)
    try:
        assert client.ask(b"GET greeting") == b"hello kv world"
        assert client.ask(b"INCR n") == b"43"
    finally:
        client.close()


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_concurrent_incrs_lose_no_update(
    design: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "kv.sqlite3"
    server = start_server(design, *kv_args(design, db))
    acknowledged = [0] * CLIENTS
    errors: list[str] = []
    go = threading.Barrier(CLIENTS)

    def incr(index: int) -> None:
        try:
            client = Client(server.port)
            try:
                go.wait(GUARD)
                for _ in range(INCRS):
                    reply = client.ask(b"INCR hits")
                    if re.fullmatch(rb"\d+", reply):
                        acknowledged[index] += 1
                    elif reply != b"ERR busy":  # refused, not done: allowed, not counted
                        errors.append(f"client {index}: {reply!r}")
            finally:
                client.close()
        except Exception as exc:  # reported below, in the test's thread
            errors.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=incr, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GUARD * 2)
    assert not errors, errors
    total = sum(acknowledged)
    assert total > 0
    reader = Client(server.port)
    try:
        assert reader.ask(b"GET hits") == str(total).encode()
    finally:
        reader.close()
    assert stored(db, "hits") == str(total)


def test_a_thread_per_connection_closes_its_store_as_the_connection_ends(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """The thread design opens a Store per connection; left to the thread's end, a sqlite3
    connection waits for the cycle collector, holding its descriptors meanwhile."""
    db = tmp_path / "kv.sqlite3"
    server = start_server("thread", *kv_args("thread", db))
    for _ in range(40):
        client = Client(server.port)
        assert re.fullmatch(rb"\d+", client.ask(b"INCR x"))
        client.close()
    reader = Client(server.port)
    assert reader.ask(b"GET x") == b"40"
    reader.close()

    def open_on_db() -> int:
        """The server's descriptors on the database's files (the db, -wal, -shm)."""
        count = 0
        for fd in Path(f"/proc/{server.pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                count += str(db) in os.readlink(fd)
        return count

    assert wait_until(lambda: open_on_db() == 0), f"{open_on_db()} descriptors on {db}"


# --- bounded memory: a client that pipelines without reading ------------------------------------

KEYS, KEY_SIZE = 1000, 200  # SCAN k 1000 (13 bytes) then answers ~201 KB


def rss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def peak_rss(server: RunningServer) -> int:
    return max((rss(pid) for pid in processes_in_group(server.pid)), default=0)


@pytest.mark.parametrize("design", ["select", "asyncio", "prefork-epoll", "thread-pool"])
def test_a_client_that_does_not_read_is_held_to_bounded_memory(
    design: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "kv.sqlite3"
    kv.Store(str(db)).close()
    with sqlite3.connect(db) as conn:  # 1000 long keys, in one transaction
        conn.executemany(
            "INSERT INTO kv(key, value) VALUES (?, 'v')",
            ((f"k{i:04d}".ljust(KEY_SIZE, "x"),) for i in range(KEYS)),
        )
    conn.close()
    server = start_server(design, *kv_args(design, db))
    before = peak_rss(server)
    flood = socket.create_connection(("127.0.0.1", server.port), timeout=3.0)
    chunk = b"SCAN k 1000\n" * 5000  # 60 KB of requests: ~1 GB of replies
    sent = 0
    try:
        for _ in range(200):  # 12 MB of requests, ~200 GB of replies if nothing held it back
            flood.sendall(chunk)
            sent += len(chunk)
    except TimeoutError:
        pass  # TCP's flow control stopped us: the server stopped reading this client
    assert sent < 200 * len(chunk), "the server kept reading a client that never reads"
    grown = peak_rss(server) - before
    assert grown < 64 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"
    other = Client(server.port)  # and it still serves everyone else
    try:
        assert other.ask(b"SET still serving") == b"OK"
        assert other.ask(b"GET still") == b"serving"
    finally:
        other.close()
        flood.close()


def test_a_session_hands_replies_out_in_bounded_batches(tmp_path: Path) -> None:
    with kv.Store(str(tmp_path / "kv.sqlite3")) as store:
        for i in range(50):
            store.set(f"k{i:02d}".ljust(KEY_SIZE, "x"), "v")
        data = b"SCAN k 50\n" * 6000  # 60 KB
        expected = kv.KvProtocol(store).feed(data)
        session = kv.KvSession(store)
        batches = [session.receive(data)]
        while session.unfed:
            batches.append(session.more())
        per_chunk = (kv.FEED_CHUNK // len(b"SCAN k 50\n") + 1) * (50 * (KEY_SIZE + 1))
        assert b"".join(batches) == expected
        assert len(batches) > 1
        assert max(len(batch) for batch in batches) <= kv.REPLY_BATCH + per_chunk


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (["--service", "bogus"], {}, ["--service 'bogus'", "echo or kv"]),
        ([], {"LAB_SERVICE": "bogus"}, ["--service 'bogus'", "echo or kv"]),
        (["--db", "/tmp/x.sqlite3"], {}, ["--db", "--service kv"]),
        ([], {"LAB_DB": "/tmp/x.sqlite3"}, ["--db", "--service kv"]),
        (
            ["--design", "spawn", "--worker-cmd", "cat", "--service", "kv"],
            {},
            ["--service kv", "--worker-cmd"],
        ),
        (
            ["--service", "kv", "--db", "/nonexistent-lab-dir/kv.sqlite3"],
            {},
            ["--db /nonexistent-lab-dir/kv.sqlite3", "writable path"],
        ),
    ],
    ids=[
        "service-bogus",
        "env-service-bogus",
        "db-without-kv",
        "env-db-without-kv",
        "kv-with-worker-cmd",
        "db-unusable",
    ],
)
def test_bad_service_options_are_one_line_exit_2(
    runner: str, args: list[str], env: dict[str, str], fragments: list[str]
) -> None:
    result = run(runner, "--host", "127.0.0.1", "--port", "0", *args, env=env)
    assert_one_error_line(result, 2, *fragments)


def test_echo_is_still_the_default(start_server: ServerFactory) -> None:
    server = start_server("fork")
    assert echo_once(server.port, b"GET x\n") == b"GET x\n"
