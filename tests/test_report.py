"""The report of a comparison: aggregation, tables, plots — on synthetic ``results.json``.

The builder here (``make_run``, ``make_results``) is shared with ``test_claims.py``.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from lab.measure.bench import ServerCost
from lab.measure.histogram import LatencyHistogram
from lab.measure.report import Spread, aggregate, cells_for, render, summary_table
from lab.measure.result import LoadResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DESIGNS = [
    "iterative",
    "spawn",
    "spawn+cat",
    "fork",
    "sendmsg",
    "multi-accept",
    "peer-threading",
    "peer-forking",
    "peer-socat",
]
CPR = "connect-per-request"


@functools.cache
def _latency(values: tuple[int, ...]) -> dict[str, Any]:
    """The histogram and latency summary of ``values``, as LoadResult.to_dict gives them
    (cached: hdrh's pure-Python summary is slow)."""
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    data = LoadResult(histogram=hist.encode()).to_dict()
    return {"histogram": data["histogram"], "latency_us": data["latency_us"]}


def make_run(
    design: str,
    concurrency: int = 8,
    *,
    workload: str = CPR,
    repeat: int = 0,
    throughput: float = 1000.0,
    cpu_ms: float | None = 0.1,
    latencies_us: Sequence[int] = (100, 200, 300, 400, 5000),
    errors: dict[str, int] | None = None,
    loader_bound: bool = False,
    overflows: int = 0,
    shed: int = 0,
    per_worker: dict[str, int] | None = None,
    starved: int = 0,
    memory: int = 50 * 2**20,
) -> dict[str, Any]:
    """One run as ``lab compare`` writes it: a real LoadResult and ServerCost, as dicts."""
    load = LoadResult(
        config={"workload": workload, "concurrency": concurrency},
        measure_start=100.0,
        measure_end=101.0,  # one second: throughput == requests
        end=101.0,
        requests=int(throughput),
        loader_bound=loader_bound,
        starved=starved,
        connections=int(throughput),
    )
    load.errors.update(errors or {})
    load_dict = load.to_dict()
    load_dict.update(_latency(tuple(latencies_us)))
    stats: dict[str, Any] = {
        "accepted": int(throughput),
        "completed": int(throughput),
        "shed": shed,
    }
    if per_worker:
        stats["per_worker"] = per_worker
    cost = ServerCost(
        cpu_s=(cpu_ms or 0) * throughput / 1000,
        cpu_s_per_1000=cpu_ms,
        memory_peak_bytes=memory,
        memory_mean_bytes=memory * 0.9,
        listen_overflows=overflows,
        stats=stats if not design.startswith("peer-") else {},
    )
    return {
        "design": design,
        "server_options": [],
        "workload": workload,
        "concurrency": concurrency,
        "repeat": repeat,
        "backend": "local",
        "load": load_dict,
        "server": asdict(cost),
    }


def failed_run(design: str, concurrency: int = 8, workload: str = CPR) -> dict[str, Any]:
    return {
        "design": design,
        "server_options": [],
        "workload": workload,
        "concurrency": concurrency,
        "repeat": 0,
        "backend": "local",
        "error": "the server did not answer in time: boom",
    }


def make_results(
    runs: Sequence[dict[str, Any]], *, backend: str = "local", quick: bool = False
) -> dict[str, Any]:
    return {
        "schema": "lab.compare/1",
        "run_id": "20261126-002400",
        "created": "2026-11-26T00:24:00+00:00",
        "backend": backend,
        "quick": quick,
        "command": "lab compare --local",
        "environment": {
            "kernel": "6.1.0-test",
            "cores": 2,
            "python": "3.11.7",
            "sysctls": {"net.core.somaxconn": "4096", "net.ipv4.tcp_tw_reuse": "2"},
            "docker": None,
            "git_commit": "abc1234",
            "image": None,
        },
        "matrix": {
            "designs": DESIGNS,
            "workloads": [CPR, "persistent"],
            "concurrency": sorted({int(r["concurrency"]) for r in runs}),
            "repeats": max((int(r["repeat"]) for r in runs), default=0) + 1,
            "duration": 2.0,
            "warmup": 0.5,
            "workers": 2,
            "per_connection": 10,
            "size": 49,
        },
        "runs": list(runs),
    }


def full_results() -> dict[str, Any]:
    """Every design, both workloads, two concurrencies, three repeats."""
    return copy.deepcopy(_full_results())


@functools.cache
def _full_results() -> dict[str, Any]:
    cpu = {
        "iterative": 0.05,
        "spawn": 20.0,
        "spawn+cat": 2.0,
        "fork": 1.5,
        "sendmsg": 0.12,
        "multi-accept": 0.08,
        "peer-threading": 0.1,
        "peer-forking": 1.0,
        "peer-socat": 1.2,
    }
    runs = []
    for design in DESIGNS:
        for workload in (CPR, "persistent"):
            for concurrency in (1, 16):
                for repeat in range(3):
                    pool = design in ("sendmsg", "multi-accept")
                    runs.append(
                        make_run(
                            design,
                            concurrency,
                            workload=workload,
                            repeat=repeat,
                            throughput=1000 + 100 * repeat + concurrency,
                            cpu_ms=cpu[design] * (1 + 0.01 * repeat),
                            per_worker={"101": 600 + repeat, "102": 400} if pool else None,
                            overflows=7 if design == "iterative" and concurrency > 6 else 0,
                            latencies_us=(100, 200, 1_100_000)
                            if design == "iterative" and concurrency > 6
                            else (100, 200, 300),
                        )
                    )
    return make_results(runs)


# --- aggregation ---------------------------------------------------------------------------------


def test_medians_and_spreads_over_repeats() -> None:
    runs = [
        make_run("fork", 8, repeat=i, throughput=tp, cpu_ms=cpu, memory=mem, errors=err)
        for i, (tp, cpu, mem, err) in enumerate(
            [
                (1000, 1.0, 10 * 2**20, {"refused": 1}),
                (3000, 3.0, 30 * 2**20, {"reset": 2}),
                (2000, 2.0, 20 * 2**20, {"refused": 4}),
            ]
        )
    ]
    (cell,) = aggregate(make_results(runs))
    assert cell.runs == 3 and not cell.failed
    assert cell.throughput == Spread(2000.0, 1000.0, 3000.0, 3)
    assert cell.cpu_s_per_1000 == Spread(2.0, 1.0, 3.0, 3)
    assert cell.memory_peak_bytes == Spread(20 * 2**20, 10 * 2**20, 30 * 2**20, 3)
    assert cell.errors == {"refused": 5, "reset": 2}
    assert cell.errors_total == 7
    p99s = [r["load"]["latency_us"]["p99"] for r in runs]
    assert cell.latency["p99"].median == statistics.median(p99s)


def test_sums_and_flags() -> None:
    runs = [
        make_run(
            "sendmsg", 8, repeat=0, starved=2, shed=3, overflows=1, per_worker={"1": 5, "2": 7}
        ),
        make_run(
            "sendmsg",
            8,
            repeat=1,
            starved=1,
            shed=4,
            loader_bound=True,
            per_worker={"3": 6, "4": 6},
        ),
    ]
    (cell,) = aggregate(make_results(runs))
    assert (cell.starved, cell.shed, cell.listen_overflows) == (3, 7, 1)
    assert cell.loader_bound and not cell.usable
    assert cell.per_worker == [{"1": 5, "2": 7}, {"3": 6, "4": 6}]
    assert "LOADER-BOUND" in cell.flags()


def test_pooled_percentiles_equal_one_histogram_of_all_values() -> None:
    parts = [[100, 150, 9000], [120, 130, 140, 150_000], [80, 2_000_000, 500]]
    runs = [make_run("multi-accept", 4, repeat=i, latencies_us=v) for i, v in enumerate(parts)]
    (cell,) = aggregate(make_results(runs))
    whole = LatencyHistogram()
    for values in parts:
        for value in values:
            whole.record(value)
    for label, percent in {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}.items():
        assert cell.pooled[label] == whole.percentile(percent)
    assert cell.pooled["max"] == whole.max
    assert cell.pooled["count"] == 10


def test_grouping_and_failed_runs() -> None:
    results = make_results(
        [
            make_run("fork", 1),
            make_run("fork", 8),
            make_run("fork", 8, repeat=1),
            make_run("fork", 8, workload="persistent"),
            failed_run("spawn", 8),
        ]
    )
    cells = aggregate(results)
    assert sorted(cells_for(cells, "fork", CPR)) == [1, 8]
    assert cells_for(cells, "fork", CPR)[8].runs == 2
    (spawn,) = cells_for(cells, "spawn", CPR).values()
    assert spawn.runs == 0 and spawn.failed and not spawn.usable
    assert "every run failed" in spawn.why_unusable()


# --- rendering -----------------------------------------------------------------------------------


def test_report_renders_with_plots(tmp_path: Path) -> None:
    results = full_results()
    path = render(results, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    assert "20261126-002400" in text and "local" in text and "full" in text
    assert "## Summary" in text and "| design |" in text
    assert (
        "## Claims" in text
        and text.count("**holds**")
        + text.count("**inconclusive**")
        + (text.count("**does not hold**"))
        == 7
    )
    assert "## Environment" in text
    for name in ("kernel", "cores", "python", "sysctls.net.core.somaxconn", "git_commit", "image"):
        assert f"- {name}: " in text
    assert "lab compare --local" in text
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert {
        "throughput-connect-per-request.png",
        "throughput-persistent.png",
        "latency-connect-per-request.png",
        "cpu-per-request.png",
        "per-worker.png",
    } <= set(pngs)
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_summary_table_one_row_per_design_at_highest_concurrency() -> None:
    table = summary_table(full_results())
    rows = [line for line in table.splitlines() if line.startswith("| ") and "design" not in line]
    assert [row.split("|")[1].strip() for row in rows] == DESIGNS
    assert all(row.split("|")[2].strip() == "16" for row in rows)


def test_loader_bound_flagged_in_every_table(tmp_path: Path) -> None:
    results = make_results(
        [
            make_run("multi-accept", 8, loader_bound=True),
            make_run("multi-accept", 8, workload="persistent", loader_bound=True),
            make_run("sendmsg", 8),
        ]
    )
    assert "LOADER-BOUND" in summary_table(results)
    text = render(results, tmp_path).read_text()
    tables = text.split("## Claims")[0].split("### ")
    # the summary, then one table per workload
    assert len(tables) == 3
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| multi-accept")]
        assert rows and all("LOADER-BOUND" in row for row in rows)


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_report_names_backend_and_mode(tmp_path: Path, backend: str) -> None:
    results = make_results([make_run("fork")], backend=backend, quick=True)
    text = render(results, tmp_path).read_text()
    assert f"backend: **{backend}" in text and "mode: **quick**" in text
    assert "single run" in text


def test_failed_and_error_only_runs_still_render(tmp_path: Path) -> None:
    results = make_results(
        [
            failed_run("spawn"),
            make_run(
                "iterative",
                8,
                throughput=0,
                cpu_ms=None,
                latencies_us=(),
                errors={"connect_timeout": 8},
            ),
            make_run("multi-accept", 8, per_worker={"1": 3}),
        ]
    )
    json.dumps(results)  # it is what results.json holds
    path = render(results, tmp_path)
    text = path.read_text()
    assert "FAILED 1/1" in text
    assert "iterative (connect-per-request): no request completed" in text
    assert (tmp_path / "throughput-connect-per-request.png").read_bytes()[:8] == PNG_MAGIC


def test_nothing_measured_still_renders(tmp_path: Path) -> None:
    text = render(make_results([failed_run("fork")]), tmp_path).read_text()
    assert "## Claims" in text and "## Environment" in text
    assert "inconclusive" in text
