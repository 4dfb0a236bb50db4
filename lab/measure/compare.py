"""``lab compare``: every design (and peer) × workloads × a concurrency sweep, repeated — the
data the report and its claims are made of.

A run's results go to ``OUT/<run id>/results.json`` (schema: docs/results-schema.md) and are
appended to ``OUT/lab.sqlite``, so two runs can be compared later (:func:`changes`). Every run
records its environment and the exact command that reproduces it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sqlite3
import statistics
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.measure.bench import Backend, BenchError, ServerSpec, bench, server_command
from lab.measure.config import (
    CONNECT_PER_REQUEST,
    DEFAULT_KEYS,
    DEFAULT_MIX,
    KV,
    PERSISTENT,
    WORKLOADS,
    make_config,
)
from lab.measure.errors import LoadError
from lab.measure.peers import PEER_FAMILIES, PEERS
from lab.sockets.designs import DESIGNS

SCHEMA = "lab.compare/1"
#: The designs with a pool of ``--workers`` (processes or threads, as each declares). In the
#: sweep every one gets the same size and none may grow past it (``--max-workers`` =
#: ``--workers`` for those that grow): pools are compared at equal size.
POOL_DESIGNS = tuple(name for name, design in DESIGNS.items() if design.pool_of)
#: How far the growing variant's pool may grow: the servers' default, 4 × ``--workers``.
GROWTH = 4


@dataclass(frozen=True)
class Variant:
    """A design run with other options, reported as its own row; its family (the C peer it is
    measured against) is its base design's."""

    design: str  # the base design
    label: str  # what differs, as the report says it
    options: tuple[str, ...] = ()
    #: A pool design's ``--max-workers``, in ``--workers``: 1 pins the pool to its size.
    growth: int = 1

    @property
    def copy(self) -> bool:
        """Its base design with identical options: a control, never told apart from it."""
        return not self.options and self.growth == 1


#: Every variant, in one place: the sweep runs each beside the designs and the peers.
VARIANTS = {
    "spawn+cat": Variant(
        "spawn",
        "spawn with --worker-cmd cat: a process per connection without starting Python",
        ("--worker-cmd", "cat"),
    ),
    "sendmsg+grow": Variant(
        "sendmsg",
        f"sendmsg whose pool grows under load to --max-workers = {GROWTH} × --workers "
        "(the design's default)",
        growth=GROWTH,
    ),
    "multi-accept+flock": Variant(
        "multi-accept",
        "multi-accept with --accept-lock flock: each worker holds a flock() on a shared file "
        "around accept() (Stevens' server 3)",
        ("--accept-lock", "flock"),
    ),
    "multi-accept+sem": Variant(
        "multi-accept",
        "multi-accept with --accept-lock sem: a process-shared semaphore around accept() "
        "(Stevens' server 4, a lock in shared memory)",
        ("--accept-lock", "sem"),
    ),
    "multi-accept#2": Variant(
        "multi-accept",
        "control: multi-accept again with identical options — the judging must tell it apart "
        "from multi-accept in nothing",
    ),
}
#: The growing pool: what "sendmsg stays unhindered" is judged on.
GROWING = next(name for name, variant in VARIANTS.items() if variant.growth > 1)
#: (variant, its base design): the same design with a lock around accept() (claim 8).
ACCEPT_LOCKS = tuple(
    (name, variant.design)
    for name, variant in VARIANTS.items()
    if "--accept-lock" in variant.options
)
#: (design, its copy): the controls.
CONTROLS = tuple((variant.design, name) for name, variant in VARIANTS.items() if variant.copy)
PEER_NAMES = tuple(f"peer-{name}" for name in sorted(PEERS))
#: The offered loads of a latency curve, as shares of the design's closed-loop maximum.
CURVE_FRACTIONS = (0.25, 0.5, 0.75, 0.9)
SYSCTLS = (
    "net.core.somaxconn",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
)


@dataclass
class Matrix:
    designs: list[str]
    workloads: list[str] = field(default_factory=lambda: ["connect-per-request", "persistent"])
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 64, 256])
    repeats: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    workers: int = 2  # every pool design gets the same number, so comparisons are fair
    per_connection: int = 10
    size: int = 49
    #: Designs (or variants, peers) also run open loop at :data:`CURVE_FRACTIONS` of their
    #: closed-loop maximum throughput: latency against offered load.
    latency_curve: list[str] = field(default_factory=list)
    #: The full compare's experiments beside the sweep (lab.measure.distribution and
    #: lab.measure.experiments): sequential connections across workers, idle connections,
    #: pool sizes.
    experiments: bool = False
    #: lab compare --robustness: the robustness battery (local, lab.measure.robustness) and
    #: fault benches on the sweep's backend, for the lab's own designs.
    robustness: bool = False
    #: Users' own servers (``--peer NAME=CMD``): name → command line with ``{port}``, each run
    #: as a peer is (lab.measure.usercmd); their names are in ``designs`` too.
    user_servers: dict[str, str] = field(default_factory=dict)
    #: Host paths mounted read-only, at the same path, in a user server's container.
    mounts: list[str] = field(default_factory=list)
    #: The kv workload's commands, keys and key distribution (its connections carry
    #: ``per_connection`` commands, as persistent's carry messages).
    mix: str = DEFAULT_MIX
    keys: int = DEFAULT_KEYS
    distribution: str = "uniform"


def serves_kv(name: str) -> bool:
    """Whether ``name`` can run the kv workload: one of the lab's designs, or a variant of one
    whose worker is the lab's own (``--worker-cmd`` runs another program, which only echoes).
    Peers and users' servers echo."""
    if name in VARIANTS:
        return "--worker-cmd" not in VARIANTS[name].options
    return name in DESIGNS


def workloads(names: Sequence[str]) -> list[str]:
    """``--workload``'s list: each a workload; ``kv`` given alone joins the two echo workloads
    (the kv claim compares the designs' spread under echo and under kv, in one run)."""
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise BenchError(
            f"unknown workload {unknown[0]!r}: choose from {', '.join(WORKLOADS)} (comma-separated)"
        )
    chosen = list(dict.fromkeys(names))
    if chosen == [KV]:
        chosen = [CONNECT_PER_REQUEST, PERSISTENT, KV]
    return chosen


def all_servers() -> list[str]:
    return [*DESIGNS, *VARIANTS, *PEER_NAMES]


#: What `make lab`'s quick compare runs: the chapter's four designs, fork, spawn with cat, one
#: thread design (``thread``: set against ``fork`` by "threads are cheaper than processes"), one
#: event loop (``select``), the control (``multi-accept#2``, last, so that it runs apart from
#: ``multi-accept``: without it the control claim had nothing to judge and could not fail), and
#: the C peers of their families (the ×C ceilings).
QUICK_DESIGNS = (
    "iterative",
    "spawn",
    "sendmsg",
    "multi-accept",
    "fork",
    "spawn+cat",
    "thread",
    "select",
    "multi-accept#2",
)


def quick_servers() -> list[str]:
    families = {DESIGNS[d].family for d in QUICK_DESIGNS if d in DESIGNS}
    return [*QUICK_DESIGNS, *(f"peer-c-{family}" for family in sorted(families))]


def quick_matrix(designs: list[str], workers: int) -> Matrix:
    """A few minutes: short runs at two concurrencies (one beyond the iterative backlog, so
    claim 1 has its case), both workloads, three repeats — the claims need spreads."""
    return Matrix(
        designs, concurrency=[1, 16], repeats=3, duration=0.8, warmup=0.15, workers=workers
    )


def base_design(name: str) -> str | None:
    """The design a server name runs: itself, a variant's base, or None for a peer."""
    if name in VARIANTS:
        return VARIANTS[name].design
    return name if name in DESIGNS else None


def c_peer(name: str) -> str | None:
    """The C peer a design (or variant, or a peer of a known shape) is measured against:
    ``peer-c-<its family>``; None for a C ceiling itself and for a server of unknown shape."""
    design = base_design(name)
    if design is not None:
        return f"peer-c-{DESIGNS[design].family}"
    family = PEER_FAMILIES.get(name.removeprefix("peer-")) if name.startswith("peer-") else None
    return f"peer-c-{family}" if family is not None else None


def pool_options(design: str, workers: int, growth: int = 1) -> tuple[str, ...]:
    """A pool design's size; one that grows is pinned to it (or let grow ``growth``-fold)."""
    size = ("--workers", str(workers))
    return (*size, "--max-workers", str(growth * workers)) if DESIGNS[design].grows else size


def server_spec(
    name: str, workers: int, user: Mapping[str, str] | None = None, mounts: Sequence[str] = ()
) -> ServerSpec:
    if user and name in user:  # a user's server: its command, no options of ours
        return ServerSpec(name, command=user[name], mounts=tuple(mounts))
    if name in VARIANTS:
        variant = VARIANTS[name]
        pool = (
            pool_options(variant.design, workers, variant.growth)
            if variant.design in POOL_DESIGNS
            else ()
        )
        return ServerSpec(variant.design, (*pool, *variant.options))
    if name in POOL_DESIGNS:
        return ServerSpec(name, pool_options(name, workers))
    from lab.measure.peers import C_PEERS  # the C peers with a pool take --workers too

    pooled_peers = [f"peer-{peer}" for peer, (_mode, pooled) in C_PEERS.items() if pooled]
    if name in pooled_peers:
        return ServerSpec(name, ("--workers", str(workers)))
    return ServerSpec(name)


def check_servers(names: list[str], user: Iterable[str] = ()) -> None:
    unknown = [n for n in names if n not in [*all_servers(), *user]]
    if unknown:
        raise BenchError(f"unknown design {unknown[0]!r}: choose from {', '.join(all_servers())}")


def run_id(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class Step:
    """Where a sweep is: the cells done before this one, the cells in all, what runs now."""

    done: int
    total: int
    what: str  # e.g. "multi-accept connect-per-request ×8 (repeat 1)"

    @property
    def line(self) -> str:
        return f"[{self.done + 1}/{self.total}] {self.what}"


#: The sweep's orders (results.json ``order``; see :func:`sweep_order`).
INTERLEAVED = "interleaved"
ROUNDS = "rounds"
BY_DESIGN = "by design"


def sweep_order(matrix: Matrix, order: str = INTERLEAVED) -> list[tuple[str, str, int, int]]:
    """The sweep's cells as (name, workload, concurrency, repeat), in the order they run.

    :data:`INTERLEAVED` (a backend that holds many servers at once, each started once: local
    processes): repeat-major — repeat 1 of every cell of every design, then repeat 2 … — and
    within a repeat, cell by cell, every design in turn. A machine that drifts (another job, a
    CPU clock, a warming cache) then moves each cell's repeats apart as much as it moves the
    designs apart, so the drift shows in the spread the claims judge by instead of passing for
    a difference; and the designs a claim compares in one cell run within one round of the
    designs, not a whole design's turn apart. On odd repeats the designs run in reverse (A B C,
    C B A, A B C …): the claims compare a cell's designs across its repeats, so no design runs
    first, or right after the same neighbour, in every repeat of a cell.

    :data:`ROUNDS` (one server at a time — the containers, where a switch restarts the server
    and waits for its health — in a full compare): one round of the designs per repeat, each
    design's cells of that repeat together, the designs reversed on odd rounds. Each server
    starts once per round, not once per sweep (a switch is seconds against a round's minutes),
    so a design's repeats lie a round apart and drift shows in their spread, as interleaved.
    (A full compare in the containers run design by design once told multi-accept and its
    identical copy, run fifteen minutes apart, clearly apart in 5 of 6 comparisons.)

    :data:`BY_DESIGN` (one server at a time, where the time budget allows one start per server:
    ``make lab``'s quick compare): design by design, its repeats together. A verdict then rests
    on consecutive repeats: drift between one design's turn and the next does not show in
    either's spread, and only the control claim (a design against its identical copy, run
    apart from it) shows whether it fooled the judging."""
    cells = [(w, c) for w in matrix.workloads for c in matrix.concurrency]
    if order == ROUNDS:
        rounds = []
        for repeat in range(matrix.repeats):
            names = matrix.designs if repeat % 2 == 0 else matrix.designs[::-1]
            rounds += [(name, w, c, repeat) for name in names for w, c in cells]
        return rounds
    if order == BY_DESIGN:
        return [
            (name, w, c, repeat)
            for name in matrix.designs
            for repeat in range(matrix.repeats)
            for w, c in cells
        ]
    sweep = []
    for repeat in range(matrix.repeats):
        names = matrix.designs if repeat % 2 == 0 else matrix.designs[::-1]
        sweep += [(name, w, c, repeat) for w, c in cells for name in names]
    return sweep


def compare(
    make_backend: Callable[[], Backend],
    matrix: Matrix,
    progress: Callable[[Step], None] = lambda _step: None,
    environment: dict[str, Any] | None = None,
    command: str = "",
    quick: bool = False,
) -> dict[str, Any]:
    """Run the matrix (and its latency curves); a run that fails is kept with its one-line
    error, the sweep goes on."""
    check_servers([*matrix.designs, *matrix.latency_curve], matrix.user_servers)
    workloads(matrix.workloads)  # each one known
    runs: list[dict[str, Any]] = []
    backend = make_backend()  # one for the sweep: it may keep a server running between runs
    _try_user_servers(backend, matrix)
    # Interleaved where every server can stay up at once (local processes); where one server
    # runs at a time (the containers: a switch restarts it and waits for its health) in rounds,
    # a server start per design and repeat — or, in the quick compare, whose time budget has
    # room for one start per design only, design by design. See sweep_order for what each means.
    if getattr(backend, "holds_many_servers", False):
        order = INTERLEAVED
    else:
        order = BY_DESIGN if quick else ROUNDS
    # A peer (or spawn with another worker program) only echoes: it has no kv cells.
    sweep = [cell for cell in sweep_order(matrix, order) if cell[1] != KV or serves_kv(cell[0])]
    containers = not getattr(backend, "holds_many_servers", False)
    total = len(sweep) + _curve_steps(matrix) + _experiment_steps(matrix)
    if matrix.robustness:
        from lab.measure import robustness

        total += robustness.steps(matrix.designs, containers)
    done = 0
    for name, workload, concurrency, repeat in sweep:
        what = f"{name} {workload} ×{concurrency} (repeat {repeat + 1})"
        progress(Step(done, total, what))
        done += 1
        entry = {"workload": workload, "concurrency": concurrency, "repeat": repeat}
        runs.append(_run(backend, matrix, name, entry))
    curve = _latency_curve(backend, matrix, runs, progress, done, total)
    done += _curve_steps(matrix)
    extra = _experiments(backend, matrix, progress, done, total)
    done += _experiment_steps(matrix)
    if matrix.robustness:
        extra.update(_robustness(backend, matrix, containers, progress, (done, total), quick))
    close = getattr(backend, "close", None)
    if close is not None:
        close()
    results = {
        "schema": SCHEMA,
        "run_id": run_id(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": backend.name,
        "quick": quick,
        "order": order,
        "command": command,
        "environment": environment or {},
        "matrix": asdict(matrix),
        "runs": runs,
    }
    if matrix.latency_curve:
        results["latency_curve"] = curve
    results.update(extra)
    return results


def _experiment_steps(matrix: Matrix) -> int:
    if not matrix.experiments:
        return 0
    from lab.measure import distribution, experiments

    return (
        len(distribution.designs_for(matrix.designs))
        + experiments.idle_steps(matrix)
        + experiments.pool_steps(matrix)
    )


def _experiments(
    backend: Backend, matrix: Matrix, progress: Callable[[Step], None], done: int, total: int
) -> dict[str, Any]:
    """The full compare's experiments (see :attr:`Matrix.experiments`), keyed as results.json
    keeps them: ``distribution``, ``idle``, ``pool_sizes``."""
    if not matrix.experiments:
        return {}
    from lab.measure import distribution, experiments

    counter = [done]

    def step(what: str) -> None:
        progress(Step(counter[0], total, what))
        counter[0] += 1

    return {
        "distribution": distribution.run(backend, matrix.designs, step),
        "idle": experiments.idle(backend, matrix, step),
        "pool_sizes": experiments.pool_sizes(backend, matrix, step),
    }


def _robustness(
    backend: Backend,
    matrix: Matrix,
    containers: bool,
    progress: Callable[[Step], None],
    where: tuple[int, int],
    quick: bool,
) -> dict[str, Any]:
    """``robustness`` (the battery's checks, run locally; its short form with ``quick``) and
    ``faults`` (fault benches on the sweep's backend), as results.json keeps them."""
    from lab.measure import robustness

    counter, total = [where[0]], where[1]

    def step(design: str, what: str) -> None:
        progress(Step(counter[0], total, f"{design}: {what}"))
        counter[0] += 1

    faults = robustness.fault_benches(backend, matrix.designs, containers, matrix.workers, step)
    ours = [d for d in matrix.designs if d in DESIGNS]
    checks = robustness.battery(ours, quick=quick, progress=step)
    return {"robustness": [c.to_dict() for c in checks], "faults": faults}


def _try_user_servers(backend: Backend, matrix: Matrix) -> None:
    """Start each user's server once before the sweep: one that cannot start (its program
    missing, exiting at once, never accepting) stops the sweep now with its one-line error
    (:class:`~lab.measure.usercmd.UserServerError`), not after the designs' cells."""
    try:
        for name in matrix.designs:
            if name in matrix.user_servers:
                backend.start(server_spec(name, matrix.workers, matrix.user_servers, matrix.mounts))
                backend.stop()
    except BaseException:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        raise


def _run(
    backend: Backend, matrix: Matrix, name: str, entry: dict[str, Any], rate: float | None = None
) -> dict[str, Any]:
    """One measured run of ``name`` as ``entry`` describes it (workload, concurrency, …),
    closed loop or, with ``rate``, open loop: ``entry`` completed with the result or the
    one-line error."""
    workload = entry["workload"]
    entry = {"design": name, **entry}
    spec = server_spec(name, matrix.workers, matrix.user_servers, matrix.mounts)
    try:
        config = make_config(
            "127.0.0.1",
            port=1,
            workload=workload,
            per_connection=matrix.per_connection if workload in (PERSISTENT, KV) else None,
            size=matrix.size,
            concurrency=entry["concurrency"],
            rate=rate,
            duration=matrix.duration,
            warmup=matrix.warmup,
            mix=matrix.mix if workload == KV else None,
            keys=matrix.keys if workload == KV else None,
            distribution=matrix.distribution if workload == KV else None,
        )
        result = bench(backend, spec, config).to_dict()
        result["design"] = name  # the variant's name, not its base design
        entry.update(result)
    except (BenchError, LoadError, OSError) as exc:
        entry.update(
            backend=backend.name,
            server_options=list(spec.options),
            **server_command(spec),
            error=str(exc).splitlines()[0] if str(exc) else repr(exc),
        )
    return entry


# -- latency against offered load (the wrk2 way) ------------------------------------------------
def _swept(matrix: Matrix, name: str) -> bool:
    """Whether the sweep itself measures ``name``'s closed-loop throughput."""
    return name in matrix.designs and CONNECT_PER_REQUEST in matrix.workloads


def _curve_steps(matrix: Matrix) -> int:
    steps = 0
    for name in matrix.latency_curve:
        steps += 0 if _swept(matrix, name) else 1  # a closed-loop run to find its maximum
        steps += len(CURVE_FRACTIONS) * matrix.repeats
    return steps


def closed_loop_maximum(runs: list[dict[str, Any]], name: str) -> tuple[float, int] | None:
    """``name``'s best connect-per-request closed-loop throughput (the best concurrency's
    median over repeats) and that concurrency; None when nothing was measured."""
    by_concurrency: dict[int, list[float]] = {}
    for run in runs:
        load = run.get("load") or {}
        if (
            run.get("design") == name
            and run.get("workload") == CONNECT_PER_REQUEST
            and "error" not in run
            and not (load.get("config") or {}).get("rate")
        ):
            value = float(load.get("throughput_rps") or 0.0)
            by_concurrency.setdefault(int(run["concurrency"]), []).append(value)
    best = max(
        ((statistics.median(v), c) for c, v in by_concurrency.items()),
        default=None,
    )
    return best if best is not None and best[0] > 0 else None


def _latency_curve(
    backend: Backend,
    matrix: Matrix,
    runs: list[dict[str, Any]],
    progress: Callable[[Step], None],
    done: int,
    total: int,
) -> dict[str, Any]:
    """Each design of ``matrix.latency_curve`` open loop, connect-per-request, at each of
    :data:`CURVE_FRACTIONS` of its closed-loop maximum, with up to the sweep's highest
    concurrency of connections in flight; latency runs from each request's intended send time.
    The maximum is the sweep's own measurement of it, or one closed-loop run at that
    concurrency when the sweep did not measure it."""
    concurrency = max(matrix.concurrency)
    maxima: dict[str, Any] = {}
    curve_runs: list[dict[str, Any]] = []
    for name in matrix.latency_curve:
        found = closed_loop_maximum(runs, name)
        maximum: dict[str, Any] = {"source": "the sweep"}
        if not _swept(matrix, name):
            progress(Step(done, total, f"{name} closed loop ×{concurrency}: its maximum"))
            done += 1
            entry = {"workload": CONNECT_PER_REQUEST, "concurrency": concurrency, "repeat": 0}
            probe = _run(backend, matrix, name, entry)
            found = closed_loop_maximum([probe], name)
            maximum = {"source": "a closed-loop run for the curve"}
            if "error" in probe:
                maximum["error"] = probe["error"]
        if found is not None:
            maximum.update(throughput_rps=found[0], concurrency=found[1])
        maxima[name] = maximum
        for repeat in range(matrix.repeats):
            for fraction in CURVE_FRACTIONS:
                what = f"{name} open loop at {fraction:.0%} of its maximum (repeat {repeat + 1})"
                progress(Step(done, total, what))
                done += 1
                entry = {
                    "workload": CONNECT_PER_REQUEST,
                    "concurrency": concurrency,
                    "repeat": repeat,
                    "fraction": fraction,
                }
                if found is None:
                    curve_runs.append(
                        {"design": name, **entry, "error": "no closed-loop maximum to take from"}
                    )
                    continue
                rate = fraction * found[0]
                curve_runs.append(_run(backend, matrix, name, {**entry, "rate": rate}, rate))
    return {"fractions": list(CURVE_FRACTIONS), "maximum": maxima, "runs": curve_runs}


# -- the environment a run records -----------------------------------------------------------------
def environment(root: Path | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    sysctls: dict[str, str | None] = {}
    for name in SYSCTLS:
        try:
            sysctls[name] = Path("/proc/sys", *name.split(".")).read_text().strip()
        except OSError:
            sysctls[name] = None
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sysctls": sysctls,
        "git_commit": _git_commit(root),
        "designs": {
            name: {"default_backlog": design.default_backlog} for name, design in DESIGNS.items()
        },
        **(extra or {}),
    }


def _git_commit(root: Path | None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


# -- saving, and the history -------------------------------------------------------------------
def save(results: dict[str, Any], out: Path) -> Path:
    folder = out / str(results["run_id"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    store(results, out / "lab.sqlite")
    return path


def load(path: Path) -> dict[str, Any]:
    """A results.json (or the folder holding it)."""
    if path.is_dir():
        path = path / "results.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc} — give a folder `lab compare` wrote") from None
    if data.get("schema") != SCHEMA:
        raise BenchError(f"{path} is not a `lab compare` result (schema {data.get('schema')!r})")
    return data


_TABLE = """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT, created TEXT, backend TEXT, design TEXT, workload TEXT, concurrency INTEGER,
    repeat INTEGER, throughput_rps REAL, p99_us REAL, cpu_ms_per_request REAL, errors INTEGER,
    error TEXT, environment TEXT, run TEXT)"""


def store(results: dict[str, Any], db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute(_TABLE)
        conn.execute("DELETE FROM runs WHERE run_id = ?", (results["run_id"],))
        for run in results["runs"]:
            load_ = run.get("load") or {}
            server = run.get("server") or {}
            conn.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    results["run_id"],
                    results["created"],
                    results["backend"],
                    run["design"],
                    run["workload"],
                    run["concurrency"],
                    run["repeat"],
                    load_.get("throughput_rps"),
                    (load_.get("latency_us") or {}).get("p99"),
                    server.get("cpu_s_per_1000"),
                    load_.get("errors_total"),
                    run.get("error"),
                    json.dumps(results["environment"]),
                    json.dumps(run),
                ),
            )


def run_ids(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT DISTINCT run_id FROM runs ORDER BY 1")]


def changes(db: Path, run_a: str, run_b: str) -> list[dict[str, Any]]:
    """Per (design, workload, concurrency): medians of run A and run B and B/A, for throughput,
    p99 and server CPU per request."""
    known = run_ids(db)
    for run in (run_a, run_b):
        if run not in known:
            raise BenchError(f"no run {run!r} in {db}: known runs are {', '.join(known) or 'none'}")
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT run_id, design, workload, concurrency, throughput_rps, p99_us, "
            "cpu_ms_per_request FROM runs WHERE run_id IN (?, ?) AND error IS NULL",
            (run_a, run_b),
        ).fetchall()
    cells: dict[tuple[str, str, int], dict[str, list[list[float]]]] = {}
    for run, design, workload, concurrency, rps, p99, cpu in rows:
        side = cells.setdefault(
            (design, workload, concurrency), {run_a: [[], [], []], run_b: [[], [], []]}
        )[run]
        for values, value in zip(side, (rps, p99, cpu), strict=True):
            if value is not None:
                values.append(float(value))
    report = []
    for (design, workload, concurrency), sides in sorted(cells.items()):
        row: dict[str, Any] = {"design": design, "workload": workload, "concurrency": concurrency}
        for metric, index in (("throughput_rps", 0), ("p99_us", 1), ("cpu_ms_per_request", 2)):
            a = _median(sides[run_a][index])
            b = _median(sides[run_b][index])
            row[metric] = {"a": a, "b": b, "ratio": b / a if a and b is not None else None}
        report.append(row)
    return report


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
