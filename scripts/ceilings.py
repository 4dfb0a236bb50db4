#!/usr/bin/env python3
"""The lab's designs against C (and stdlib) servers of the same family, side by side.

Runs each server under the same closed-loop load on loopback (`lab bench --local`: 2 workers —
the iterative design against the C prefork with one —
49-byte messages, concurrency 8), connect-per-request and persistent (100 messages per
connection), for ROUNDS interleaved rounds (A B C … A B C …, so a machine that drifts affects
every server alike), and prints the median server CPU per connection and per message with the
ratio to the reference of its family:

    .venv/bin/python scripts/ceilings.py [--rounds 3] [--duration 3]

A ratio of two figures measured in the same run, not an absolute time: quote the ratios.
"""

from __future__ import annotations

import argparse
import statistics

from lab.measure.bench import LocalBackend, ServerSpec, bench
from lab.measure.config import make_config

TWO = ("--workers", "2")
# (row, server, options, reference row)
ROWS = [
    ("peer-c-prefork", "peer-c-prefork", TWO, None),
    ("multi-accept", "multi-accept", TWO, "peer-c-prefork"),
    ("sendmsg", "sendmsg", (*TWO, "--max-workers", "2"), "peer-c-prefork"),
    # The sendmsg design in C: how much of sendmsg's ratio is the hand-off itself.
    ("peer-c-sendmsg", "peer-c-sendmsg", TWO, "peer-c-prefork"),
    ("peer-c-prefork-1", "peer-c-prefork", ("--workers", "1"), None),
    ("iterative", "iterative", (), "peer-c-prefork-1"),
    ("peer-c-fork", "peer-c-fork", (), None),
    ("peer-forking", "peer-forking", (), None),
    ("fork", "fork", (), "peer-forking"),
    # The rest of the family (issue 8), each against its family's C peer.
    ("thread", "thread", (), "peer-c-prefork"),
    ("prethread-accept", "prethread-accept", TWO, "peer-c-prefork"),
    ("thread-pool", "thread-pool", TWO, "peer-c-prefork"),
    ("peer-c-epoll", "peer-c-epoll", TWO, None),
    ("select", "select", (), "peer-c-epoll"),
    ("asyncio", "asyncio", (), "peer-c-epoll"),
    ("peer-asyncio", "peer-asyncio", (), "peer-c-epoll"),
    ("reuseport", "reuseport", TWO, "peer-c-epoll"),
    ("prefork-epoll", "prefork-epoll", TWO, "peer-c-epoll"),
]


def measure(server: str, options: tuple[str, ...], workload: str, duration: float) -> float:
    config = make_config(
        "127.0.0.1",
        port=1,
        workload=workload,
        per_connection=100 if workload == "persistent" else None,
        size=49,
        concurrency=8,
        duration=duration,
        warmup=0.5,
    )
    result = bench(LocalBackend(), ServerSpec(server, options), config)
    assert result.load["errors_total"] == 0, result.load["errors"]
    per_message = result.cost.cpu_s_per_1000
    assert per_message is not None, (
        server,
        workload,
        result.load["requests"],
        result.load["errors"],
    )
    return per_message * 1000  # µs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows to run (their references are added): e.g. iterative,sendmsg",
    )
    args = parser.parse_args()
    rows = ROWS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {row for row, *_ in ROWS}
        if unknown:
            parser.error(f"unknown row(s): {', '.join(sorted(unknown))}")
        wanted |= {ref for row, _s, _o, ref in ROWS if row in wanted and ref}
        rows = [entry for entry in ROWS if entry[0] in wanted]
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for row, server, options, _ref in rows:
            for workload in ("connect-per-request", "persistent"):
                if workload == "persistent" and server in ("fork", "peer-forking", "peer-c-fork"):
                    continue  # one process per connection: per message is the echo loop's
                us = measure(server, options, workload, args.duration)
                figures.setdefault((row, workload), []).append(us)
    med = {key: statistics.median(values) for key, values in figures.items()}
    print(f"{'server':<16} {'µs/connection':>14} {'×ref':>6} {'µs/message':>11} {'×ref':>6}  ref")
    for row, _server, _options, ref in rows:
        conn = med[(row, "connect-per-request")]
        msg = med.get((row, "persistent"))
        r_conn = f"{conn / med[(ref, 'connect-per-request')]:.2f}" if ref else "1.00"
        r_msg = "-"
        if msg is not None and ref and (ref, "persistent") in med:
            r_msg = f"{msg / med[(ref, 'persistent')]:.2f}"
        elif msg is not None:
            r_msg = "1.00"
        shown = f"{msg:.1f}" if msg is not None else "-"
        print(f"{row:<16} {conn:>14.1f} {r_conn:>6} {shown:>11} {r_msg:>6}  {ref or ''}")
    print(f"(medians of {args.rounds} interleaved rounds, {args.duration:g} s each, c=8, 49 B)")


if __name__ == "__main__":
    main()
