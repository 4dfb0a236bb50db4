"""The report of a ``lab compare`` run: ``results.json`` aggregated, tabulated, judged and drawn.

:func:`aggregate` groups the runs by (design, workload, concurrency) across repeats into
:class:`Cell` s — the median and spread (min–max over repeats) of every number, latency
histograms merged exactly into pooled percentiles, errors and starved connections summed.
:func:`render` writes ``report.md`` and its PNG plots; :func:`summary_table` is the table the
CLI prints. The claims are judged in :mod:`lab.measure.claims`, the plots drawn in
:mod:`lab.measure.plots` (matplotlib is imported only there, and only when drawing).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.measure.histogram import LatencyHistogram

__all__ = [
    "CONNECT_PER_REQUEST",
    "POOLED_PERCENTILES",
    "Cell",
    "Spread",
    "aggregate",
    "cells_for",
    "design_order",
    "render",
    "summary_table",
]

CONNECT_PER_REQUEST = "connect-per-request"

#: Pooled percentiles read from the merged histogram: label → percent.
POOLED_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


@dataclass(frozen=True)
class Spread:
    """The median of values over repeats, and their range (min–max)."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | int | None]) -> Spread | None:
        """The spread of the values that are present; None when none is."""
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present))

    def above(self, other: Spread) -> bool:
        """Clearly above ``other``: the spreads do not overlap."""
        return self.low > other.high

    def below(self, other: Spread) -> bool:
        """Clearly below ``other``: the spreads do not overlap."""
        return self.high < other.low

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
    memory_peak_bytes: Spread | None = None
    errors: dict[str, int] = field(default_factory=dict)
    starved: int = 0
    starved_waiting: int = 0
    listen_overflows: int = 0
    shed: int = 0
    loader_bound: bool = False
    #: Connections served by each worker (pid → n), one dict per run that kept them.
    per_worker: list[dict[str, int]] = field(default_factory=list)

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def measured(self) -> bool:
        """At least one run completed requests."""
        return self.throughput is not None and self.throughput.high > 0

    @property
    def usable(self) -> bool:
        """Measured and not loader-bound: fit to compare against another cell."""
        return self.measured and not self.loader_bound

    def why_unusable(self) -> str:
        if not self.runs:
            what = f"every run failed ({self.failed[0]})" if self.failed else "no run"
            return f"{self.design} {self.workload} c={self.concurrency}: {what}"
        if not self.measured:
            return f"{self.design} {self.workload} c={self.concurrency}: no request completed"
        if self.loader_bound:
            return f"{self.design} {self.workload} c={self.concurrency}: loader-bound"
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
            flags.append(f"starved {self.starved:,}")
        if self.shed:
            flags.append(f"shed {self.shed:,}")
        if self.listen_overflows:
            flags.append(f"overflows {self.listen_overflows:,}")
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

    designs = design_order(results)
    workloads = list(results.get("matrix", {}).get("workloads", []))

    def order(cell: Cell) -> tuple[int, int, int, str, str]:
        d = designs.index(cell.design) if cell.design in designs else len(designs)
        w = workloads.index(cell.workload) if cell.workload in workloads else len(workloads)
        return (w, d, cell.concurrency, cell.workload, cell.design)

    return sorted(cells.values(), key=order)


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
    for server in servers:
        cell.listen_overflows += _as_int(server.get("listen_overflows"))
        stats = server.get("stats") or {}
        cell.shed += _as_int(stats.get("shed"))
        per_worker = stats.get("per_worker") or {}
        if per_worker:
            cell.per_worker.append({str(k): _as_int(v) for k, v in per_worker.items()})


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
                _cell_text(cell.throughput),
                _cell_text(cell.latency.get("p99")),
                _cell_text(cell.cpu_s_per_1000, 3),
                _errors_text(cell),
                ", ".join(cell.flags()),
            ]
        )
    header = ["design", "conc.", "req/s median (spread)", "p99 µs", "CPU ms/req", "errors", "flags"]
    return [f"{workload}, each design at its highest concurrency:", "", *_table(header, rows)]


def summary_table(results: Mapping[str, Any]) -> str:
    """The summary table (markdown): one row per design at the highest concurrency of
    connect-per-request — what the CLI prints after a comparison."""
    return "\n".join(_summary_lines(results, aggregate(results)))


def _workload_lines(workload: str, cells: Sequence[Cell], designs: Sequence[str]) -> list[str]:
    header = [
        "design",
        "conc.",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "pooled p99 / p99.9 µs",
        "CPU ms/req",
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
            rows.append(
                [
                    cell.design,
                    str(cell.concurrency),
                    _cell_text(cell.throughput),
                    _cell_text(cell.latency.get("p50")),
                    _cell_text(cell.latency.get("p99")),
                    _cell_text(cell.latency.get("p99.9")),
                    pooled,
                    _cell_text(cell.cpu_s_per_1000, 3),
                    _cell_text(cell.memory_peak_bytes, 1, 1 / 2**20),
                    _errors_text(cell),
                    ", ".join(cell.flags()),
                ]
            )
    return [f"### {workload}", "", *_table(header, rows), ""]


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
        f"- created: {results.get('created', '?')}",
        "",
        "Numbers are medians over repeats with their spread (min–max) in parentheses; "
        "CPU ms/req is the server's CPU time per request served. **LOADER-BOUND** marks a cell "
        "whose loaders were the bottleneck: its throughput and latency measure the loader, "
        "not the server.",
        "",
        "## Summary",
        "",
        *_summary_lines(results, cells),
        "",
        "## Results by workload",
        "",
    ]
    for workload in workloads:
        lines += _workload_lines(workload, cells, designs)

    lines += ["## Claims", ""]
    for claim in evaluate(results):
        lines += [
            f"### {claim.number}. {claim.statement} — **{claim.verdict}**",
            "",
            f"- source: {claim.source}",
            f"- measured: {claim.measurement}",
            *(f"- {line}" for line in claim.evidence.splitlines()),
            "",
        ]

    drawn, notes = draw(cells, designs, out_dir)
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
