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

from lab.measure import compare as sweep
from lab.measure.bench import ServerCost
from lab.measure.claims import evaluate
from lab.measure.histogram import LatencyHistogram
from lab.measure.report import Spread, aggregate, cells_for, render, summary_table
from lab.measure.result import LoadResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DESIGNS = sweep.all_servers()  # every design, variant and peer, from the registries
POOLS = [n for n in DESIGNS if sweep.base_design(n) in sweep.POOL_DESIGNS]
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
    conntrack_drops: int = 0,
    shed: int = 0,
    per_worker: dict[str, int] | None = None,
    workers_alive: int | None = None,
    starved: int = 0,
    starved_wait_us: int = 1_500_000,
    memory: int = 50 * 2**20,
    kv_check: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run as ``lab compare`` writes it: a real LoadResult and ServerCost, as dicts
    (persistent: 10 messages per connection)."""
    waits = LatencyHistogram()
    for _ in range(starved):
        waits.record(starved_wait_us)
    load = LoadResult(
        config={"workload": workload, "concurrency": concurrency},
        measure_start=100.0,
        measure_end=101.0,  # one second: throughput == requests
        end=101.0,
        requests=int(throughput),
        loader_bound=loader_bound,
        starved=starved,
        starved_histogram=waits.encode(),
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
        stats["workers_alive"] = len(per_worker) if workers_alive is None else workers_alive
    per_connection = 10 if workload in ("persistent", "kv") else 1
    cost = ServerCost(
        cpu_s=(cpu_ms or 0) * throughput / 1000,
        requests=int(throughput),
        window_s=1.0,
        cpu_s_per_1000=cpu_ms,
        cpu_s_per_1000_connections=None if cpu_ms is None else cpu_ms * per_connection,
        memory_peak_bytes=memory,
        memory_mean_bytes=memory * 0.9,
        listen_overflows=overflows,
        conntrack_drops=conntrack_drops,
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
        **({"kv_check": kv_check} if kv_check is not None else {}),
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
        "sendmsg+grow": 0.13,
        "multi-accept#2": 0.08,
        "peer-threading": 0.1,
        "peer-forking": 1.0,
        "peer-socat": 1.2,
    }
    runs = []
    for design in DESIGNS:
        for workload in (CPR, "persistent"):
            for concurrency in (1, 16):
                for repeat in range(3):
                    pool = design in POOLS
                    runs.append(
                        make_run(
                            design,
                            concurrency,
                            workload=workload,
                            repeat=repeat,
                            throughput=1000 + 100 * repeat + concurrency,
                            cpu_ms=cpu.get(design, 0.5) * (1 + 0.01 * repeat),
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
    assert "## Claims" in text and text.count("**holds**") + text.count("**inconclusive**") + (
        text.count("**does not hold**")
    ) == len(evaluate(results))
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
        *(f"workers-{''.join(ch if ch.isalnum() else '-' for ch in pool)}.png" for pool in POOLS),
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


def test_a_cell_whose_packets_a_full_conntrack_table_dropped_is_flagged_and_not_compared(
    tmp_path: Path,
) -> None:
    """Its SYNs waited on the firewall's table, not on the server: every table says so and the
    claims do not use it (sendmsg's faster cell does not beat multi-accept's)."""
    results = make_results(
        [
            make_run("multi-accept", 8, throughput=1000.0),
            make_run("sendmsg", 8, throughput=5000.0, conntrack_drops=12),
        ]
    )
    (cell,) = [c for c in aggregate(results) if c.design == "sendmsg"]
    assert cell.conntrack_drops == 12 and cell.measured and not cell.usable
    assert "connection-tracking table was full (12 packets dropped)" in cell.why_unusable()
    text = render(results, tmp_path).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| sendmsg")]
    assert rows and all("CONNTRACK FULL: 12 dropped" in row for row in rows)


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


# --- pools, starvation, the C peers, variants ----------------------------------------------------


def _row(text: str, design: str, concurrency: int, section: str = CPR) -> list[str]:
    """The cells of ``design``'s row at ``concurrency`` in the table of ``section``."""
    table = text.split(f"### {section}")[1].split("\n\n")[1]
    header = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == design and cells[1] == str(concurrency):
            return dict(zip(header, cells, strict=True))  # type: ignore[return-value]
    raise AssertionError(f"no row {design} c={concurrency}")


def test_the_report_shows_the_pool_each_run_actually_had(tmp_path: Path) -> None:
    two = {"1": 50, "2": 50}
    grown = {str(pid): 10 for pid in range(10, 18)}  # eight workers served
    results = make_results(
        [
            make_run("multi-accept", 1, per_worker={"1": 100}, workers_alive=2),  # one served
            *(make_run("sendmsg", 64, repeat=r, per_worker=two) for r in range(2)),
            make_run("sendmsg+grow", 64, per_worker=grown, workers_alive=5),
            make_run("sendmsg+grow", 64, repeat=1, per_worker=two),
            make_run("fork", 64),
        ]
    )
    cells = aggregate(results)
    assert cells_for(cells, "multi-accept", CPR)[1].pool == Spread(2, 2, 2, 1)
    assert cells_for(cells, "sendmsg+grow", CPR)[64].pool == Spread(5, 2, 8, 2)
    assert cells_for(cells, "fork", CPR)[64].pool is None
    text = render(results, tmp_path).read_text()
    assert _row(text, "sendmsg", 64)["pool"] == "2"
    assert _row(text, "sendmsg+grow", 64)["pool"] == "5 (2–8)"
    assert _row(text, "fork", 64)["pool"] == "—"
    assert "- **sendmsg+grow**: sendmsg whose pool grows" in text  # the variant, labelled


def test_starved_connections_are_reported_with_their_wait(tmp_path: Path) -> None:
    results = make_results(
        [
            make_run(
                "multi-accept",
                8,
                workload="persistent",
                repeat=r,
                starved=3,
                starved_wait_us=2_000_000,
                per_worker={"1": 40, "2": 40},
            )
            for r in range(2)
        ]
        + [make_run("fork", 8, workload="persistent")]
    )
    (cell,) = cells_for(aggregate(results), "multi-accept", "persistent").values()
    assert cell.starved == 6 and cell.starved_wait["count"] == 6
    assert 1_990_000 <= cell.starved_wait["p50"] <= 2_010_000
    text = render(results, tmp_path).read_text()
    section = text.split("## Starved connections")[1].split("## ")[0]
    (line,) = [line for line in section.splitlines() if line.startswith("- ")]
    assert "**multi-accept**, persistent, c=8: 6 connections starved over 2 runs" in line
    assert "median 2,000 ms" in line or "median 1,999 ms" in line or "median 2,001 ms" in line
    assert "pool of 2 serves 2 connections at a time; the other 6 of 8 wait" in line
    assert "fork" not in section
    assert "see Starved connections" in _row(text, "multi-accept", 8, "persistent")["flags"]


def test_no_starvation_no_section(tmp_path: Path) -> None:
    text = render(make_results([make_run("fork")]), tmp_path).read_text()
    assert "## Starved connections" not in text


def test_the_c_column_divides_by_the_c_peer_of_the_family(tmp_path: Path) -> None:
    """×C: a design's CPU per request over its family's C peer's at the same workload and
    concurrency — prefork designs and their variants by peer-c-prefork, fork designs by
    peer-c-fork; "—" for a C peer, and where the C peer did not run."""
    from lab.sockets.designs import DESIGNS as REGISTRY

    assert REGISTRY["multi-accept"].family == "prefork" and REGISTRY["spawn"].family == "fork"
    results = make_results(
        [
            make_run("peer-c-prefork", 8, cpu_ms=0.02),
            make_run("peer-c-fork", 8, cpu_ms=0.5),
            make_run("multi-accept", 8, cpu_ms=0.1),
            make_run("multi-accept#2", 8, cpu_ms=0.06),
            make_run("spawn", 8, cpu_ms=10.0),
            make_run("spawn+cat", 8, cpu_ms=1.0),
            make_run("fork", 1, cpu_ms=1.0),  # no C peer at c=1
            make_run("peer-threading", 8, cpu_ms=0.1),
        ]
    )
    text = render(results, tmp_path).read_text()
    expected = {
        ("multi-accept", 8): "×5.0",
        ("multi-accept#2", 8): "×3.0",
        ("spawn", 8): "×20.0",
        ("spawn+cat", 8): "×2.0",
        ("fork", 1): "—",
        ("peer-threading", 8): "×5.0",  # a thread per connection: as the thread designs
        ("peer-c-prefork", 8): "—",
    }
    for (design, concurrency), ratio in expected.items():
        assert _row(text, design, concurrency)["×C"] == ratio, design
    summary = summary_table(results)
    assert "| ×C |" in summary and "×20.0" in summary


def test_persistent_tables_show_cpu_per_connection(tmp_path: Path) -> None:
    results = make_results([make_run("fork", 8, workload="persistent", cpu_ms=0.2)])
    row = _row(render(results, tmp_path).read_text(), "fork", 8, "persistent")
    assert row["CPU ms/req"] == "0.200" and row["CPU ms/conn"] == "2.000"


# --- repeats on the plots ------------------------------------------------------------------------


def test_every_plot_draws_a_dot_per_repeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.measure import plots

    figures: dict[str, Any] = {}
    save = plots._save

    def keep(fig: Any, out_dir: Path, filename: str, title: str) -> plots.Plot:
        figures[filename] = fig
        return save(fig, out_dir, filename, title)

    monkeypatch.setattr(plots, "_save", keep)
    throughputs, cpus = (1000.0, 1300.0, 1150.0), (0.2, 0.3, 0.25)
    runs = [
        make_run("fork", 8, repeat=r, throughput=tp, cpu_ms=cpu, latencies_us=(100 * (r + 1),))
        for r, (tp, cpu) in enumerate(zip(throughputs, cpus, strict=True))
    ]
    render(make_results(runs), tmp_path)

    def dots(filename: str) -> set[tuple[float, float]]:
        (ax,) = figures[filename].axes
        return {
            (round(float(x), 6), round(float(y), 6))
            for collection in ax.collections
            for x, y in collection.get_offsets()
        }

    assert {(8.0, tp) for tp in throughputs} <= dots("throughput-connect-per-request.png")
    assert {(0.0, cpu) for cpu in cpus} <= dots("cpu-per-request.png")
    p50s = {float(r["load"]["latency_us"]["p50"]) for r in runs}
    assert {(0.0, p) for p in p50s} <= dots("latency-connect-per-request.png")


# --- the latency curve -------------------------------------------------------------------------


def test_latency_curve_section_and_plot(tmp_path: Path) -> None:
    def curve_run(design: str, fraction: float, repeat: int, p50: int) -> dict[str, Any]:
        run = make_run(design, 64, repeat=repeat, throughput=1000 * fraction, latencies_us=(p50,))
        return {**run, "fraction": fraction, "rate": 1000 * fraction}

    results = make_results([make_run("fork", 64, throughput=1000)])
    results["latency_curve"] = {
        "fractions": [0.25, 0.9],
        "maximum": {
            "fork": {"source": "the sweep", "throughput_rps": 1000.0, "concurrency": 64},
            "spawn": {"source": "a closed-loop run for the curve", "error": "boom"},
        },
        "runs": [
            *(curve_run("fork", f, r, p) for f, p in ((0.25, 100), (0.9, 5000)) for r in (0, 1)),
            {"design": "spawn", "fraction": 0.25, "repeat": 0, "error": "no closed-loop maximum"},
        ],
    }
    text = render(results, tmp_path).read_text()
    section = text.split("## Latency under offered load")[1].split("\n## ")[0]
    assert "- fork: maximum 1,000 req/s closed loop at c=64, from the sweep" in section
    assert "- spawn: maximum not measured (boom)" in section
    assert "| fork | 25% | 250 | 250 |" in section and "| fork | 90% | 900 | 900 |" in section
    assert "| spawn | 25% | 0 | — | — | — | FAILED: no closed-loop maximum |" in section
    assert (tmp_path / "latency-curve.png").read_bytes()[:8] == PNG_MAGIC
    assert "spawn (latency curve): no open-loop run completed" in text
    plain = render(make_results([make_run("fork")]), tmp_path / "plain").read_text()
    assert "Latency under offered load" not in plain


# --- the full compare's experiments: workers, sequential connections, idle, pool size -----------


def _experiment_results() -> dict[str, Any]:
    """multi-accept in the sweep at two concurrencies (two workers), and the three experiments'
    parts of results.json as `lab compare` writes them."""
    runs = [
        make_run("multi-accept", c, repeat=r, per_worker=counts)
        for c, counts in ((1, {"1": 50, "2": 50}), (64, {"1": 90, "2": 10}))
        for r in range(2)
    ]
    results = make_results(runs)
    results["distribution"] = {
        "workers": 3,
        "connections": 6,
        "rounds": 1,
        "designs": {
            "multi-accept": {
                "design": "multi-accept",
                "rounds": [
                    {"served_by": [0, 1, 2, 0, 1, 2], "counts": [2, 2, 2], "pattern": "round-robin"}
                ],
                "pattern": "round-robin",
            },
            "sendmsg": {"design": "sendmsg", "error": "the server did not answer in time: boom"},
        },
    }

    def held(design: str, idle: int, repeat: int, throughput: float) -> dict[str, Any]:
        return {**make_run(design, 8, repeat=repeat, throughput=throughput), "idle": idle}

    results["idle"] = {
        "levels": [0, 2],
        "concurrency": 8,
        "duration": 1.5,
        "runs": [
            *(held("multi-accept", 0, r, 1000 + r) for r in range(2)),
            *(held("multi-accept", 2, r, 0) for r in range(2)),
            *(held("fork", level, r, 500) for level in (0, 2) for r in range(2)),
        ],
    }
    sized = [
        {**make_run(d, 64, repeat=r, throughput=tp * (1 + 0.01 * r)), "workers": w}
        for d in ("multi-accept", "sendmsg")
        for w, tp in ((1, 600), (2, 1000), (4, 1010))
        for r in range(2)
    ]
    results["pool_sizes"] = {
        "workers": [1, 2, 4],
        "concurrency": 64,
        "duration": 1.5,
        "runs": sized,
    }
    return results


def test_the_experiments_have_their_sections_and_plots(tmp_path: Path) -> None:
    text = render(_experiment_results(), tmp_path).read_text()

    workers = text.split("## Connections across workers")[1].split("\n## ")[0]
    row = next(line for line in workers.splitlines() if line.startswith("| multi-accept"))
    assert "c=1: 0.50 (even: 0.50, 2 of 2 served)" in row and "c=64: 0.90" in row
    assert "](workers-multi-accept.png)" in text

    sequential = text.split("## Sequential connections across workers")[1].split("\n## ")[0]
    assert "| multi-accept | a pool of processes that accept | 0,1,2,0,1,2 | 2,2,2 |" in sequential
    assert "| round-robin | round-robin |" in sequential
    assert "| sendmsg | a pool of processes fed descriptors | FAILED: the server" in sequential

    idle = text.split("## Idle connections")[1].split("\n## ")[0]
    assert "With 2 idle connections held open" in idle
    assert "pools kept multi-accept 0%" in idle and "the others kept fork 100%" in idle
    row = next(line for line in idle.splitlines() if line.startswith("| multi-accept"))
    assert "| 1,000 (1,000–1,001) | 0 | 0% | NO REQUESTS |" in row

    sizes = text.split("## Pool size")[1].split("\n## ")[0]
    assert "--workers 1, 2, 4" in sizes and "(cores: 2)" in sizes
    assert "From 2 workers (this machine's cores) to 4, throughput went" in sizes
    assert "multi-accept ×1.01 (no clear change)" in sizes
    row = next(line for line in sizes.splitlines() if line.startswith("| sendmsg"))
    assert row.startswith("| sendmsg | 603 (600–606) | 1,005 (1,000–1,010) |")

    for name in ("idle-connections.png", "pool-sizes.png", "workers-multi-accept.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_without_the_experiments_there_are_no_sections(tmp_path: Path) -> None:
    text = render(make_results([make_run("fork")]), tmp_path).read_text()
    for section in ("Sequential connections", "Idle connections", "Pool size", "across workers"):
        assert section not in text
    assert not list(tmp_path.glob("idle-*.png")) and not (tmp_path / "pool-sizes.png").exists()


def test_the_per_design_worker_plots_show_low_and_high_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab.measure import plots

    figures: dict[str, Any] = {}
    save = plots._save

    def keep(fig: Any, out_dir: Path, filename: str, title: str) -> plots.Plot:
        figures[filename] = fig
        return save(fig, out_dir, filename, title)

    monkeypatch.setattr(plots, "_save", keep)
    render(_experiment_results(), tmp_path)
    low, high = figures["workers-multi-accept.png"].axes
    assert low.get_title() == "low load: c=1" and high.get_title() == "high load: c=64"
    heights = sorted(round(bar.get_height()) for bar in high.patches)
    assert heights == [10, 10, 90, 90]  # two repeats, busiest first
    assert "workers-iterative.png" not in figures  # one process is not a pool


def test_the_c_column_reads_an_event_loop_against_the_c_epoll_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """×C by family: a design declaring family "epoll" (the event loops, reuseport,
    prefork-epoll) is read against peer-c-epoll."""
    from lab.measure.peers import C_PEERS
    from lab.sockets.designs import DESIGNS as REGISTRY

    assert "c-epoll" in C_PEERS
    loops = [n for n, d in REGISTRY.items() if d.family == "epoll"]
    loop = type("Loop", (), {"family": "epoll", "name": "a-loop"})
    monkeypatch.setattr(sweep, "DESIGNS", {**dict(REGISTRY), "a-loop": loop})
    names = ["a-loop", *loops]
    assert all(sweep.c_peer(n) == "peer-c-epoll" for n in names)
    results = make_results(
        [make_run("peer-c-epoll", 8, cpu_ms=0.02)] + [make_run(n, 8, cpu_ms=0.1) for n in names]
    )
    text = render(results, tmp_path).read_text()
    for name in names:
        assert _row(text, name, 8)["×C"] == "×5.0", name


def test_the_c_column_reads_the_stdlib_peers_against_the_c_peer_of_their_shape(
    tmp_path: Path,
) -> None:
    """peer-asyncio is an event loop (peer-c-epoll), peer-forking a fork per connection
    (peer-c-fork), peer-threading a thread per connection (peer-c-prefork, as the thread
    designs); a C ceiling has no ×C of its own."""
    assert sweep.c_peer("peer-asyncio") == "peer-c-epoll"
    assert sweep.c_peer("peer-forking") == "peer-c-fork"
    assert sweep.c_peer("peer-threading") == sweep.c_peer("thread") == "peer-c-prefork"
    assert sweep.c_peer("peer-c-epoll") is None and sweep.c_peer("peer-mine") is None
    results = make_results(
        [
            make_run("peer-c-epoll", 8, cpu_ms=0.02),
            make_run("peer-c-fork", 8, cpu_ms=0.5),
            make_run("peer-asyncio", 8, cpu_ms=0.07),
            make_run("peer-forking", 8, cpu_ms=1.0),
        ]
    )
    text = render(results, tmp_path).read_text()
    assert _row(text, "peer-asyncio", 8)["×C"] == "×3.5"
    assert _row(text, "peer-forking", 8)["×C"] == "×2.0"
    assert _row(text, "peer-c-epoll", 8)["×C"] == "—"


def kv_verdict(ok: bool = True, acknowledged: int = 500) -> dict[str, Any]:
    """A run's kv_check as bench() writes it (lab.measure.kvcheck.KvCheck.to_dict())."""
    stored = acknowledged if ok else acknowledged - 3
    lost = 0 if ok else 1
    source = {"stored": stored, "lost": lost, "extra": 0}
    return {
        "tag": "t",
        "counters": 10,
        "acknowledged": acknowledged,
        "unanswered": 0,
        "sources": {"server": source, "file": dict(source)},
        "ok": ok,
        "examples": [] if ok else ["load:c:t:3 (file): 7 acknowledged, 4 stored"],
    }


def test_a_kv_run_that_lost_updates_is_flagged_reported_and_not_compared(tmp_path: Path) -> None:
    results = make_results(
        [
            make_run("select", 8, workload="kv", kv_check=kv_verdict()),
            make_run("select", 8, workload="kv", repeat=1, kv_check=kv_verdict()),
            make_run("fork", 8, workload="kv", kv_check=kv_verdict(ok=False)),
        ]
    )
    cells = {c.design: c for c in aggregate(results)}
    assert cells["select"].usable and cells["select"].kv_checked == 2
    assert cells["select"].kv_acknowledged == 1000
    assert (
        not cells["fork"].usable
        and "lost or extra updates in 1 of 1" in cells["fork"].why_unusable()
    )
    text = render(results, tmp_path).read_text()
    assert "## The worker that does real work (kv)" in text
    section = text.split("## The worker that does real work (kv)")[1].split("\n## ")[0]
    assert "| select | 2 | 1,000 | yes |" in section
    assert "**NO** (1 runs: load:c:t:3 (file): 7 acknowledged, 4 stored)" in section
    rows = [line for line in text.splitlines() if line.startswith("| fork")]
    assert any("LOST UPDATES in 1/1 runs" in row for row in rows)


def test_a_run_without_kv_has_no_kv_section(tmp_path: Path) -> None:
    text = render(make_results([make_run("select", 8)]), tmp_path).read_text()
    assert "real work (kv)" not in text
