"""No lost update: the loaders' acknowledged INCRs, per counter, against what the database holds.

At the end of a kv run (:mod:`lab.measure.kvload`) every loader has counted, per counter of the
run (``load:c:<tag>:<i>``), the INCRs the server acknowledged and those sent without a reply.
The counters are then read twice, independently:

* **through the server** — ``GET`` of each counter, pipelined on one connection: what a client
  sees;
* **from the file** — the SQLite database opened read-only, every key under the run's prefix:
  what was committed, whatever the server says (and counters no loader incremented show up).

A counter holds exactly its acknowledged INCRs when every INCR was answered. An INCR whose
reply never came (a killed worker, a reset, the run's end) may have committed or not, so in
general the check is, per counter, ``acknowledged ≤ stored ≤ acknowledged + unanswered``:
below is a *lost* update (acknowledged, not stored), above an *extra* one (stored, never
sent). Either fails the run.
"""

from __future__ import annotations

import socket
import sqlite3
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lab.measure.kvload import counter_key, counter_prefix

__all__ = ["KvCheck", "Reading", "check", "read_file", "read_through_server"]

#: Counters named in a bad verdict's examples.
EXAMPLES = 5
#: GETs sent before their replies are read (each reply is a short line: the socket buffers hold
#: a batch both ways, so neither side blocks on the other).
BATCH = 200
READ_TIMEOUT = 10.0


@dataclass
class Reading:
    """One way of reading the counters: what it found, or why it could not."""

    source: str  # "server" or "file"
    stored: dict[str, int] | None = None  # counter key → value (absent: no such key)
    error: str | None = None


@dataclass
class KvCheck:
    """The verdict, per way of reading (see the module)."""

    tag: str
    counters: int  # counters the loaders incremented
    acknowledged: int
    unanswered: int
    #: Per source ("server", "file"): stored total, lost and extra counters, or the error.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    ok: bool = True
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def line(self) -> str:
        """One line for a person: the verdict and what it rests on."""
        read = ", ".join(
            f"{name} {data['stored']:,}" if "stored" in data else f"{name}: {data['error']}"
            for name, data in self.sources.items()
        )
        bound = f" (+ {self.unanswered:,} unanswered)" if self.unanswered else ""
        head = "no lost update" if self.ok else "LOST OR EXTRA UPDATES"
        tail = "" if self.ok else ": " + "; ".join(self.examples)
        return (
            f"{head}: {self.counters:,} counters, {self.acknowledged:,} INCRs acknowledged"
            f"{bound}; stored: {read}{tail}"
        )


def check(kv_incr: Mapping[str, Any], readings: list[Reading]) -> KvCheck:
    """Judge the loaders' merged ``kv_incr`` (see LoadResult) against each reading."""
    tag = str(kv_incr["tag"])
    counts = {
        counter_key(tag, int(i)): (int(acked), int(unanswered))
        for i, (acked, unanswered) in kv_incr["counters"].items()
    }
    verdict = KvCheck(
        tag=tag,
        counters=len(counts),
        acknowledged=sum(a for a, _ in counts.values()),
        unanswered=sum(u for _, u in counts.values()),
    )
    for reading in readings:
        if reading.stored is None:
            verdict.sources[reading.source] = {"error": reading.error or "not read"}
            continue
        lost, extra = [], []
        for key in sorted(set(counts) | set(reading.stored)):
            acknowledged, unanswered = counts.get(key, (0, 0))
            stored = reading.stored.get(key, 0)
            if stored < acknowledged:
                lost.append(key)
                verdict.examples.append(
                    f"{key} ({reading.source}): {acknowledged} acknowledged, {stored} stored"
                )
            elif stored > acknowledged + unanswered:
                extra.append(key)
                verdict.examples.append(
                    f"{key} ({reading.source}): {stored} stored, only "
                    f"{acknowledged + unanswered} sent"
                )
        verdict.sources[reading.source] = {
            "stored": sum(reading.stored.values()),
            "lost": len(lost),
            "extra": len(extra),
        }
        if lost or extra:
            verdict.ok = False
    del verdict.examples[EXAMPLES:]
    return verdict


def read_through_server(host: str, port: int, tag: str, indices: list[int]) -> Reading:
    """The counters as the server answers ``GET`` for them (pipelined, in batches)."""
    keys = [counter_key(tag, i) for i in indices]
    stored: dict[str, int] = {}
    try:
        with socket.create_connection((host, port), timeout=READ_TIMEOUT) as sock:
            reader = sock.makefile("rb")
            for start in range(0, len(keys), BATCH):
                batch = keys[start : start + BATCH]
                sock.sendall(b"".join(f"GET {key}\n".encode() for key in batch))
                for key in batch:
                    line = reader.readline().rstrip(b"\r\n")
                    if line == b"NOT_FOUND":
                        continue
                    if not line.lstrip(b"-").isdigit():
                        return Reading("server", error=f"GET {key} answered {line[:60]!r}")
                    stored[key] = int(line)
    except OSError as exc:
        return Reading("server", error=f"could not read the counters through the server: {exc}")
    return Reading("server", stored)


def read_file(path: str, tag: str) -> Reading:
    """Every counter of the run named ``tag`` in the SQLite file at ``path``, read-only."""
    prefix = counter_prefix(tag)
    uri = f"file:{urllib.parse.quote(path)}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=READ_TIMEOUT)
        try:
            rows = db.execute(
                # The prefix's keys are a range of the primary key: ':' + 1 is ';'.
                "SELECT key, value FROM kv WHERE key >= ? AND key < ?",
                (prefix, prefix[:-1] + ";"),
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return Reading("file", error=f"could not read {path}: {exc}")
    stored: dict[str, int] = {}
    for key, value in rows:
        try:
            stored[key] = int(value)
        except ValueError:
            return Reading("file", error=f"{key} holds {value[:60]!r}, not an integer")
    return Reading("file", stored)


def main(argv: list[str] | None = None) -> int:
    """Read the counters where they are, for a caller elsewhere (the containerised lab runs it
    by exec): ``python -m lab.measure.kvcheck server HOST PORT TAG INDICES`` (comma-separated)
    or ``… file PATH TAG``; prints the :class:`Reading` as one JSON line."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) == 5 and args[0] == "server":
        indices = [int(i) for i in args[4].split(",") if i]
        reading = read_through_server(args[1], int(args[2]), args[3], indices)
    elif len(args) == 3 and args[0] == "file":
        reading = read_file(args[1], args[2])
    else:
        print("usage: python -m lab.measure.kvcheck server HOST PORT TAG I,J,… | file PATH TAG")
        return 2
    print(json.dumps(asdict(reading)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
