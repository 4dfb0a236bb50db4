"""Deliberately broken or slow echo servers for the load generator's tests.

Run as ``python tests/loadpeers.py KIND [--size N] [--sleep S]``: listens on 127.0.0.1 port 0 and
prints a ``ready design=KIND address=127.0.0.1 port=N pid=N`` line like the lab's servers, so the
``start_server`` fixture starts (and at teardown kills) it like any other. Kinds:

* ``corrupt`` — echoes everything, with the first byte of every chunk flipped;
* ``half`` — reads one whole message (``--size`` bytes), sends half of it back, closes;
* ``once`` — echoes one message (``--size`` bytes) faithfully, then closes the connection;
* ``slow`` — one connection at a time: reads a message, sleeps ``--sleep`` s, echoes it, then
  serves that connection until the client closes, and only then accepts the next.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def corrupt(conn: socket.socket, size: int, sleep: float) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(bytes([chunk[0] ^ 0xFF]) + chunk[1:])


def half(conn: socket.socket, size: int, sleep: float) -> None:
    data = recv_exactly(conn, size)
    conn.sendall(data[: len(data) // 2])
    conn.shutdown(socket.SHUT_WR)


def once(conn: socket.socket, size: int, sleep: float) -> None:
    conn.sendall(recv_exactly(conn, size))


def slow(conn: socket.socket, size: int, sleep: float) -> None:
    while data := recv_exactly(conn, size):
        time.sleep(sleep)
        conn.sendall(data)


KINDS = {"corrupt": corrupt, "half": half, "once": once, "slow": slow}


def serve(conn: socket.socket, kind: str, size: int, sleep: float) -> None:
    with conn, contextlib.suppress(OSError):
        KINDS[kind](conn, size, sleep)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--size", type=int, default=49)
    parser.add_argument("--sleep", type=float, default=0.05)
    args = parser.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    print(f"ready design={args.kind} address=127.0.0.1 port={port} pid={os.getpid()}", flush=True)
    while True:
        conn, _ = listener.accept()
        if args.kind == "slow":  # iterative: the next connection waits in the backlog
            serve(conn, args.kind, args.size, args.sleep)
        else:
            threading.Thread(
                target=serve, args=(conn, args.kind, args.size, args.sleep), daemon=True
            ).start()


if __name__ == "__main__":
    sys.exit(main())
