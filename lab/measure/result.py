"""A load run's result: counts, encoded histograms and times — and how results merge.

One :class:`LoadResult` comes from each loader process; the run merges them into one, and a
future ``lab bench`` merges the runs of several containers the same way, with :func:`merge`.
Merging only ever *adds*: counts are summed and histograms are decoded and added, so the
merged percentiles are exactly those of one histogram holding every request — percentiles
are never averaged.

:meth:`LoadResult.to_dict` is the ``--json`` output: the raw fields (what :func:`merge` and
:meth:`LoadResult.from_dict` need) plus derived ones (throughput, percentiles) for reading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lab.measure.histogram import LatencyHistogram

__all__ = [
    "ERROR_KINDS",
    "LOADER_BOUND_SHARE",
    "PERCENTILES",
    "SCHEMA",
    "LoadResult",
    "merge",
    "merge_kv_incr",
]

SCHEMA = "lab.load/1"

#: Why a request (or a persistent connection) failed:
#:
#: * ``connect_timeout`` — the connect did not complete within ``--timeout``;
#: * ``refused`` — the connect was refused (RST): nothing listening, or the backlog overflowed;
#: * ``reset`` — the connection was reset (RST) during the exchange;
#: * ``short_read`` — the server closed before the whole echo was back;
#: * ``mismatch`` — a byte of the echo differs from what was sent;
#: * ``closed_idle`` — the server closed a persistent connection between requests (seen as an
#:   EOF or a reset on a reused connection before any byte of the next echo);
#: * ``port_exhaustion`` — connect failed with EADDRNOTAVAIL: the loader ran out of local ports;
#: * ``timeout`` — an echo already under way made no progress for ``--timeout`` (a connection
#:   still waiting for its very first echo is *starved*, not timed out);
#: * ``busy`` — kv: ``ERR busy``, the database's write lock not had within the busy timeout
#:   (the write did not happen);
#: * ``kv_error`` — kv: any other ``ERR`` reply to a well-formed command;
#: * ``other`` — anything else.
#:
#: In the kv workload ``mismatch`` is a reply that cannot be the right one (a GET of another
#: key's value, an INCR lower than this loader's own acknowledged increments of that key).
ERROR_KINDS = (
    "connect_timeout",
    "refused",
    "reset",
    "short_read",
    "mismatch",
    "closed_idle",
    "port_exhaustion",
    "timeout",
    "busy",
    "kv_error",
    "other",
)

#: Reported percentiles: label → percent.
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}

#: Loaders whose CPU time is at least this share of their wall time are the bottleneck.
LOADER_BOUND_SHARE = 0.9
#: …judged only over this much wall time: a loader that ran a moment (it started after its
#: window had passed) divides two tiny numbers and would look saturated.
LOADER_BOUND_MIN_WALL = 0.2


def is_loader_bound(cpu_s: float, wall_s: float) -> bool:
    """Whether loaders that used ``cpu_s`` of CPU over ``wall_s`` seconds were the bottleneck."""
    return wall_s >= LOADER_BOUND_MIN_WALL and cpu_s / wall_s >= LOADER_BOUND_SHARE


def _no_errors() -> dict[str, int]:
    return dict.fromkeys(ERROR_KINDS, 0)


def _empty_histogram() -> str:
    return LatencyHistogram().encode()


@dataclass
class LoadResult:
    """What one loader (or several, merged) measured. Times are UNIX seconds."""

    config: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    #: When the loaders were to start (the shared ``--start-at``).
    start_at: float = 0.0
    #: The measured window: from the end of the warm-up to the last measured request's end.
    measure_start: float = 0.0
    measure_end: float = 0.0
    #: When the last loader finished (its drain included).
    end: float = 0.0
    #: Measured requests whose echo came back whole and verified byte for byte.
    requests: int = 0
    bytes_verified: int = 0
    errors: dict[str, int] = field(default_factory=_no_errors)
    #: Connections opened (warm-up included).
    connections: int = 0
    #: Measured requests still in flight when the drain after the run ran out.
    unfinished: int = 0
    #: Open loop: measured requests that were due but never sent (every connection busy to
    #: the end) — not in the histogram, so counted here.
    unsent: int = 0
    #: Latency of each measured, verified request, µs (open loop: from its intended send time).
    histogram: str = field(default_factory=_empty_histogram)
    #: Connections whose first echo took longer than ``--starve-after`` (or never came).
    starved: int = 0
    #: …of which still had no echo when the run ended.
    starved_waiting: int = 0
    #: How long each starved connection waited for its first echo, µs.
    starved_histogram: str = field(default_factory=_empty_histogram)
    loader_processes: int = 0
    loader_cpu_s: float = 0.0
    #: Wall time of the loader processes, summed (each from its start to its end).
    loader_wall_s: float = 0.0
    #: The latest any loader process began after ``start_at`` (it was not ready in time).
    loader_start_lag_s: float = 0.0
    loader_bound: bool = False
    #: How many loader results this one sums.
    parts: int = 1
    #: kv: every INCR of the run's counters (warm-up and drain included), per counter:
    #: ``{"tag": …, "counters": {key index: [acknowledged, sent but unanswered]}}`` (an INCR
    #: without a reply may have committed). What the no-lost-update check sums.
    kv_incr: dict[str, Any] | None = None
    #: With ``series`` on: the measured window in :data:`SERIES_STEP` intervals from
    #: ``measure_start``: ``{"step_s": 0.1, "ok": [verified requests ended in each], "errors":
    #: {kind: [failures in each]}}`` (the lists as long as the longest part's).
    series: dict[str, Any] | None = None

    # --- derived -----------------------------------------------------------------------------

    @property
    def latency(self) -> LatencyHistogram:
        return LatencyHistogram.decode(self.histogram)

    @property
    def starved_wait(self) -> LatencyHistogram:
        return LatencyHistogram.decode(self.starved_histogram)

    @property
    def duration(self) -> float:
        return max(0.0, self.measure_end - self.measure_start)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def loader_utilization(self) -> float:
        """Loader CPU time over loader wall time (1.0: every loader busy all the time)."""
        return self.loader_cpu_s / self.loader_wall_s if self.loader_wall_s > 0 else 0.0

    # --- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: every raw field plus the derived, readable ones."""
        latency, waits = self.latency, self.starved_wait
        return {
            "schema": SCHEMA,
            "target": self.target,
            "config": self.config,
            "start_at": self.start_at,
            "measure_start": self.measure_start,
            "measure_end": self.measure_end,
            "end": self.end,
            "duration_s": self.duration,
            "requests": self.requests,
            "throughput_rps": self.throughput,
            "bytes_verified": self.bytes_verified,
            "connections": self.connections,
            "unfinished": self.unfinished,
            "unsent": self.unsent,
            "latency_us": _summary(latency),
            "histogram": self.histogram,
            "errors": dict(self.errors),
            "errors_total": self.errors_total,
            "starved": {
                "connections": self.starved,
                "still_waiting": self.starved_waiting,
                "wait_us": _summary(waits),
                "histogram": self.starved_histogram,
            },
            "loader": {
                "processes": self.loader_processes,
                "cpu_s": self.loader_cpu_s,
                "wall_s": self.loader_wall_s,
                "utilization": self.loader_utilization,
                "start_lag_s": self.loader_start_lag_s,
            },
            "loader_bound": self.loader_bound,
            "parts": self.parts,
            **({"kv_incr": self.kv_incr} if self.kv_incr is not None else {}),
            **({"series": self.series} if self.series is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadResult:
        """Read back :meth:`to_dict`'s output (or a loader's raw fields); derived ones are
        recomputed, never trusted. :class:`ValueError` if it is not a load result."""
        if data.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result: schema {data.get('schema')!r}")
        starved = data.get("starved", {})
        loader = data.get("loader", {})
        errors = _no_errors()
        errors.update({str(k): int(v) for k, v in dict(data.get("errors", {})).items()})
        try:
            result = cls(
                config=dict(data.get("config", {})),
                target=dict(data.get("target", {})),
                start_at=float(data["start_at"]),
                measure_start=float(data["measure_start"]),
                measure_end=float(data["measure_end"]),
                end=float(data["end"]),
                requests=int(data["requests"]),
                bytes_verified=int(data.get("bytes_verified", 0)),
                errors=errors,
                connections=int(data.get("connections", 0)),
                unfinished=int(data.get("unfinished", 0)),
                unsent=int(data.get("unsent", 0)),
                histogram=str(data["histogram"]),
                starved=int(starved.get("connections", 0)),
                starved_waiting=int(starved.get("still_waiting", 0)),
                starved_histogram=str(starved.get("histogram", _empty_histogram())),
                loader_processes=int(loader.get("processes", 0)),
                loader_cpu_s=float(loader.get("cpu_s", 0.0)),
                loader_wall_s=float(loader.get("wall_s", 0.0)),
                loader_start_lag_s=float(loader.get("start_lag_s", 0.0)),
                loader_bound=bool(data.get("loader_bound", False)),
                parts=int(data.get("parts", 1)),
                kv_incr=_kv_incr(data.get("kv_incr")),
                series=_series(data.get("series")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a complete {SCHEMA} result: {exc!r}") from exc
        result.latency  # noqa: B018 — decoding checks the histograms are ours
        result.starved_wait  # noqa: B018
        return result


def _kv_incr(data: Any) -> dict[str, Any] | None:
    if data is None:
        return None
    counters = {str(k): [int(v[0]), int(v[1])] for k, v in dict(data["counters"]).items()}
    return {"tag": str(data["tag"]), "counters": counters}


def merge_kv_incr(parts: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The loaders' INCR counts summed per counter (None if none of them ran kv)."""
    given = [p for p in parts if p is not None]
    if not given:
        return None
    counters: dict[str, list[int]] = {}
    for part in given:
        for key, (acked, unanswered) in part["counters"].items():
            total = counters.setdefault(key, [0, 0])
            total[0] += acked
            total[1] += unanswered
    return {"tag": given[0]["tag"], "counters": counters}


def _series(data: Any) -> dict[str, Any] | None:
    if data is None:
        return None
    return {
        "step_s": float(data["step_s"]),
        "ok": [int(v) for v in data["ok"]],
        "errors": {str(k): [int(v) for v in vs] for k, vs in dict(data["errors"]).items()},
    }


def _added(lists: Iterable[list[int]]) -> list[int]:
    """Element-wise sums of lists of any lengths (a missing element counts 0)."""
    total: list[int] = []
    for values in lists:
        if len(values) > len(total):
            total.extend([0] * (len(values) - len(total)))
        for i, value in enumerate(values):
            total[i] += value
    return total


def merge_series(parts: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The loaders' series added interval by interval (their windows share ``measure_start``:
    every loader starts at the one ``start_at``)."""
    given = [p for p in parts if p is not None]
    if not given:
        return None
    kinds = sorted({k for p in given for k in p["errors"]})
    return {
        "step_s": given[0]["step_s"],
        "ok": _added(p["ok"] for p in given),
        "errors": {k: _added(p["errors"].get(k, []) for p in given) for k in kinds},
    }


def _summary(hist: LatencyHistogram) -> dict[str, float | int]:
    summary: dict[str, float | int] = {"count": hist.count, "min": hist.min, "mean": hist.mean}
    summary.update({label: hist.percentile(p) for label, p in PERCENTILES.items()})
    summary["max"] = hist.max
    return summary


def merge(results: Iterable[LoadResult]) -> LoadResult:
    """One result summing ``results``: counts added, histograms added (never percentiles
    averaged), the widest time window, config and target of the first."""
    parts = list(results)
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    errors = _no_errors()
    for part in parts:
        for kind, count in part.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    merged = dataclasses.replace(
        first,
        config=dict(first.config),
        target=dict(first.target),
        start_at=min(p.start_at for p in parts),
        measure_start=min(p.measure_start for p in parts),
        measure_end=max(p.measure_end for p in parts),
        end=max(p.end for p in parts),
        requests=sum(p.requests for p in parts),
        bytes_verified=sum(p.bytes_verified for p in parts),
        errors=errors,
        connections=sum(p.connections for p in parts),
        unfinished=sum(p.unfinished for p in parts),
        unsent=sum(p.unsent for p in parts),
        histogram=LatencyHistogram.merged(p.latency for p in parts).encode(),
        starved=sum(p.starved for p in parts),
        starved_waiting=sum(p.starved_waiting for p in parts),
        starved_histogram=LatencyHistogram.merged(p.starved_wait for p in parts).encode(),
        loader_processes=sum(p.loader_processes for p in parts),
        loader_cpu_s=sum(p.loader_cpu_s for p in parts),
        loader_wall_s=sum(p.loader_wall_s for p in parts),
        loader_start_lag_s=max(p.loader_start_lag_s for p in parts),
        parts=sum(p.parts for p in parts),
        kv_incr=merge_kv_incr(p.kv_incr for p in parts),
        series=merge_series(p.series for p in parts),
    )
    # Bound if any part was (one saturated loader throttles its own connections), or all of
    # them together used ≥ 90 % of their wall time.
    merged.loader_bound = any(p.loader_bound for p in parts) or is_loader_bound(
        merged.loader_cpu_s, merged.loader_wall_s
    )
    return merged
