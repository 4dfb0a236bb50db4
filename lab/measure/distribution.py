"""Which worker serves each of a few sequential connections — Cloudflare's 2017 experiment
("Why does one NGINX worker take all the load?").

A pool design starts with ``--workers 3`` on any backend; the lab's client then makes
:data:`CONNECTIONS` connections one after another, each closed before the next opens, and after
each the server's statistics (``per_worker``, connections by worker) say which worker served it.
Workers that block in ``accept()`` wait in the listening socket's queue in FIFO order — the one
that just finished goes to the back — so sequential connections go round the pool: 2,1,0,2,1,0,
every worker serving two. Workers waiting in ``epoll_wait`` with ``EPOLLEXCLUSIVE`` are woken
LIFO: the most recently idle one takes the next connection, so one worker serves all six.
``SO_REUSEPORT`` listeners pick by a hash of the connection's addresses.

It costs a server start and a dozen statistics reads per design: seconds. The experiment runs
:data:`ROUNDS` times on the same server; a design's pattern is the rounds' if they agree.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from lab.measure.bench import Backend, BenchError, ServerSpec
from lab.sockets.client import ClientError, exchange

__all__ = [
    "CONNECTIONS",
    "EXPECTED",
    "ONE_WORKER",
    "ROUND_ROBIN",
    "UNEVEN",
    "WORKERS",
    "classify",
    "designs_for",
    "experiment",
    "run",
]

WORKERS = 3
CONNECTIONS = 6
ROUNDS = 2
ROUND_ROBIN = "round-robin"  # every worker served the same number
ONE_WORKER = "one worker"  # one worker served them all
UNEVEN = "uneven"  # anything else
VARIES = "varies between rounds"
#: What the two mechanisms Cloudflare set side by side do, by the design that embodies each:
#: blocking accept() (FIFO) and epoll with EPOLLEXCLUSIVE (LIFO). Every other pool is shown as
#: observed.
EXPECTED = {"multi-accept": ROUND_ROBIN, "prefork-epoll": ONE_WORKER}
#: How long to wait for the server's statistics to show a connection that ended.
SEEN_TIMEOUT = 5.0
POLL = 0.02


def designs_for(names: Sequence[str]) -> list[str]:
    """The pool designs among ``names`` (registry names: variants and peers are left out)."""
    from lab.measure.compare import POOL_DESIGNS

    return [name for name in names if name in POOL_DESIGNS]


def classify(counts: Sequence[int], connections: int) -> str:
    """The pattern of one round's connections per worker (zeros included)."""
    if counts and max(counts) == connections:
        return ONE_WORKER
    if counts and len(set(counts)) == 1:
        return ROUND_ROBIN
    return UNEVEN


def reachable(backend: Backend, host: str, port: int) -> tuple[str, int]:
    """Where this process reaches the server ``backend`` started at ``host:port``: the same
    address locally; in the containerised lab, the port the server publishes on the host's
    loopback."""
    if backend.name != "docker":
        return host, port
    from lab.orchestration import stack

    engine = getattr(backend, "engine")  # noqa: B009 — the Docker backend's, not the protocol's
    project = getattr(backend, "project")  # noqa: B009
    settings = stack.server_settings(stack.server_container(engine, project))
    published = settings.get("LAB_HOST_PORT")
    if not published:
        raise BenchError("the lab's server publishes no port on the host: `lab down`, then retry")
    return "127.0.0.1", int(published)


def _served(backend: Backend, before: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The statistics once one more connection has ended than ``before`` shows, and the worker
    whose count rose (None if none did in time)."""
    deadline = time.monotonic() + SEEN_TIMEOUT
    done = int(before.get("completed", 0)) + sum((before.get("failed") or {}).values())
    while True:
        after = backend.stats() or {}
        ended = int(after.get("completed", 0)) + sum((after.get("failed") or {}).values())
        if ended > done or time.monotonic() > deadline:
            change = Counter(after.get("per_worker") or {})
            change.subtract(before.get("per_worker") or {})
            risen = [worker for worker, n in change.items() if n > 0]
            return after, (risen[0] if len(risen) == 1 else None)
        time.sleep(POLL)


def experiment(
    backend: Backend,
    design: str,
    workers: int = WORKERS,
    connections: int = CONNECTIONS,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    """One design's record: each round's serving worker per connection (workers numbered in the
    order they first served), the connections per worker, and the pattern."""
    from lab.measure.compare import pool_options

    spec = ServerSpec(design, pool_options(design, workers))
    record: dict[str, Any] = {
        "design": design,
        "server_options": list(spec.options),
        "workers": workers,
        "connections": connections,
    }
    try:
        host, port = backend.start(spec)
        address = reachable(backend, host, port)
        stats = _wait_for_pool(backend, workers)
        names: dict[str, int] = {}  # worker (pid, thread id) → its number
        record["rounds"] = []
        for _ in range(rounds):
            served: list[int | None] = []
            for i in range(connections):
                exchange(*address, message=f"connection {i + 1}".encode(), timeout=5.0)
                stats, worker = _served(backend, stats)
                if worker is not None:
                    names.setdefault(worker, len(names))
                served.append(names.get(worker) if worker is not None else None)
            counts = [served.count(n) for n in range(max(workers, len(names)))]
            record["rounds"].append(
                {
                    "served_by": served,
                    "counts": counts,
                    "pattern": classify(counts, connections)
                    if None not in served
                    else "unknown (a connection was not seen in the statistics)",
                }
            )
        record["worker_ids"] = list(names)
        patterns = {r["pattern"] for r in record["rounds"]}
        record["pattern"] = patterns.pop() if len(patterns) == 1 else VARIES
    except (BenchError, ClientError, OSError, ValueError) as exc:
        record["error"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
    finally:
        backend.stop()
    return record


def _wait_for_pool(backend: Backend, workers: int, timeout: float = 10.0) -> dict[str, Any]:
    """The statistics once every worker is up (and a moment for the last to reach its wait)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = backend.stats()
        if stats is None:
            raise BenchError("the server keeps no statistics: it cannot say who served what")
        if int(stats.get("workers_alive") or 0) >= workers or time.monotonic() > deadline:
            time.sleep(0.2)
            return backend.stats() or stats
        time.sleep(0.1)


def run(
    backend: Backend,
    designs: Sequence[str],
    progress: Callable[[str], None] = lambda _what: None,
) -> dict[str, Any]:
    """The experiment on every pool design among ``designs``: what results.json keeps as its
    ``distribution``."""
    records = []
    for design in designs_for(designs):
        progress(f"{design}: {CONNECTIONS} sequential connections, --workers {WORKERS}")
        records.append(experiment(backend, design))
    return {
        "workers": WORKERS,
        "connections": CONNECTIONS,
        "rounds": ROUNDS,
        "designs": {r["design"]: r for r in records},
    }
