"""The idle timeout cuts a client that stopped reading, and the client learns it at once.

Once, every design's cut left the client waiting forever: close() queued the FIN behind the
unsent echo, the client's window was shut, and the server's socket sat in FIN-WAIT-1 with its
megabyte (found by ``lab soak``'s non-reader check). A cut with echo bytes unsent now closes with
a reset (lab.sockets.echo.abort_if_unsent, and the same in the event loops and the spawn
worker); a blocking send that kept moving a byte at a time no longer restarts the timeout
forever (lab.sockets.echo.write_rest)."""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
from pathlib import Path

import pytest
from harness import ServerFactory

from lab.sockets.designs import DESIGNS


@pytest.mark.parametrize("design", list(DESIGNS))
def test_a_client_that_sent_1_mib_and_never_reads_learns_it_was_cut(
    design: str, start_server: ServerFactory
) -> None:
    workers = ("--workers", "2") if DESIGNS[design].pool_of else ()
    server = start_server(design, "--idle-timeout", "1", *workers)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    with contextlib.suppress(OSError):
        sock.sendall(b"x" * (1 << 20))
    poller = select.poll()  # told without reading: a read would drain the echo (progress)
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        events = poller.poll(12_000)  # a bound against a hang (the cut comes after 1 to 3 s)
        state = subprocess.run(
            ["ss", "-tn", "state", "fin-wait-1", f"( sport = :{server.port} )"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        assert events, f"never told it was cut; the server's side (FIN-WAIT-1):\n{state}"
    finally:
        sock.close()


@pytest.mark.parametrize("design", list(DESIGNS))
def test_a_kv_client_that_sends_commands_and_never_reads_learns_it_was_cut(
    design: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """The kv service's replies back up as an echo does (a 4000-byte value read 1,600 times, asked
    in one short write the server reads whole, so no unread input turns its close into a reset
    by itself): the same bound and the same reset (lab.sockets.services)."""
    workers = ("--workers", "2") if DESIGNS[design].pool_of else ()
    db = str(tmp_path / "kv.sqlite3")
    server = start_server(design, "--service", "kv", "--db", db, "--idle-timeout", "1", *workers)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"SET big " + b"v" * 4000 + b"\n")
    assert sock.recv(16) == b"OK\n"
    sock.sendall(b"GET big\n" * 1600)
    poller = select.poll()  # told without reading, as above
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        assert poller.poll(12_000), "never told it was cut"
    finally:
        sock.close()
