"""The human summary of a load result: a few lines, the numbers that matter first."""

from __future__ import annotations

from lab.measure.result import PERCENTILES, LoadResult

__all__ = ["summary_lines"]

#: Loaders that started later than this after ``--start-at`` are pointed out.
LATE_START = 0.05


def _count(n: object, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _us(value: float) -> str:
    return f"{value:,.0f}"


def summary_lines(result: LoadResult) -> list[str]:
    """What ``lab load`` prints without ``--json``."""
    config, target = result.config, result.target
    where = f"{target.get('host')}:{target.get('port')} ({target.get('address')})"
    workload = str(config.get("workload", "?"))
    if workload == "persistent":
        workload += f" ({config.get('per_connection')} messages per connection)"
    if config.get("rate") is not None:
        loop = f"open loop at {config['rate']:g} requests/s, at most "
        loop += _count(config.get("concurrency"), "connection")
    else:
        loop = f"closed loop, {_count(config.get('concurrency'), 'connection')}"
    sizes, checked = f"{config.get('size')}-byte messages", "each echo verified byte for byte"
    if workload == "kv":
        workload = (
            f"kv ({config.get('mix')} over {config.get('keys'):,} keys, "
            f"{config.get('distribution')}; {config.get('per_connection')} commands per connection)"
        )
        sizes, checked = f"{config.get('size')}-byte values", "each reply checked"
    lines = [
        f"target {where}: {workload}, {sizes}, {loop}, "
        f"{_count(result.loader_processes, 'loader process').replace('processs', 'processes')}",
        f"measured {result.duration:.2f} s after a {config.get('warmup', 0):g} s warm-up: "
        f"{result.requests:,} requests, {result.throughput:,.1f} requests/s, {checked} "
        f"({result.bytes_verified:,} bytes)",
    ]

    latency = result.latency
    if latency.count:
        cells = [f"{label} {_us(latency.percentile(p))}" for label, p in PERCENTILES.items()]
        cells.append(f"max {_us(latency.max)}")
        origin = "from each request's intended send time" if config.get("rate") else ""
        lines.append(f"latency µs{f' ({origin})' if origin else ''}: " + "  ".join(cells))
    else:
        lines.append("latency: no request completed")

    if result.errors_total:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in result.errors.items() if n)
        lines.append(f"errors: {result.errors_total:,} — {kinds}")
    else:
        lines.append("errors: none")
    left = []
    if result.unfinished:
        left.append(f"{result.unfinished:,} still in flight at the end (unfinished)")
    if result.unsent:
        left.append(f"{result.unsent:,} due but never sent: every connection was busy (unsent)")
    if left:
        lines.append("not measured: " + "; ".join(left))

    starve_after = config.get("starve_after", 1.0)
    if result.starved:
        waits = result.starved_wait
        waiting = f", {result.starved_waiting:,} still waiting at the end" * bool(
            result.starved_waiting
        )
        lines.append(
            f"starved: {result.starved:,} connections waited over {starve_after:g} s for their "
            f"first echo (median {_us(waits.percentile(50))} µs, max {_us(waits.max)} µs"
            f"{waiting}) — more connections than the server serves at once"
        )
    else:
        lines.append(f"starved: none (no connection waited over {starve_after:g} s to be served)")

    bound = "true — the loader may be the bottleneck: add --processes" * result.loader_bound
    lines.append(
        f"loader: {result.loader_cpu_s:.2f} s CPU over {result.loader_wall_s:.2f} s of process "
        f"time ({result.loader_utilization:.0%}), loader_bound: {bound or 'false'}"
    )
    if result.loader_start_lag_s > LATE_START:
        lines.append(
            f"note: a loader process started {result.loader_start_lag_s:.2f} s after --start-at "
            "(not ready in time); give a later --start-at"
        )
    return lines
