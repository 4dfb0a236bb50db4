"""The report of a ``lab compare`` run: ``results.json`` aggregated, tabulated, judged and drawn.

:func:`aggregate` groups the runs by (design, workload, concurrency) across repeats into
:class:`Cell` s — the median and spread (min–max over repeats) of every number, latency
histograms merged exactly into pooled percentiles, errors and starved connections summed.
:func:`render` writes ``report.md`` and its PNG plots; :func:`summary_table` is the table the
CLI prints. The claims are judged in :mod:`lab.measure.claims`, the plots drawn in
:mod:`lab.measure.plots` (matplotlib is imported only there, and only when drawing).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.measure.config import KV
from lab.measure.histogram import LatencyHistogram

__all__ = [
    "CONNECT_PER_REQUEST",
    "POOLED_PERCENTILES",
    "Cell",
    "CurvePoint",
    "Spread",
    "aggregate",
    "cells_for",
    "curve_points",
    "design_order",
    "render",
    "summary_table",
]

CONNECT_PER_REQUEST = "connect-per-request"

#: Pooled percentiles read from the merged histogram: label → percent.
POOLED_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}

#: A spread tells two cells apart only from this many repeats each: a single run has no spread,
#: and is never "clearly" anything.
MIN_REPEATS = 2
#: …and only when their medians are this many standard errors of the run's own repeat-to-repeat
#: noise apart (see :meth:`Spread.above`): with 2–3 repeats, non-overlapping spreads alone
#: happen by chance far too often (two identical designs would be "told apart").
CLEAR_Z = 4.0
#: The least relative noise assumed, however quiet a run looked.
NOISE_FLOOR = 0.05


@dataclass(frozen=True)
class Spread:
    """The median of values over repeats, and their range (min–max)."""

    median: float
    low: float
    high: float
    n: int
    #: Every repeat's value, in repeat order (the plots draw a dot for each).
    values: tuple[float, ...] = field(default=(), compare=False)
    #: The run's relative repeat-to-repeat noise of this metric: the standard deviation of the
    #: log of the values, pooled over every usable cell of the run (set by :func:`aggregate`).
    noise: float = field(default=0.0, compare=False)

    @classmethod
    def of(cls, values: Iterable[float | int | None]) -> Spread | None:
        """The spread of the values that are present; None when none is."""
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        return cls(
            statistics.median(present), min(present), max(present), len(present), tuple(present)
        )

    def above(self, other: Spread) -> bool:
        """Clearly above ``other``: both from at least :data:`MIN_REPEATS` repeats, the spreads
        do not overlap, and the medians are apart by more than :data:`CLEAR_Z` standard errors
        of the run's noise (the larger of the two metrics' :attr:`noise`, at least
        :data:`NOISE_FLOOR`): ``ln(a/b) ≥ Z·σ·√(1/n_a + 1/n_b)``."""
        if self.n < MIN_REPEATS or other.n < MIN_REPEATS or not self.low > other.high:
            return False
        if other.median <= 0:
            return False
        sigma = max(self.noise, other.noise, NOISE_FLOOR)
        needed = CLEAR_Z * sigma * math.sqrt(1 / self.n + 1 / other.n)
        return math.log(self.median / other.median) >= needed

    def below(self, other: Spread) -> bool:
        """Clearly below ``other`` (see :meth:`above`)."""
        return other.above(self)

    @property
    def repeated(self) -> bool:
        """From enough repeats to judge anything by."""
        return self.n >= MIN_REPEATS

    def format(self, digits: int = 0, scale: float = 1.0) -> str:
        """``median (low–high)``, or just the median for a single value or no spread."""
        median = _num(self.median * scale, digits)
        if self.n == 1 or self.low == self.high:
            return median
        return f"{median} ({_num(self.low * scale, digits)}–{_num(self.high * scale, digits)})"


@dataclass
class Cell:
    """Every repeat of one design under one workload at one concurrency."""

    design: str
    workload: str
    concurrency: int
    #: Runs measured (with a ``load``), and the one-line errors of the runs that were not.
    runs: int = 0
    failed: list[str] = field(default_factory=list)
    throughput: Spread | None = None
    #: Percentiles over repeats, from each run's ``latency_us``: label → spread.
    latency: dict[str, Spread] = field(default_factory=dict)
    #: Percentiles of all the runs' histograms merged (exactly): label → µs; plus "max", "count".
    pooled: dict[str, int] = field(default_factory=dict)
    #: Server CPU seconds per 1,000 requests — numerically, CPU milliseconds per request.
    cpu_s_per_1000: Spread | None = None
    #: …per 1,000 connections (persistent: of ``per_connection`` messages each).
    cpu_s_per_1000_connections: Spread | None = None
    memory_peak_bytes: Spread | None = None
    errors: dict[str, int] = field(default_factory=dict)
    starved: int = 0
    starved_waiting: int = 0
    #: How long the starved connections waited for their first echo, µs: the runs' starved
    #: histograms merged (label → µs, plus "max" and "count").
    starved_wait: dict[str, int] = field(default_factory=dict)
    listen_overflows: int = 0
    #: Packets dropped because a connection-tracking table was full (see probe.Conntrack):
    #: a cell with any measured the kernel's firewall table, and is not compared.
    conntrack_drops: int = 0
    #: kv: the runs whose no-lost-update check was made, those it failed (an update lost or
    #: extra: the run measured a broken server, and is not compared), the INCRs acknowledged.
    kv_checked: int = 0
    kv_failed: int = 0
    kv_acknowledged: int = 0
    kv_examples: list[str] = field(default_factory=list)
    shed: int = 0
    loader_bound: bool = False
    #: Connections served by each worker (pid → n), one dict per run that kept them.
    per_worker: list[dict[str, int]] = field(default_factory=list)
    #: The pool each run actually ran with (pool designs): the larger of the workers alive at
    #: its end and the workers that served in it, from the server's statistics.
    pool: Spread | None = None

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def measured(self) -> bool:
        """At least one run completed requests."""
        return self.throughput is not None and self.throughput.high > 0

    @property
    def usable(self) -> bool:
        """Measured, not loader-bound and no packet dropped by a full connection-tracking
        table: fit to compare against another cell."""
        clean = not self.loader_bound and not self.conntrack_drops and not self.kv_failed
        return self.measured and clean

    def why_unusable(self) -> str:
        if not self.runs:
            what = f"every run failed ({self.failed[0]})" if self.failed else "no run"
            return f"{self.design} {self.workload} c={self.concurrency}: {what}"
        if not self.measured:
            return f"{self.design} {self.workload} c={self.concurrency}: no request completed"
        if self.loader_bound:
            return f"{self.design} {self.workload} c={self.concurrency}: loader-bound"
        if self.conntrack_drops:
            return (
                f"{self.design} {self.workload} c={self.concurrency}: the kernel's "
                f"connection-tracking table was full ({self.conntrack_drops:,} packets dropped)"
            )
        if self.kv_failed:
            return (
                f"{self.design} {self.workload} c={self.concurrency}: lost or extra updates in "
                f"{self.kv_failed} of {self.kv_checked} runs"
            )
        return ""

    def flags(self) -> list[str]:
        """What the tables point out about the cell."""
        flags = []
        if self.loader_bound:
            flags.append("LOADER-BOUND")
        if self.failed:
            flags.append(f"FAILED {len(self.failed)}/{len(self.failed) + self.runs}")
        elif not self.measured:
            flags.append("NO REQUESTS")
        if self.starved:
            flags.append(f"starved {self.starved:,} (see Starved connections)")
        if self.shed:
            flags.append(f"shed {self.shed:,}")
        if self.listen_overflows:
            flags.append(f"overflows {self.listen_overflows:,}")
        if self.conntrack_drops:
            flags.append(f"CONNTRACK FULL: {self.conntrack_drops:,} dropped")
        if self.kv_failed:
            flags.append(f"LOST UPDATES in {self.kv_failed}/{self.kv_checked} runs")
        if self.runs == 1:
            flags.append("single run")
        return flags


def _num(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _as_int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def aggregate(results: Mapping[str, Any]) -> list[Cell]:
    """The runs grouped by (design, workload, concurrency), in the matrix's order."""
    cells: dict[tuple[str, str, int], Cell] = {}
    members: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for run in results.get("runs", []):
        key = (str(run.get("design")), str(run.get("workload")), _as_int(run.get("concurrency")))
        cell = cells.setdefault(key, Cell(*key))
        if "error" in run or not isinstance(run.get("load"), Mapping):
            cell.failed.append(str(run.get("error", "no load result")))
            continue
        members.setdefault(key, []).append(run)

    for key, runs in members.items():
        _fill(cells[key], runs)
    _set_noise(list(cells.values()))

    designs = design_order(results)
    workloads = list(results.get("matrix", {}).get("workloads", []))

    def order(cell: Cell) -> tuple[int, int, int, str, str]:
        d = designs.index(cell.design) if cell.design in designs else len(designs)
        w = workloads.index(cell.workload) if cell.workload in workloads else len(workloads)
        return (w, d, cell.concurrency, cell.workload, cell.design)

    return sorted(cells.values(), key=order)


#: The metrics whose spreads the claims compare, and so carry the run's noise.
JUDGED = ("throughput", "cpu_s_per_1000")


def noise(spreads: Iterable[Spread | None]) -> float:
    """The pooled standard deviation of the log of the values (the relative noise between
    repeats), over the spreads with at least two positive values; 0 when there is none."""
    squares, freedom = 0.0, 0
    for spread in spreads:
        if spread is None or spread.n < 2 or min(spread.values, default=0) <= 0:
            continue
        logs = [math.log(v) for v in spread.values]
        squares += statistics.variance(logs) * (len(logs) - 1)
        freedom += len(logs) - 1
    return math.sqrt(squares / freedom) if freedom else 0.0


def _set_noise(cells: Sequence[Cell]) -> None:
    """Give every judged spread the run's noise of its metric, pooled over the usable cells."""
    for metric in JUDGED:
        sigma = noise(getattr(c, metric) for c in cells if c.usable)
        for cell in cells:
            spread = getattr(cell, metric)
            if spread is not None:
                setattr(cell, metric, dataclasses.replace(spread, noise=sigma))


def _fill(cell: Cell, runs: Sequence[Mapping[str, Any]]) -> None:
    loads = [run["load"] for run in runs]
    servers: list[Mapping[str, Any]] = [run.get("server") or {} for run in runs]
    cell.runs = len(runs)
    cell.throughput = Spread.of(load.get("throughput_rps") for load in loads)
    for label in (*POOLED_PERCENTILES, "max"):
        spread = Spread.of(
            (load.get("latency_us") or {}).get(label)
            for load in loads
            if (load.get("latency_us") or {}).get("count", 1)
        )
        if spread is not None:
            cell.latency[label] = spread
    hists = [
        LatencyHistogram.decode(str(load["histogram"])) for load in loads if "histogram" in load
    ]
    pooled = LatencyHistogram.merged(hists)
    cell.pooled = {label: pooled.percentile(p) for label, p in POOLED_PERCENTILES.items()}
    cell.pooled["max"] = pooled.max
    cell.pooled["count"] = pooled.count
    cell.cpu_s_per_1000 = Spread.of(server.get("cpu_s_per_1000") for server in servers)
    cell.cpu_s_per_1000_connections = Spread.of(
        server.get("cpu_s_per_1000_connections") for server in servers
    )
    cell.memory_peak_bytes = Spread.of(
        server.get("memory_peak_bytes") or None for server in servers
    )
    for load in loads:
        for kind, n in (load.get("errors") or {}).items():
            if n:
                cell.errors[str(kind)] = cell.errors.get(str(kind), 0) + _as_int(n)
        starved = load.get("starved") or {}
        cell.starved += _as_int(starved.get("connections"))
        cell.starved_waiting += _as_int(starved.get("still_waiting"))
        cell.loader_bound = cell.loader_bound or bool(load.get("loader_bound"))
    waits = LatencyHistogram.merged(
        LatencyHistogram.decode(str(load["starved"]["histogram"]))
        for load in loads
        if (load.get("starved") or {}).get("histogram")
    )
    if waits.count:
        cell.starved_wait = {label: waits.percentile(p) for label, p in POOLED_PERCENTILES.items()}
        cell.starved_wait["max"] = waits.max
        cell.starved_wait["count"] = waits.count
    for run in runs:
        check = run.get("kv_check")
        if isinstance(check, Mapping):
            cell.kv_checked += 1
            cell.kv_acknowledged += _as_int(check.get("acknowledged"))
            if not check.get("ok"):
                cell.kv_failed += 1
                cell.kv_examples += [str(x) for x in check.get("examples") or []][:2]
    pools: list[int | None] = []
    for server in servers:
        cell.listen_overflows += _as_int(server.get("listen_overflows"))
        cell.conntrack_drops += _as_int(server.get("conntrack_drops"))
        stats = server.get("stats") or {}
        cell.shed += _as_int(stats.get("shed"))
        per_worker = stats.get("per_worker") or {}
        if not per_worker:
            continue
        cell.per_worker.append({str(k): _as_int(v) for k, v in per_worker.items()})
        # Only a pool counts by worker: a design without per-worker counts has no pool.
        pools.append(max(_as_int(stats.get("workers_alive")), len(per_worker)) or None)
    cell.pool = Spread.of(pools)


@dataclass
class CurvePoint:
    """Every repeat of one design's open-loop run at one share of its closed-loop maximum."""

    design: str
    fraction: float
    offered: float  # requests/s asked for (the median over repeats)
    runs: int = 0
    failed: list[str] = field(default_factory=list)
    throughput: Spread | None = None
    latency: dict[str, Spread] = field(default_factory=dict)  # p50, p99 over repeats
    errors: int = 0
    unsent: int = 0


def curve_points(results: Mapping[str, Any]) -> list[CurvePoint]:
    """The latency curve's runs grouped by (design, share of its maximum), in run order."""
    curve = results.get("latency_curve") or {}
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for run in curve.get("runs", []):
        groups.setdefault((str(run.get("design")), float(run.get("fraction") or 0.0)), []).append(
            run
        )
    points = []
    for (design, fraction), runs in groups.items():
        rates = [float(r["rate"]) for r in runs if r.get("rate")]
        point = CurvePoint(design, fraction, statistics.median(rates) if rates else 0.0)
        loads = [r["load"] for r in runs if "error" not in r and isinstance(r.get("load"), Mapping)]
        point.failed = [str(r["error"]) for r in runs if "error" in r]
        point.runs = len(loads)
        point.throughput = Spread.of(load.get("throughput_rps") for load in loads)
        for label in ("p50", "p99"):
            spread = Spread.of(
                (load.get("latency_us") or {}).get(label)
                for load in loads
                if (load.get("latency_us") or {}).get("count", 1)
            )
            if spread is not None:
                point.latency[label] = spread
        point.errors = sum(_as_int(load.get("errors_total")) for load in loads)
        point.unsent = sum(_as_int(load.get("unsent")) for load in loads)
        points.append(point)
    return points


def curve_lines(results: Mapping[str, Any], points: Sequence[CurvePoint]) -> list[str]:
    """The latency curve's section: each design's maximum, and a row per offered load."""
    curve = results.get("latency_curve") or {}
    lines = [
        "## Latency under offered load",
        "",
        "Open loop (the wrk2 way): requests sent on a fixed schedule at a share of each "
        "design's closed-loop maximum throughput, connect-per-request, latency measured from "
        "each request's intended send time — so waiting in a queue is in it.",
        "",
    ]
    for design, maximum in (curve.get("maximum") or {}).items():
        if "throughput_rps" in maximum:
            found = (
                f"{maximum['throughput_rps']:,.0f} req/s closed loop at c={maximum['concurrency']}"
            )
        else:
            found = f"not measured ({maximum.get('error', 'no closed-loop run')})"
        lines.append(f"- {design}: maximum {found}, from {maximum.get('source', '?')}")
    header = ["design", "offered", "req/s offered", "req/s achieved", "p50 µs", "p99 µs", "errors"]
    rows = []
    for point in points:
        errors = f"{point.errors:,}" + (f", unsent {point.unsent:,}" if point.unsent else "")
        if point.failed and not point.runs:
            errors = f"FAILED: {point.failed[0]}"
        rows.append(
            [
                point.design,
                f"{point.fraction:.0%}",
                f"{point.offered:,.0f}",
                _cell_text(point.throughput),
                _cell_text(point.latency.get("p50")),
                _cell_text(point.latency.get("p99")),
                errors,
            ]
        )
    return [*lines, "", *_table(header, rows), ""]


def design_order(results: Mapping[str, Any]) -> list[str]:
    """The matrix's designs, then any other design a run names, in order of appearance."""
    order = [str(d) for d in results.get("matrix", {}).get("designs", [])]
    for run in results.get("runs", []):
        if str(run.get("design")) not in order:
            order.append(str(run.get("design")))
    return order


def cells_for(cells: Iterable[Cell], design: str, workload: str) -> dict[int, Cell]:
    """``design``'s cells under ``workload``, by concurrency."""
    return {c.concurrency: c for c in cells if c.design == design and c.workload == workload}


def primary_workload(cells: Sequence[Cell]) -> str | None:
    """connect-per-request if it ran, else the first workload that did."""
    workloads = [c.workload for c in cells]
    if CONNECT_PER_REQUEST in workloads:
        return CONNECT_PER_REQUEST
    return workloads[0] if workloads else None


def top_cells(cells: Sequence[Cell], designs: Sequence[str], workload: str) -> list[Cell]:
    """Each design's cell at its highest concurrency under ``workload``."""
    top = []
    for design in designs:
        mine = cells_for(cells, design, workload)
        if mine:
            top.append(mine[max(mine)])
    return top


# --- markdown ------------------------------------------------------------------------------------


def _cell_text(value: Spread | None, digits: int = 0, scale: float = 1.0) -> str:
    return value.format(digits, scale) if value is not None else "—"


def _errors_text(cell: Cell) -> str:
    if not cell.errors_total:
        return "0"
    kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(cell.errors.items()) if n)
    return f"{cell.errors_total:,} ({kinds})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def c_ratio(cell: Cell, cells: Sequence[Cell]) -> str:
    """The ×C column: ``cell``'s server CPU per request over that of the C peer of its family
    (``peer-c-<family>``) at the same workload and concurrency; "—" for a C ceiling, or when
    the C peer did not run there (or has no CPU figure)."""
    from lab.measure.compare import c_peer

    peer = c_peer(cell.design)
    if peer is None or cell.cpu_s_per_1000 is None:
        return "—"
    theirs = cells_for(cells, peer, cell.workload).get(cell.concurrency)
    if theirs is None or not theirs.measured or theirs.cpu_s_per_1000 is None:
        return "—"
    if theirs.cpu_s_per_1000.median <= 0:
        return "—"
    return f"×{cell.cpu_s_per_1000.median / theirs.cpu_s_per_1000.median:,.1f}"


def _pool_cell(cell: Cell) -> str:
    return _cell_text(cell.pool) if cell.pool is not None else "—"


def _summary_lines(results: Mapping[str, Any], cells: Sequence[Cell]) -> list[str]:
    workload = primary_workload(cells)
    if workload is None:
        return ["No run was measured."]
    rows = []
    for cell in top_cells(cells, design_order(results), workload):
        rows.append(
            [
                cell.design,
                str(cell.concurrency),
                _pool_cell(cell),
                _cell_text(cell.throughput),
                _cell_text(cell.latency.get("p99")),
                _cell_text(cell.cpu_s_per_1000, 3),
                c_ratio(cell, cells),
                _errors_text(cell),
                ", ".join(cell.flags()),
            ]
        )
    header = [
        "design",
        "conc.",
        "pool",
        "req/s median (spread)",
        "p99 µs",
        "CPU ms/req",
        "×C",
        "errors",
        "flags",
    ]
    return [f"{workload}, each design at its highest concurrency:", "", *_table(header, rows)]


def summary_table(results: Mapping[str, Any]) -> str:
    """The summary table (markdown): one row per design at the highest concurrency of
    connect-per-request — what the CLI prints after a comparison."""
    return "\n".join(_summary_lines(results, aggregate(results)))


def _workload_lines(workload: str, cells: Sequence[Cell], designs: Sequence[str]) -> list[str]:
    persistent = workload != CONNECT_PER_REQUEST
    header = [
        "design",
        "conc.",
        "pool",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "pooled p99 / p99.9 µs",
        "CPU ms/req",
        *(["CPU ms/conn"] if persistent else []),
        "×C",
        "memory peak MiB",
        "errors",
        "flags",
    ]
    rows = []
    mine = [c for c in cells if c.workload == workload]
    for design in designs:
        for cell in sorted((c for c in mine if c.design == design), key=lambda c: c.concurrency):
            pooled = (
                f"{cell.pooled['p99']:,} / {cell.pooled['p99.9']:,}"
                if cell.pooled.get("count")
                else "—"
            )
            per_conn = [_cell_text(cell.cpu_s_per_1000_connections, 3)] if persistent else []
            rows.append(
                [
                    cell.design,
                    str(cell.concurrency),
                    _pool_cell(cell),
                    _cell_text(cell.throughput),
                    _cell_text(cell.latency.get("p50")),
                    _cell_text(cell.latency.get("p99")),
                    _cell_text(cell.latency.get("p99.9")),
                    pooled,
                    _cell_text(cell.cpu_s_per_1000, 3),
                    *per_conn,
                    c_ratio(cell, cells),
                    _cell_text(cell.memory_peak_bytes, 1, 1 / 2**20),
                    _errors_text(cell),
                    ", ".join(cell.flags()),
                ]
            )
    return [f"### {workload}", "", *_table(header, rows), ""]


def _ms(us: int) -> str:
    return f"{us / 1000:,.0f} ms" if us >= 10_000 else f"{us / 1000:,.1f} ms"


def starvation_lines(cells: Sequence[Cell]) -> list[str]:
    """One line per cell where connections were starved: how many, how long they waited, and
    why — a pool (or a process-per-connection server at its cap) serves so many connections at
    a time, and under persistent connections the rest wait their turn."""
    lines = []
    for cell in cells:
        if not cell.starved:
            continue
        waits = cell.starved_wait
        wait = (
            f"waited median {_ms(waits['p50'])}, p99 {_ms(waits['p99'])}, max {_ms(waits['max'])}"
            if waits.get("count")
            else "wait not recorded"
        )
        still = f", {cell.starved_waiting:,} still waiting when the run ended" * bool(
            cell.starved_waiting
        )
        runs = f"{cell.runs} run" + "s" * (cell.runs != 1)
        why = "more connections than the server serves at once"
        if cell.pool is not None and cell.pool.high < cell.concurrency:
            size = _cell_text(cell.pool)
            why = (
                f"its pool of {size} serves {size} connections at a time; the other "
                f"{cell.concurrency - int(cell.pool.high):,} of {cell.concurrency} wait their turn"
            )
        lines.append(
            f"- **{cell.design}**, {cell.workload}, c={cell.concurrency}: {cell.starved:,} "
            f"connections starved over {runs} — {wait}{still}: {why}. Its throughput is that "
            "of the connections served, not of the server under this concurrency."
        )
    return lines


# --- the full compare's experiments (lab.measure.distribution, lab.measure.experiments) ---------


def experiment_cells(results: Mapping[str, Any], key: str, by: str) -> dict[int, list[Cell]]:
    """An experiment's runs (``results[key]``) aggregated as the sweep's are, one list of cells
    per value of ``by`` (the idle connections held, the pool size)."""
    part = results.get(key) or {}
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for run in part.get("runs", []) if isinstance(part, Mapping) else []:
        groups.setdefault(_as_int(run.get(by)), []).append(run)
    order = {"matrix": {"designs": design_order(results)}}
    return {level: aggregate({**order, "runs": runs}) for level, runs in sorted(groups.items())}


def _by_design(cells: Sequence[Cell]) -> dict[str, Cell]:
    return {c.design: c for c in cells}


def busiest_share(counts: Mapping[str, int]) -> float | None:
    """The busiest worker's share of the connections (1/workers is an even spread)."""
    total = sum(counts.values())
    return max(counts.values()) / total if total else None


def kv_lines(cells: Sequence[Cell], designs: Sequence[str], matrix: Mapping[str, Any]) -> list[str]:
    """The kv workload's own section: what it runs, and per design the no-lost-update check
    (lab.measure.kvcheck) over every run of it."""
    mine = [c for c in cells if c.workload == KV and c.kv_checked]
    if not mine:
        return []
    lines = [
        "## The worker that does real work (kv)",
        "",
        f"In the kv workload each request is one command of {matrix.get('mix', '?')} on "
        f"{_as_int(matrix.get('keys')):,} keys ({matrix.get('distribution', '?')}), "
        f"{matrix.get('per_connection', '?')} commands a connection, served by the design "
        "with `--service kv` from one SQLite file (WAL, a transaction per command): the same "
        "designs as under echo, now doing I/O. After every run the counters its INCRs touched "
        "were read through the server and straight from the file, and held against the INCRs "
        "the loaders had acknowledged (no lost update: acknowledged ≤ stored ≤ acknowledged + "
        "unanswered, per counter).",
        "",
    ]
    header = ["design", "runs checked", "INCRs acknowledged", "no lost update"]
    rows = []
    for design in designs:
        found = [c for c in mine if c.design == design]
        if not found:
            continue
        checked = sum(c.kv_checked for c in found)
        failed = sum(c.kv_failed for c in found)
        examples = [x for c in found for x in c.kv_examples][:2]
        verdict = "yes" if not failed else f"**NO** ({failed} runs: {'; '.join(examples)})"
        rows.append([design, str(checked), f"{sum(c.kv_acknowledged for c in found):,}", verdict])
    return [*lines, *_table(header, rows), ""]


def spread_lines(cells: Sequence[Cell], designs: Sequence[str]) -> list[str]:
    """Connections across workers at the lowest and the highest concurrency, for each design
    whose statistics count by worker: the busiest worker's share, median over repeats."""
    from lab.measure.compare import POOL_DESIGNS, base_design

    workload = primary_workload(cells)
    if workload is None:
        return []
    rows = []
    for design in designs:
        mine = {
            c: cell for c, cell in cells_for(cells, design, workload).items() if cell.per_worker
        }
        if not mine or base_design(design) not in POOL_DESIGNS:
            continue  # one process (iterative) counts by worker too: itself
        texts = []
        for concurrency in sorted({min(mine), max(mine)}):
            cell = mine[concurrency]
            shares = Spread.of(busiest_share(counts) for counts in cell.per_worker)
            size = max(len(counts) for counts in cell.per_worker)
            pool = int(cell.pool.high) if cell.pool is not None else size
            texts.append(
                f"c={concurrency}: {_cell_text(shares, 2)} (even: {1 / max(pool, 1):.2f}, "
                f"{size} of {pool} served)"
            )
        rows.append([design, _model(design), *texts, *([""] * (2 - len(texts)))])
    if not rows:
        return []
    return [
        "## Connections across workers",
        "",
        f"{workload}: the busiest worker's share of the connections each run (median, spread over "
        "repeats) at the lowest and the highest concurrency; a plot per design shows every "
        "worker.",
        "",
        *_table(["design", "serves with", "low load", "high load"], rows),
        "",
    ]


def _model(name: str) -> str:
    from lab.measure.compare import base_design
    from lab.sockets.designs import DESIGNS

    design = base_design(name)
    return DESIGNS[design].model if design is not None else ""


def distribution_lines(results: Mapping[str, Any]) -> list[str]:
    """Cloudflare's experiment: which worker served each sequential connection."""
    found = results.get("distribution")
    if not isinstance(found, Mapping) or not found.get("designs"):
        return []
    from lab.measure.distribution import EXPECTED

    rows = []
    for name, record in found["designs"].items():
        if "error" in record:
            rows.append([name, _model(name), f"FAILED: {record['error']}", "", "", ""])
            continue
        rounds = record.get("rounds") or []
        served = "; ".join(
            ",".join("?" if w is None else str(w) for w in r.get("served_by") or []) for r in rounds
        )
        counts = "; ".join(",".join(str(n) for n in r.get("counts") or []) for r in rounds)
        rows.append(
            [
                name,
                _model(name),
                served,
                counts,
                str(record.get("pattern", "?")),
                EXPECTED.get(name, "—"),
            ]
        )
    return [
        "## Sequential connections across workers",
        "",
        f"Cloudflare's experiment (2017): --workers {found.get('workers')}, "
        f"{found.get('connections')} connections one after another (each closed before the next "
        f"opens), {found.get('rounds')} rounds on the same server; the server's per-worker counts "
        "after each connection say which worker served it (workers numbered in the order they "
        "first served). Blocking accept() queues its waiters FIFO: round-robin; EPOLLEXCLUSIVE "
        "wakes the most recently idle: one worker takes them all.",
        "",
        *_table(
            [
                "design",
                "serves with",
                "served by (each round)",
                "per worker",
                "pattern",
                "expected",
            ],
            rows,
        ),
        "",
    ]


def _kept(before: Cell | None, after: Cell | None) -> float | None:
    if before is None or after is None or before.throughput is None or after.throughput is None:
        return None
    if before.throughput.median <= 0:
        return None
    return after.throughput.median / before.throughput.median


def idle_groups(designs: Sequence[str]) -> dict[str, list[str]]:
    """The designs by how idle connections can hold them, from their declarations: a pool
    whose workers serve one connection at a time, an event loop (no serial options: it serves
    every connection it accepted), or a server per connection (one process, thread, program —
    or one at a time)."""
    from lab.sockets.designs import DESIGNS

    groups: dict[str, list[str]] = {"pools": [], "event loops": [], "the others": []}
    for name in designs:
        design = DESIGNS[name]
        if design.serial_options is None:
            groups["event loops"].append(name)
        elif design.pool_of is not None:
            groups["pools"].append(name)
        else:
            groups["the others"].append(name)
    return groups


def idle_lines(results: Mapping[str, Any]) -> list[str]:
    """Active throughput with idle connections held open, design by design."""
    found = results.get("idle")
    levels = experiment_cells(results, "idle", "idle")
    if not isinstance(found, Mapping) or len(levels) < 2:
        return []
    low, high = min(levels), max(levels)
    none, held = _by_design(levels[low]), _by_design(levels[high])
    designs = list(dict.fromkeys([*none, *held]))
    rows = []
    kept: dict[str, float] = {}
    for name in designs:
        a, b = none.get(name), held.get(name)
        share = _kept(a, b)
        if share is not None:
            kept[name] = share
        flags = ", ".join(b.flags()) if b is not None else "did not run"
        rows.append(
            [
                name,
                _model(name),
                _cell_text(a.throughput if a else None),
                _cell_text(b.throughput if b else None),
                f"{share:.0%}" if share is not None else "—",
                flags,
            ]
        )
    sentences = []
    for group, names in idle_groups(designs).items():
        shown = [f"{n} {kept[n]:.0%}" for n in names if n in kept]
        if shown:
            sentences.append(f"{group} kept {', '.join(shown)}")
    sentence = (
        f"With {high} idle connections held open (one per pool worker), "
        + "; ".join(sentences)
        + " of their throughput. A pool's worker serving an idle client is held by it; an event "
        "loop is not, and a server per connection starts one more."
        if sentences
        else "No design was measured both with and without idle connections."
    )
    return [
        "## Idle connections",
        "",
        f"{found.get('concurrency')} active clients, connect-per-request, "
        f"{found.get('duration')} s per run, first with {low} and then with {high} idle "
        "connections held open (connected, sending nothing) for the whole run.",
        "",
        sentence,
        "",
        *_table(
            [
                "design",
                "serves with",
                f"req/s, {low} idle",
                f"req/s, {high} idle",
                "kept",
                f"flags ({high} idle)",
            ],
            rows,
        ),
        "",
    ]


def pool_size_lines(results: Mapping[str, Any]) -> list[str]:
    """Every pool design at each pool size: throughput and CPU per request, and what doubling
    the pool beyond the machine's cores gave."""
    found = results.get("pool_sizes")
    sizes = experiment_cells(results, "pool_sizes", "workers")
    if not isinstance(found, Mapping) or not sizes:
        return []
    by_size = {w: _by_design(cells) for w, cells in sizes.items()}
    designs = list(dict.fromkeys(d for cells in by_size.values() for d in cells))
    cores = (results.get("environment") or {}).get("cores")
    rows, notes = [], []
    for name in designs:
        cells = [by_size[w].get(name) for w in sizes]
        tps = [c.throughput if c else None for c in cells]
        cpus = [c.cpu_s_per_1000 if c else None for c in cells]
        rows.append(
            [
                name,
                *(_cell_text(tp) for tp in tps),
                *(_cell_text(cpu, 3) for cpu in cpus),
            ]
        )
        if isinstance(cores, int) and cores in sizes and max(sizes) > cores:
            at, beyond = by_size[cores].get(name), by_size[max(sizes)].get(name)
            if at and beyond and at.throughput and beyond.throughput and at.throughput.median:
                ratio = beyond.throughput.median / at.throughput.median
                clear = (
                    "more"
                    if beyond.throughput.above(at.throughput)
                    else "less"
                    if beyond.throughput.below(at.throughput)
                    else "no clear change"
                )
                notes.append(f"{name} ×{ratio:.2f} ({clear})")
    header = [
        "design",
        *(f"req/s, {w} worker{'s' * (w != 1)}" for w in sizes),
        *(f"CPU ms/req, {w}" for w in sizes),
    ]
    sentence = (
        f"From {cores} workers (this machine's cores) to {max(sizes)}, throughput went "
        + ", ".join(notes)
        + "."
        if notes
        else ""
    )
    return [
        "## Pool size",
        "",
        f"Every pool design at --workers {', '.join(str(w) for w in sizes)}, connect-per-request "
        f"at concurrency {found.get('concurrency')}, {found.get('duration')} s per run "
        f"(cores: {cores if cores is not None else '?'}).",
        "",
        *([sentence, ""] if sentence else []),
        *_table(header, rows),
        "",
    ]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{name}.")
        elif isinstance(value, list | tuple):
            items.append((name, ", ".join(str(v) for v in value) or "—"))
        else:
            items.append((name, "—" if value is None else str(value)))
    return items


def _variant_lines(designs: Sequence[str]) -> list[str]:
    """What each variant in the run is (from compare.VARIANTS)."""
    from lab.measure.compare import VARIANTS

    found = [f"- **{name}**: {VARIANTS[name].label}" for name in designs if name in VARIANTS]
    return ["Variants:", "", *found, ""] if found else []


def _order_text(results: Mapping[str, Any]) -> str:
    """How the sweep ordered its repeats, and what that means for the verdicts (a run from
    before results kept ``order`` ran design by design)."""
    from lab.measure.compare import BY_DESIGN, INTERLEAVED, ROUNDS

    order = results.get("order", BY_DESIGN)
    if order == ROUNDS:
        return (
            "**in rounds** (one round of every design per repeat, reversed on odd rounds, the "
            "server restarted for each design's turn): a design's repeats lie a round apart, "
            "so a machine that drifted during the run widens each cell's spread rather than "
            "passing for a difference between designs"
        )
    if order == INTERLEAVED:
        return (
            "**repeats interleaved** (repeat 1 of every design, then repeat 2 …, every server "
            "started once): a machine that drifted during the run widens each cell's spread "
            "rather than passing for a difference between designs"
        )
    if order == BY_DESIGN:
        return (
            "**design by design**, each design's repeats one after another (one server at a "
            "time): a verdict rests on consecutive repeats, so drift of the machine between "
            "one design's turn and the next does not show in the spreads; the control claim "
            "shows whether it fooled the judging"
        )
    return str(order)


# --- lab compare --robustness (lab.measure.robustness, lab.measure.faultbench) ------------------
def robustness_lines(results: Mapping[str, Any]) -> list[str]:
    """The battery's table: design × check, each a figure and ✓/✗, a sentence per design."""
    found = results.get("robustness")
    if not found:
        return []
    from lab.measure.robustness import Check, table_markdown

    checks = [Check(**c) for c in found]
    failed = [f"{c.design} {c.check}" for c in checks if c.passed is False]
    return [
        "## Robustness",
        "",
        "Each design on a fresh local server (`--idle-timeout 3`, 2 workers): a connection storm "
        "far beyond the backlog, idle clients ahead of a normal one (`--idle-timeout 1`), a "
        "client that never reads, an 8 MiB echo, connections one after another (descriptors, "
        "zombies, memory before and after), random bytes with random chunking, half-closes and "
        "resets, a worker killed and the server paused under load. ✓ passed, ✗ failed, — does "
        "not apply (`lab soak` runs the same battery on its own).",
        "",
        table_markdown(checks),
        f"Failed: {', '.join(failed)}." if failed else "Every check passed.",
        "",
    ]


def fault_bench_lines(results: Mapping[str, Any]) -> list[str]:
    """The fault benches: what each fault did to each design's run."""
    found = results.get("faults")
    if not found:
        return []
    rows = []
    for entry in found:
        run = entry.get("run")
        if run is None or run.get("error"):
            why = entry.get("error") or (run or {}).get("error", "?")
            rows.append([entry["design"], entry["fault"], "—", "—", "—", "—", f"not run: {why}"])
            continue
        before, during = run["before_rps"], run["during_rps"]
        back = run["recovery_s"]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(run["errors"].items())) or "none"
        rows.append(
            [
                entry["design"],
                entry["fault"],
                f"{before:,.0f}",
                f"{during:,.0f} ({during / before:.0%})" if before else f"{during:,.0f}",
                f"{back:.1f} s" if back is not None else "not back",
                f"{run['lost']} of {run['in_flight']} ({errors})",
                "yes" if run["verified"] else "CORRUPTED",
            ]
        )
    header = ["design", "fault", "req/s before", "req/s during", "back after", "lost", "verified"]
    return [
        "## Under faults",
        "",
        "Each design with a fault injected 1 s into a 5 s run at concurrency 6 (`lab bench "
        "--fault`): a worker SIGKILLed under a persistent load (the process designs: at most "
        "the connections that worker held should fail, and the service be back at once), and "
        "in the containers one slow client (300 ms each way on client 1's path for 2 s, "
        "connect-per-request): a design whose every server of connections is held by the "
        "slow client's connections stalls for everyone (head-of-line blocking: iterative's "
        "one; a pool of 2 held by that client's 2 connections), while one that has a thread, "
        "a process or a loop to spare — or grows its pool — keeps most of its throughput. "
        "During: the fault's own stretch (1 s after a kill). Back: three 100 ms intervals in a "
        "row averaging 80 % of the lower quartile of those before.",
        "",
        *_table(header, rows),
        "",
    ]


def render(results: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; the report's path."""
    from lab.measure.claims import evaluate
    from lab.measure.plots import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    cells = aggregate(results)
    designs = design_order(results)
    workloads = list(dict.fromkeys(c.workload for c in cells))
    backend = str(results.get("backend", "?"))
    backend_text = {
        "local": "local (processes on loopback)",
        "docker": "docker (the containerised lab)",
    }.get(backend, backend)
    matrix = results.get("matrix", {})
    mode = "quick" if results.get("quick") else "full"

    lines = [
        f"# Server-design comparison — run {results.get('run_id', '?')}",
        "",
        f"- backend: **{backend_text}**",
        f"- mode: **{mode}** ({matrix.get('repeats', '?')} repeat(s) of "
        f"{matrix.get('duration', '?')} s after a {matrix.get('warmup', '?')} s warm-up)",
        f"- order: {_order_text(results)}",
        f"- created: {results.get('created', '?')}",
        "",
        "Numbers are medians over repeats with their spread (min–max) in parentheses. A request "
        "is one echoed message, in both workloads and for designs and peers alike: CPU ms/req "
        "is the server's CPU over the measured window per message verified in it (CPU ms/conn: "
        "per connection of "
        f"{matrix.get('per_connection', '?')} messages, persistent). **pool** is the number of "
        "workers each run actually had (from the server's statistics); every pool runs with "
        f"--workers {matrix.get('workers', '?')} and may not grow past it, except where a "
        "variant says so. **×C** is a design's CPU per request over that of the C peer of its "
        "family (peer-c-<family>) at the same workload and concurrency (— when it did not run); "
        "the stdlib peers are read the same way (threading against peer-c-prefork, forking and "
        "socat against peer-c-fork, asyncio against peer-c-epoll), as is peer-c-sendmsg against "
        "peer-c-prefork. "
        "**LOADER-BOUND** marks a cell whose loaders were the bottleneck: its throughput and "
        "latency measure the loader, not the server.",
        "",
        *_variant_lines(designs),
        "## Summary",
        "",
        *_summary_lines(results, cells),
        "",
        "## Results by workload",
        "",
    ]
    for workload in workloads:
        lines += _workload_lines(workload, cells, designs)

    lines += kv_lines(cells, designs, matrix)

    starved = starvation_lines(cells)
    if starved:
        lines += ["## Starved connections", "", *starved, ""]

    lines += spread_lines(cells, designs)
    lines += distribution_lines(results)
    lines += idle_lines(results)
    lines += pool_size_lines(results)
    lines += fault_bench_lines(results)
    lines += robustness_lines(results)

    lines += [
        "## Claims",
        "",
        "A verdict calls a difference only when both cells have at least two repeats, their "
        "spreads do not overlap, and their medians are further apart than the run's own "
        "repeat-to-repeat noise allows by chance; a single run is never clear. Pools of "
        "unequal size are never compared. The last claim is the control: a design against an "
        "identical copy of itself, which must come out inconclusive.",
        "",
    ]
    for claim in evaluate(results):
        lines += [
            f"### {claim.number}. {claim.statement} — **{claim.verdict}**",
            "",
            f"- source: {claim.source}",
            f"- measured: {claim.measurement}",
            *(f"- {line}" for line in claim.evidence.splitlines()),
            "",
        ]

    points = curve_points(results)
    if results.get("latency_curve"):
        lines += curve_lines(results, points)

    drawn, notes = draw(cells, designs, out_dir, points, results)
    lines += ["## Plots", ""]
    for plot in drawn:
        lines += [f"![{plot.title}]({plot.filename})", ""]
    if not drawn:
        lines += ["No plot could be drawn.", ""]
    lines += [f"- note: {note}" for note in notes]
    if notes:
        lines.append("")

    lines += ["## Environment", ""]
    environment = results.get("environment") or {}
    lines += [f"- {name}: {value}" for name, value in _flatten(environment)] or ["- (none)"]
    lines += ["", "Matrix:", ""]
    lines += [f"- {name}: {value}" for name, value in _flatten(matrix)] or ["- (none)"]
    lines += [
        "",
        "## Reproduce",
        "",
        "```sh",
        str(results.get("command") or "lab compare"),
        "```",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
