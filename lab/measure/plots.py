"""The report's plots, as PNG files (matplotlib, Agg backend — imported only when drawing).

Every plot shows each cell's repeats — a dot per repeat beside the median and its spread — and
skips what it cannot draw (a design with errors only, a missing workload), saying so in a note
instead of failing the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.measure.report import (
    Cell,
    CurvePoint,
    Spread,
    cells_for,
    experiment_cells,
    primary_workload,
    top_cells,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Plot", "draw"]


@dataclass(frozen=True)
class Plot:
    filename: str  # relative to the report's directory
    title: str


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _repeats(ax: Axes, x: float, spread: Spread | None, color: object, floor: float = 0.0) -> None:
    """A dot per repeat at ``x`` (values at or below ``floor`` lifted to it: a log axis)."""
    if spread is None or not spread.values:
        return
    values = [max(v, floor) for v in spread.values]
    ax.scatter(
        [x] * len(values),
        values,
        s=18,
        color=color,
        edgecolors="black",
        linewidths=0.4,
        alpha=0.8,
        zorder=3,
    )


def _save(fig: Figure, out_dir: Path, filename: str, title: str) -> Plot:
    fig.savefig(out_dir / filename, dpi=100)
    return Plot(filename, title)


def draw(
    cells: Sequence[Cell],
    designs: Sequence[str],
    out_dir: Path,
    curve: Sequence[CurvePoint] = (),
    results: Mapping[str, Any] | None = None,
) -> tuple[list[Plot], list[str]]:
    """Draw every plot into ``out_dir`` (with ``results``, the full compare's experiments'
    too): the plots drawn, and notes on what was skipped."""
    plots: list[Plot] = []
    notes: list[str] = []
    workloads = list(dict.fromkeys(c.workload for c in cells))
    for workload in workloads:
        _throughput(cells, designs, workload, out_dir, plots, notes)
    for workload in workloads:
        _latency(cells, designs, workload, out_dir, plots, notes)
    _cpu(cells, designs, out_dir, plots, notes)
    _workers(cells, designs, out_dir, plots, notes)
    if curve:
        _curve(curve, out_dir, plots, notes)
    if results is not None:
        _idle(results, out_dir, plots, notes)
        _pool_sizes(results, out_dir, plots, notes)
        for fault in dict.fromkeys(f["fault"] for f in results.get("faults") or ()):
            _fault_series(results, fault, out_dir, plots)
    return plots, list(dict.fromkeys(notes))


def _fault_series(results: Mapping[str, Any], fault: str, out_dir: Path, plots: list[Plot]) -> None:
    """Each design's throughput, 100 ms by 100 ms, through one fault (shaded while it lasted)."""
    runs = [f for f in results.get("faults") or () if f["fault"] == fault and f.get("series")]
    if not runs:
        return
    fig = _figure(9.0, 4.5)
    ax = fig.add_subplot()
    shaded = False
    for entry in runs:
        series, run = entry["series"], entry["run"]
        step = float(series["step_s"])
        ok = series["ok"][:-1]  # the last interval may be partial
        ax.plot([i * step for i in range(len(ok))], [v / step for v in ok], label=entry["design"])
        if not shaded:
            start = run["at_s"]
            ax.axvspan(start, start + max(run["lasted_s"], step), color="grey", alpha=0.2)
            shaded = True
    ax.set_xlabel("seconds into the measured window (grey: the fault)")
    ax.set_ylabel("verified requests/s (100 ms intervals)")
    ax.set_title(f"Throughput through a fault: {fault}")
    ax.legend(fontsize="small", ncol=2)
    name = f"fault-{_slug(fault)}.png"
    plots.append(_save(fig, out_dir, name, f"Throughput through a fault: {fault}"))


def _curve(
    points: Sequence[CurvePoint], out_dir: Path, plots: list[Plot], notes: list[str]
) -> None:
    """p50 (solid) and p99 (dashed) against the offered load, a line per design."""
    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for design in dict.fromkeys(p.design for p in points):
        mine = sorted((p for p in points if p.design == design and p.runs), key=lambda p: p.offered)
        if not mine:
            notes.append(f"{design} (latency curve): no open-loop run completed — not plotted")
            continue
        color = None
        for label, style in (("p50", "-"), ("p99", "--")):
            shown = [(p.offered, p.latency[label]) for p in mine if label in p.latency]
            if not shown:
                continue
            (line,) = ax.plot(
                [x for x, _ in shown],
                [max(s.median, 1.0) for _, s in shown],
                style,
                marker="o",
                color=color,
                label=f"{design} {label}",
            )
            color = line.get_color()
            for x, spread in shown:
                _repeats(ax, x, spread, color, floor=1.0)
        drawn += 1
    if not drawn:
        notes.append("latency curve: nothing measured — plot skipped")
        return
    ax.set_yscale("log")
    shares = ", ".join(f"{f:.0%}" for f in sorted({p.fraction for p in points}))
    ax.set_xlabel(f"offered load, requests/s ({shares} of each design's maximum)")
    ax.set_ylabel("latency µs from intended send (log; dots: repeats)")
    ax.set_title("Latency vs offered load — open loop, connect-per-request")
    ax.legend(fontsize="small", ncols=2)
    ax.grid(True, alpha=0.3)
    plots.append(_save(fig, out_dir, "latency-curve.png", "Latency vs offered load"))


def _throughput(
    cells: Sequence[Cell],
    designs: Sequence[str],
    workload: str,
    out_dir: Path,
    plots: list[Plot],
    notes: list[str],
) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for design in designs:
        mine = cells_for(cells, design, workload)
        points = [
            (c, cell.throughput, cell.loader_bound)
            for c, cell in sorted(mine.items())
            if cell.measured and cell.throughput is not None
        ]
        if not points:
            if mine:
                notes.append(f"{design} ({workload}): no request completed — not plotted")
            continue
        xs = [c for c, _, _ in points]
        ys = [tp.median for _, tp, _ in points]
        errors = [
            [tp.median - tp.low for _, tp, _ in points],
            [tp.high - tp.median for _, tp, _ in points],
        ]
        line = ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=design)
        color = line.lines[0].get_color()
        for c, tp, _ in points:
            _repeats(ax, c, tp, color)
        bound = [(c, tp.median) for c, tp, lb in points if lb]
        if bound:
            ax.scatter(
                [x for x, _ in bound],
                [y for _, y in bound],
                marker="x",
                s=80,
                color=line.lines[0].get_color(),
            )
        drawn += 1
    if not drawn:
        notes.append(f"throughput ({workload}): nothing measured — plot skipped")
        return
    ax.set_xscale("log", base=2)
    ticks = sorted({c.concurrency for c in cells if c.workload == workload})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("concurrency (connections)")
    ax.set_ylabel("requests/s (median, min–max; dots: repeats)")
    ax.set_title(f"Throughput vs concurrency — {workload} (× loader-bound)")
    ax.legend(fontsize="small", ncols=2)
    ax.grid(True, alpha=0.3)
    name = f"throughput-{_slug(workload)}.png"
    plots.append(_save(fig, out_dir, name, f"Throughput vs concurrency, {workload}"))


def _latency(
    cells: Sequence[Cell],
    designs: Sequence[str],
    workload: str,
    out_dir: Path,
    plots: list[Plot],
    notes: list[str],
) -> None:
    top = [c for c in top_cells(cells, designs, workload) if c.measured and c.latency]
    if not top:
        notes.append(f"latency ({workload}): nothing measured — plot skipped")
        return
    labels = ("p50", "p99", "p99.9")
    fig = _figure(max(8.0, 1.0 * len(top) + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [max(c.latency[label].median, 1.0) if label in c.latency else 0 for c in top]
        bars = ax.bar([x + i * width for x in range(len(top))], values, width, label=label)
        color = bars.patches[0].get_facecolor() if bars.patches else None
        for x, cell in enumerate(top):
            _repeats(ax, x + i * width, cell.latency.get(label), color, floor=1.0)
    ax.set_yscale("log")
    ax.set_xticks([x + width for x in range(len(top))])
    ax.set_xticklabels(
        [
            f"{c.design}\nc={c.concurrency}" + ("\nLOADER-BOUND" if c.loader_bound else "")
            for c in top
        ],
        fontsize="small",
    )
    ax.set_ylabel("latency µs (median over repeats, log; dots: repeats)")
    ax.set_title(f"Latency percentiles at the highest concurrency — {workload}")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    name = f"latency-{_slug(workload)}.png"
    plots.append(_save(fig, out_dir, name, f"Latency percentiles, {workload}"))


def _cpu(
    cells: Sequence[Cell],
    designs: Sequence[str],
    out_dir: Path,
    plots: list[Plot],
    notes: list[str],
) -> None:
    workload = primary_workload(cells)
    if workload is None:
        return
    top = []
    for cell in top_cells(cells, designs, workload):
        cpu = cell.cpu_s_per_1000
        if cpu is None or cpu.median <= 0:
            notes.append(f"{cell.design} ({workload}): no server CPU per request — not plotted")
        else:
            top.append((cell, cpu))
    if not top:
        notes.append("server CPU per request: nothing measured — plot skipped")
        return
    fig = _figure(max(8.0, 0.9 * len(top) + 2), 4.5)
    ax = fig.add_subplot()
    xs = list(range(len(top)))
    medians = [cpu.median for _, cpu in top]
    errors = [
        [cpu.median - max(cpu.low, cpu.median * 1e-3) for _, cpu in top],
        [cpu.high - cpu.median for _, cpu in top],
    ]
    ax.bar(xs, medians, yerr=errors, capsize=3, color="tab:orange")
    for x, (_, cpu) in zip(xs, top, strict=True):
        _repeats(ax, x, cpu, "black", floor=cpu.median * 1e-3)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [f"{c.design}\nc={c.concurrency}" for c, _ in top], fontsize="small", rotation=0
    )
    ax.set_ylabel("server CPU ms per request (log; dots: repeats)")
    ax.set_title(f"Server CPU per request — {workload}, highest concurrency")
    ax.grid(True, axis="y", alpha=0.3)
    plots.append(_save(fig, out_dir, "cpu-per-request.png", "Server CPU per request"))


def _workers(
    cells: Sequence[Cell],
    designs: Sequence[str],
    out_dir: Path,
    plots: list[Plot],
    notes: list[str],
) -> None:
    """One plot per design whose statistics count by worker: the connections of every worker
    (busiest first, a bar per repeat) at the lowest and at the highest concurrency."""
    from lab.measure.compare import POOL_DESIGNS, base_design

    workload = primary_workload(cells)
    if workload is None:
        return
    drawn = 0
    for design in designs:
        mine = {
            c: cell for c, cell in cells_for(cells, design, workload).items() if cell.per_worker
        }
        if not mine or base_design(design) not in POOL_DESIGNS:
            continue  # one process (iterative) counts by worker too: itself
        loads = sorted({min(mine), max(mine)})
        fig = _figure(4.5 * len(loads), 3.2)
        axes = fig.subplots(1, len(loads), squeeze=False)[0]
        for ax, concurrency, label in zip(axes, loads, ("low load", "high load"), strict=False):
            cell = mine[concurrency]
            repeats = cell.per_worker
            slots = max(len(counts) for counts in repeats)
            if cell.pool is not None:
                slots = max(slots, int(cell.pool.high))  # workers that served none, at zero
            width = 0.8 / len(repeats)
            for r, counts in enumerate(repeats):
                ordered = sorted(counts.values(), reverse=True)
                ordered += [0] * (slots - len(ordered))
                ax.bar(
                    [x + r * width for x in range(slots)],
                    ordered,
                    width,
                    label=f"repeat {r + 1}",
                )
            title = label if len(loads) > 1 else "one concurrency"
            ax.set_title(f"{title}: c={concurrency}", fontsize="medium")
            ax.set_xticks(
                [x + width * (len(repeats) - 1) / 2 for x in range(slots)],
                [str(x + 1) for x in range(slots)],
            )
            ax.set_xlabel("worker (busiest first)")
            ax.set_ylabel("connections")
            if len(repeats) > 1:
                ax.legend(fontsize="x-small")
        fig.suptitle(f"{design}: connections per worker — {workload}", fontsize="medium")
        name = f"workers-{_slug(design)}.png"
        plots.append(_save(fig, out_dir, name, f"Connections per worker, {design}"))
        drawn += 1
    if not drawn:
        notes.append("per-worker distribution: no pool design kept per-worker counts — skipped")


def _grouped(
    ax: Axes, groups: Sequence[tuple[str, Sequence[Spread | None]]], labels: Sequence[str]
) -> None:
    """Bars of medians, a group per design and a bar per label, with a dot per repeat."""
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [x + i * width for x in range(len(groups))]
        values = [
            spread.median if (spread := spreads[i]) is not None else 0.0 for _, spreads in groups
        ]
        bars = ax.bar(xs, values, width, label=label)
        color = bars.patches[0].get_facecolor() if bars.patches else None
        for x, (_, spreads) in zip(xs, groups, strict=True):
            _repeats(ax, x, spreads[i], color)
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([name for name, _ in groups], fontsize="small", rotation=20)
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)


def _idle(results: Mapping[str, Any], out_dir: Path, plots: list[Plot], notes: list[str]) -> None:
    """Active throughput per design with no idle connection and with the idle ones held."""
    levels = experiment_cells(results, "idle", "idle")
    if not results.get("idle"):
        return
    if len(levels) < 2:
        notes.append("idle connections: fewer than two levels measured — plot skipped")
        return
    by_level = {level: {c.design: c for c in cells} for level, cells in levels.items()}
    designs = list(dict.fromkeys(d for cells in by_level.values() for d in cells))
    groups = [
        (
            d,
            [
                cell.throughput if (cell := by_level[level].get(d)) is not None else None
                for level in by_level
            ],
        )
        for d in designs
    ]
    fig = _figure(max(8.0, 0.9 * len(designs) + 2), 4.5)
    ax = fig.add_subplot()
    _grouped(ax, groups, [f"{level} idle connections" for level in by_level])
    ax.set_ylabel("active requests/s (median; dots: repeats)")
    ax.set_title(
        f"Throughput of {results['idle'].get('concurrency')} active clients with idle "
        "connections held open"
    )
    plots.append(_save(fig, out_dir, "idle-connections.png", "Throughput with idle connections"))


def _pool_sizes(
    results: Mapping[str, Any], out_dir: Path, plots: list[Plot], notes: list[str]
) -> None:
    """Throughput against the pool's size, a line per pool design."""
    sizes = experiment_cells(results, "pool_sizes", "workers")
    if not results.get("pool_sizes"):
        return
    if not sizes:
        notes.append("pool size: nothing measured — plot skipped")
        return
    by_size = {w: {c.design: c for c in cells} for w, cells in sizes.items()}
    designs = list(dict.fromkeys(d for cells in by_size.values() for d in cells))
    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for design in designs:
        points = [
            (w, cell.throughput)
            for w, cells in by_size.items()
            if (cell := cells.get(design)) is not None and cell.measured and cell.throughput
        ]
        if not points:
            notes.append(f"{design} (pool size): no request completed — not plotted")
            continue
        (line,) = ax.plot(
            [w for w, _ in points], [tp.median for _, tp in points], marker="o", label=design
        )
        for w, tp in points:
            _repeats(ax, w, tp, line.get_color())
        drawn += 1
    if not drawn:
        notes.append("pool size: nothing measured — plot skipped")
        return
    cores = (results.get("environment") or {}).get("cores")
    if isinstance(cores, int):
        ax.axvline(cores, color="grey", linestyle=":", label=f"{cores} cores")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(by_size), [str(w) for w in by_size])
    ax.minorticks_off()
    ax.set_xlabel("--workers")
    ax.set_ylabel("requests/s (median; dots: repeats)")
    concurrency = results["pool_sizes"].get("concurrency")
    ax.set_title(f"Throughput vs pool size — connect-per-request, c={concurrency}")
    ax.legend(fontsize="small", ncols=2)
    ax.grid(True, alpha=0.3)
    plots.append(_save(fig, out_dir, "pool-sizes.png", "Throughput vs pool size"))
