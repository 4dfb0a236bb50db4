"""A user's own kv server, deliberately broken, as the no-lost-update check must catch it:
``python3 user_kv.py PORT [--host H] (--lose N | --answer-ok)`` (standard library only).

``--lose N`` answers every INCR as if it had counted it (so each reply looks right to the
client that sent it), but stores only N - 1 of every N; GET answers what is stored, any other
command ``OK``. ``--answer-ok`` answers ``OK`` to every line.
"""

from __future__ import annotations

import argparse
import socket
import threading

lock = threading.Lock()
answered: dict[bytes, int] = {}
stored: dict[bytes, int] = {}


def reply(line: bytes, lose: int) -> bytes:
    parts = line.split()
    if len(parts) == 2 and parts[0] == b"INCR":
        with lock:
            n = answered[parts[1]] = answered.get(parts[1], 0) + 1
            if n % lose:
                stored[parts[1]] = stored.get(parts[1], 0) + 1
        return b"%d\n" % n
    if len(parts) == 2 and parts[0] == b"GET":
        with lock:
            value = stored.get(parts[1])
        return b"NOT_FOUND\n" if value is None else b"%d\n" % value
    return b"OK\n"


def serve(conn: socket.socket, lose: int | None) -> None:
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"OK\n" if lose is None else reply(line.rstrip(b"\r\n"), lose))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lose", type=int)
    mode.add_argument("--answer-ok", action="store_true")
    args = parser.parse_args()
    listener = socket.create_server((args.host, args.port), backlog=128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, args.lose), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
