"""A user's own echo server, as someone outside the lab would write it (standard library only):
``python3 user_echo.py PORT [--host H] [--count FILE] [--ignore-term] [--child]``.

It counts what it echoed itself — connections accepted, bytes echoed — and on SIGTERM prints
``count {"pid": …, "connections": …, "bytes": …}`` on stdout (and writes the JSON to ``--count``),
so a test can hold the bench's figures against the server's own. ``--ignore-term`` ignores
SIGTERM (the bench must then kill it); ``--child`` leaves a child process running that ignores
SIGTERM (the bench must leave nothing behind).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading

lock = threading.Lock()
counts = {"pid": os.getpid(), "connections": 0, "bytes": 0}


def serve(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
            with lock:
                counts["bytes"] += len(data)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--count")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", code])
        counts["child"] = child.pid

    def stop(signum: int, frame: object) -> None:
        with lock:
            line = json.dumps(counts)
        if args.count:
            with open(args.count, "w") as out:
                out.write(line)
        print("count " + line, flush=True)
        os._exit(0)

    # Before listening: a SIGTERM that comes as soon as the port answers finds the handler.
    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else stop)
    listener = socket.create_server((args.host, args.port), backlog=128)
    while True:
        conn, _ = listener.accept()
        with lock:
            counts["connections"] += 1
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
