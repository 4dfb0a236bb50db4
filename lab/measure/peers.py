"""Peers: servers from outside the lab, measured beside its designs in the same run.

* ``threading`` — the standard library's ``socketserver.ThreadingTCPServer``: a thread per
  connection (Stevens' claim 7, "threads are cheaper than processes", is answered with it);
* ``forking`` — ``socketserver.ForkingTCPServer``: a fork per connection, the library's way;
* ``socat`` — ``socat TCP-LISTEN:…,fork EXEC:cat``: a fork *and an exec of cat* per connection,
  the classic inetd-style cost in C;
* ``asyncio`` — the plain asyncio echo server of MagicStack's vmbench: one event loop, an
  ``asyncio.Protocol`` whose ``data_received`` writes the data back to its transport — the
  idiomatic asyncio server (of the epoll family), that an asyncio design is judged against;
* ``c-prefork``, ``c-fork``, ``c-epoll`` — the C ceilings, one static program
  (``lab/measure/cpeer/peer.c``, built by ``make cpeer``): pre-forked workers blocking in
  ``accept()``, a ``fork()`` per connection, and epoll loops on the shared listener. Each design
  is measured against the one of its family (``peer-c-<family>``);
* ``c-sendmsg`` — the same program passing descriptors: the floor of the ``sendmsg`` design in C
  (how much of sendmsg's ×C against ``c-prefork`` is the design's own hand-off, not Python's).

``python -m lab.measure.peers NAME [--host H] [--port P] [--backlog B] [--workers N]`` runs one
and prints the same ``ready design=peer-NAME … port=N pid=N`` line as the lab's servers; SIGTERM
stops it and prints a statistics line (a peer counts less than a design: what it cannot see is
left out). ``--workers`` sizes the pools of ``c-prefork``, ``c-epoll`` and ``c-sendmsg``; the
others ignore it.
A C peer is exec'd in this process's place, so the process measured is the C program itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

BUFFER_SIZE = 64 * 1024


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        while data := conn.recv(BUFFER_SIZE):
            conn.sendall(data)


def _stats(name: str, accepted: int | None) -> str:
    record: dict[str, object] = {"event": "stats", "design": f"peer-{name}", "pid": os.getpid()}
    if accepted is not None:
        record["accepted"] = accepted
    return json.dumps(record, separators=(", ", ": "))


def _ready(name: str, host: str, port: int, backlog: int) -> None:
    print(
        f"ready design=peer-{name} address={host} port={port} pid={os.getpid()} backlog={backlog}",
        flush=True,
    )


def run_socketserver(name: str, host: str, port: int, backlog: int) -> int:
    base: type[socketserver.TCPServer] = (
        socketserver.ThreadingTCPServer if name == "threading" else socketserver.ForkingTCPServer
    )

    class Server(base):  # type: ignore[valid-type,misc]
        allow_reuse_address = True
        request_queue_size = backlog  # the listen backlog, as the designs' --backlog
        daemon_threads = True
        block_on_close = False
        accepted = 0

        def process_request(self, request: object, client_address: object) -> None:
            Server.accepted += 1
            super().process_request(request, client_address)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    Server.address_family = family
    with Server((host, port), EchoHandler) as server:
        _ready(name, host, server.server_address[1], backlog)

        def stop(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(0)  # unwinds serve_forever() in the main thread

        def usr1(signum: int, frame: FrameType | None) -> None:
            print(_stats(name, Server.accepted), flush=True)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, usr1)
        with contextlib.suppress(SystemExit):
            server.serve_forever(poll_interval=0.5)
        print(_stats(name, Server.accepted), flush=True)
    return 0


class EchoProtocol(asyncio.Protocol):
    """vmbench's ``EchoProtocol`` (MagicStack/vmbench, ``servers/asyncioecho.py --proto``): no
    buffering of its own, every chunk written back as it arrives; at the client's EOF the
    transport closes once what is written has gone out. Only the count of connections is ours."""

    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        EchoProtocol.accepted += 1
        self.transport: asyncio.Transport | None = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):  # as vmbench: small echoes go at once
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def run_asyncio(host: str, port: int, backlog: int) -> int:
    """One event loop (the default one: epoll on Linux), serving until SIGTERM or SIGINT."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            EchoProtocol, host, port, backlog=backlog, reuse_address=True
        )
        _ready("asyncio", host, server.sockets[0].getsockname()[1], backlog)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        loop.add_signal_handler(signal.SIGINT, stopped.set)
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: print(_stats("asyncio", EchoProtocol.accepted), flush=True)
        )
        async with server:
            await stopped.wait()

    asyncio.run(serve())
    print(_stats("asyncio", EchoProtocol.accepted), flush=True)
    return 0


def _listening(port: int) -> bool:
    """Whether some socket listens on ``port`` (from /proc: connecting would start a cat)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def run_socat(host: str, port: int, backlog: int) -> int:
    program = shutil.which("socat")
    if program is None:
        print(
            "lab peers: error: socat is not installed (Debian: apt-get install socat)",
            file=sys.stderr,
        )
        return 2
    if port == 0:
        with socket.socket() as probe:  # socat cannot report the port it was given: pick one
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    family = "TCP6" if ":" in host else "TCP4"
    child = subprocess.Popen(
        [
            program,
            f"{family}-LISTEN:{port},bind={host},reuseaddr,fork,backlog={backlog}",
            "EXEC:cat",
        ]
    )
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    signal.signal(signal.SIGINT, lambda *_: child.terminate())
    signal.signal(signal.SIGUSR1, lambda *_: print(_stats("socat", None), flush=True))
    deadline = time.monotonic() + 10
    while not _listening(port):
        if child.poll() is not None or time.monotonic() > deadline:
            print(f"lab peers: error: socat did not listen on {host}:{port}", file=sys.stderr)
            child.kill()
            return 3
        time.sleep(0.02)
    _ready("socat", host, port, backlog)
    child.wait()
    print(_stats("socat", None), flush=True)
    return 0


# The C peers: the name here → lab-cpeer's mode, and whether it has a pool of --workers.
C_PEERS = {
    "c-prefork": ("prefork", True),
    "c-fork": ("fork", False),
    "c-epoll": ("epoll", True),
    "c-sendmsg": ("sendmsg", True),
}
CPEER_ENV = "LAB_CPEER"
CPEER_INSTALLED = Path("/usr/local/bin/lab-cpeer")  # where the lab image has it
# In a checkout: <repo>/build/bin/lab-cpeer (this file is <repo>/lab/measure/peers.py).
CPEER_BUILT = Path(__file__).resolve().parents[2] / "build" / "bin" / "lab-cpeer"


def cpeer_binary() -> Path | None:
    """lab-cpeer: $LAB_CPEER if set, else the installed one, else the checkout's build."""
    named = os.environ.get(CPEER_ENV)
    candidates = [Path(named)] if named else [CPEER_INSTALLED, CPEER_BUILT]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def run_cpeer(name: str, host: str, port: int, backlog: int, workers: int | None) -> int:
    """Exec lab-cpeer in this process's place (it prints the ready line); returns only on
    failure."""
    binary = cpeer_binary()
    if binary is None:
        named = os.environ.get(CPEER_ENV)
        where = f" ({CPEER_ENV}={named} is not an executable)" if named else ""
        message = f"lab peers: error: the C peers are not built{where}: run make cpeer"
        print(message, file=sys.stderr)
        return 2
    mode, pooled = C_PEERS[name]
    argv = [str(binary), mode, "--host", host, "--port", str(port), "--backlog", str(backlog)]
    if pooled and workers is not None:
        argv += ["--workers", str(workers)]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(binary, argv)
    except OSError as exc:
        print(
            f"lab peers: error: cannot run {binary} ({exc.strerror}): rebuild it with make cpeer",
            file=sys.stderr,
        )
    return 2


PEERS = {
    "threading": "socketserver.ThreadingTCPServer: a thread per connection",
    "forking": "socketserver.ForkingTCPServer: fork() per connection",
    "socat": "socat TCP-LISTEN,fork EXEC:cat: fork() and exec(cat) per connection",
    "asyncio": "asyncio.Protocol echo (vmbench's): one event loop, data_received → write",
    "c-prefork": "C: --workers processes, forked after listen(), each blocking in accept()",
    "c-fork": "C: fork() a child per connection (at most 256 at once); the parent reaps them",
    "c-epoll": "C: --workers epoll loops on the shared listener (EPOLLEXCLUSIVE)",
    "c-sendmsg": "C: the parent accepts and passes each descriptor to --workers recvmsg() workers",
}


# The ×C family of each peer that is not a C ceiling itself: the C peer whose design it shares,
# so the report reads the stdlib's servers (and the sendmsg hand-off in C) against the same
# floor as the lab's designs of that shape. The C ceilings have none: they are the floor.
PEER_FAMILIES = {
    "threading": "prefork",  # as the lab's thread designs
    "forking": "fork",
    "socat": "fork",
    "asyncio": "epoll",
    "c-sendmsg": "prefork",  # as the lab's sendmsg: what the hand-off costs, in C
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.measure.peers")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--host", default=os.environ.get("LAB_HOST") or "0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LAB_PORT") or 12345))
    parser.add_argument("--backlog", type=int, default=int(os.environ.get("LAB_BACKLOG") or 128))
    # The pool size of c-prefork and c-epoll (lab-cpeer's default: 2); the others ignore it.
    workers = os.environ.get("LAB_WORKERS")
    parser.add_argument("--workers", type=int, default=int(workers) if workers else None)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.peer in C_PEERS:
        return run_cpeer(args.peer, args.host, args.port, args.backlog, args.workers)
    if args.peer == "socat":
        return run_socat(args.host, args.port, args.backlog)
    if args.peer == "asyncio":
        return run_asyncio(args.host, args.port, args.backlog)
    return run_socketserver(args.peer, args.host, args.port, args.backlog)


if __name__ == "__main__":
    sys.exit(main())
