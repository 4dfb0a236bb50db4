#!/usr/bin/env python3
"""The load generator's own CPU per request against a minimal blocking client, side by side.

The minimal client is what anyone would write: one process per connection slot, a blocking
socket, ``sendall`` and ``recv`` until the echo is back, the echo compared byte for byte, the
latency recorded (``perf_counter`` into a list), connect-per-request. The lab's loader
(``lab load``: non-blocking sockets in one ``selectors`` loop per loader process, every echo
verified, an HdrHistogram) must cost no more CPU per request at the same load. Both run against
the same fast server (the C epoll peer, 2 workers) for the same time; CPU is each side's own
(``getrusage`` of its processes), so the server's share is not in it:

    .venv/bin/python scripts/loader_cost.py [--duration 3]

Prints CPU µs per request for each, and lab/minimal, at concurrency 4 and 64, 49 B and 1 KiB.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time

from lab.measure.config import make_config
from lab.measure.load import run_load


def start_server() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab.measure.peers",
            "c-epoll",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    match = re.search(r"port=(\d+)", proc.stdout.readline())
    assert match, "the C peer did not start (make cpeer)"
    return proc, int(match.group(1))


def minimal_slot(port: int, size: int, until: float, out: multiprocessing.Queue) -> None:
    message = os.urandom(size)
    latencies: list[float] = []
    while time.monotonic() < until:
        began = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(message)
            got = b""
            while len(got) < size:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert got == message
        latencies.append(time.perf_counter() - began)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((len(latencies), usage.ru_utime + usage.ru_stime))


def minimal(port: int, concurrency: int, size: int, duration: float) -> float:
    out: multiprocessing.Queue = multiprocessing.Queue()
    until = time.monotonic() + duration
    procs = [
        multiprocessing.Process(target=minimal_slot, args=(port, size, until, out))
        for _ in range(concurrency)
    ]
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    requests = sum(r[0] for r in results)
    return sum(r[1] for r in results) / requests * 1e6


def lab(port: int, concurrency: int, size: int, duration: float) -> float:
    config = make_config(
        "127.0.0.1", port=port, concurrency=concurrency, size=size, duration=duration, warmup=0
    )
    result = run_load(config)
    assert sum(result.errors.values()) == 0, result.errors
    return result.loader_cpu_s / (result.requests or 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    args = parser.parse_args()
    server, port = start_server()
    loads = [(c, size) for c in (4, 64) for size in (49, 1024)]
    ours: dict[tuple[int, int], list[float]] = {load: [] for load in loads}
    theirs: dict[tuple[int, int], list[float]] = {load: [] for load in loads}
    try:
        for _ in range(args.rounds):
            for load in loads:
                ours[load].append(lab(port, *load, args.duration))
                theirs[load].append(minimal(port, *load, args.duration))
        print(f"{'load':<14} {'lab µs/req':>11} {'minimal µs/req':>15} {'lab/minimal':>12}")
        for concurrency, size in loads:
            a = statistics.median(ours[(concurrency, size)])
            b = statistics.median(theirs[(concurrency, size)])
            ratio = statistics.median(
                x / y
                for x, y in zip(ours[(concurrency, size)], theirs[(concurrency, size)], strict=True)
            )
            print(f"c={concurrency:<3} {size:>5} B {a:>11.1f} {b:>15.1f} {ratio:>12.2f}")
        print(f"(medians of {args.rounds} interleaved rounds of {args.duration:g} s)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
