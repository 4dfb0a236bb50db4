"""The full compare's two small additions to the sweep, on the sweep's own backend.

* **Idle connections** (:func:`idle`): :data:`IDLE_CONCURRENCY` active clients,
  connect-per-request, first with no idle connection and then with as many held open (connected,
  silent) as a pool has workers. A worker that blocks serving a connection is held by an idle
  client; an event loop is not, and a process or thread per connection starts one more. Active
  throughput is measured with the idle connections held.
* **Pool size** (:func:`pool_sizes`): every pool design at ``--workers`` 1, 2 and 4,
  connect-per-request at :data:`POOL_CONCURRENCY`: how each scales with its pool, and where the
  machine's cores stop it.

Both are shorter than the sweep's cells (:data:`DURATION`, :data:`WARMUP` at most) and keep the
sweep's repeats; each run is kept as the sweep keeps its runs, with ``idle`` or ``workers``
added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lab.measure.bench import Backend, BenchError, _settled_stats
from lab.measure.config import CONNECT_PER_REQUEST, make_config
from lab.measure.errors import LoadError

if TYPE_CHECKING:
    from lab.measure.compare import Matrix

IDLE_CONCURRENCY = 8
POOL_CONCURRENCY = 64
POOL_SIZES = (1, 2, 4)
DURATION = 1.0  # seconds measured, at most (the sweep's own when shorter)
WARMUP = 0.3
#: After the idle connections connect: time for the server to take them in.
HOLD_SETTLE = 0.3
#: The loaders' timeout in the idle experiment, with and without idle connections: it bounds
#: the drain after the window, which a held server would fill waiting for nothing.
IDLE_TIMEOUT = 1.0


def _short(matrix: Matrix, **changes: Any) -> Matrix:
    return dataclasses.replace(
        matrix,
        duration=min(matrix.duration, DURATION),
        warmup=min(matrix.warmup, WARMUP),
        **changes,
    )


# -- idle connections ---------------------------------------------------------------------------
def idle_designs(names: Sequence[str]) -> list[str]:
    """The registry's designs among ``names`` (variants and peers are left out)."""
    from lab.sockets.designs import DESIGNS

    return [name for name in names if name in DESIGNS]


def idle_levels(workers: int) -> tuple[int, ...]:
    """No idle connection, then one per worker of a pool."""
    return (0, workers)


@contextlib.contextmanager
def held(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``address``, open and silent, for the ``with``."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(address, timeout=5.0)
            socks.append(sock)
        if socks:
            time.sleep(HOLD_SETTLE)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _load_entry(
    backend: Backend, matrix: Matrix, name: str, entry: dict[str, Any], hold: int
) -> dict[str, Any]:
    from lab.measure import distribution
    from lab.measure.compare import server_spec

    entry = {"design": name, **entry}
    spec = server_spec(name, matrix.workers)
    entry["server_options"] = list(spec.options)
    try:
        host, port = backend.start(spec)
        config = make_config(
            host,
            port=port,
            workload=CONNECT_PER_REQUEST,
            size=matrix.size,
            concurrency=int(entry["concurrency"]),
            duration=matrix.duration,
            warmup=matrix.warmup,
            timeout=IDLE_TIMEOUT,
        )
        with held(distribution.reachable(backend, host, port), hold):
            result = backend.load(config)
        entry["load"] = result.to_dict()
        _settled_stats(backend)  # the held connections end before the next run
    except (BenchError, LoadError, OSError) as exc:
        entry["error"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
    finally:
        backend.stop()
    return entry


def idle_steps(matrix: Matrix) -> int:
    return len(idle_designs(matrix.designs)) * len(idle_levels(matrix.workers)) * matrix.repeats


def idle(
    backend: Backend, matrix: Matrix, progress: Callable[[str], None] = lambda _what: None
) -> dict[str, Any]:
    """Active throughput with no idle connection and with one held per pool worker, for every
    design of the matrix: what results.json keeps as its ``idle``."""
    short = _short(matrix)
    levels = idle_levels(matrix.workers)
    runs = []
    for name in idle_designs(matrix.designs):
        for repeat in range(matrix.repeats):
            for hold in levels:
                progress(f"{name} with {hold} idle connection(s) (repeat {repeat + 1})")
                entry = {
                    "workload": CONNECT_PER_REQUEST,
                    "concurrency": IDLE_CONCURRENCY,
                    "repeat": repeat,
                    "idle": hold,
                }
                runs.append(_load_entry(backend, short, name, entry, hold))
    return {
        "levels": list(levels),
        "concurrency": IDLE_CONCURRENCY,
        "duration": short.duration,
        "runs": runs,
    }


# -- pool size ----------------------------------------------------------------------------------
def pool_designs(names: Sequence[str]) -> list[str]:
    from lab.measure.compare import POOL_DESIGNS

    return [name for name in names if name in POOL_DESIGNS]


def pool_steps(matrix: Matrix) -> int:
    return len(pool_designs(matrix.designs)) * len(POOL_SIZES) * matrix.repeats


def pool_sizes(
    backend: Backend, matrix: Matrix, progress: Callable[[str], None] = lambda _what: None
) -> dict[str, Any]:
    """Every pool design of the matrix at each of :data:`POOL_SIZES` workers: what results.json
    keeps as its ``pool_sizes``."""
    from lab.measure.compare import _run

    runs = []
    for name in pool_designs(matrix.designs):
        for workers in POOL_SIZES:
            sized = _short(matrix, workers=workers)
            for repeat in range(matrix.repeats):
                progress(f"{name} --workers {workers} (repeat {repeat + 1})")
                entry = {
                    "workload": CONNECT_PER_REQUEST,
                    "concurrency": POOL_CONCURRENCY,
                    "repeat": repeat,
                    "workers": workers,
                }
                runs.append(_run(backend, sized, name, entry))
    return {
        "workers": list(POOL_SIZES),
        "concurrency": POOL_CONCURRENCY,
        "duration": _short(matrix).duration,
        "runs": runs,
    }
