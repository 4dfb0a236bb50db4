"""`lab bench --local`: a design or a peer under load, and what it cost the server — structure
and correctness of the result, never its speed."""

from __future__ import annotations

import json

import pytest
from harness import ALL_DESIGNS, POOL_DESIGNS
from typer.testing import CliRunner

from lab.cli.app import app
from lab.measure.bench import LocalBackend, ServerSpec, bench
from lab.measure.config import make_config

runner = CliRunner()
TINY = {"concurrency": 4, "duration": 0.5, "warmup": 0.2, "processes": 1}


def tiny_config(**overrides: object) -> object:
    return make_config("127.0.0.1", port=1, **{**TINY, **overrides})  # type: ignore[arg-type]


def assert_complete(result: dict[str, object], design: str) -> None:
    load, server = result["load"], result["server"]
    assert isinstance(load, dict) and isinstance(server, dict)
    assert result["design"] == design and result["backend"] == "local"
    assert load["requests"] > 0 and load["errors_total"] == 0
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        assert load["latency_us"][key] > 0, key
    assert load["histogram"]  # encoded, so runs can be merged later
    assert server["cpu_s"] > 0 and server["cpu_s_per_1000"] > 0
    assert server["memory_peak_bytes"] > 0
    assert server["listen_overflows"] >= 0


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_local_bench_reports_load_and_server_cost_for_every_design(design: str) -> None:
    spec = ServerSpec(design, ("--workers", "2") if design in POOL_DESIGNS else ())
    result = bench(LocalBackend(), spec, tiny_config()).to_dict()  # type: ignore[arg-type]
    assert_complete(result, design)
    stats = result["server"]["stats"]
    # The server's own count agrees with the loader's: every connection it saw completed.
    assert stats["completed"] >= result["load"]["requests"]
    assert stats["failed"] == {}
    if design in POOL_DESIGNS:
        assert sum(stats["per_worker"].values()) == stats["completed"]


def test_local_bench_measures_a_peer_beside_the_designs() -> None:
    result = bench(LocalBackend(), ServerSpec("peer-threading"), tiny_config()).to_dict()  # type: ignore[arg-type]
    assert_complete(result, "peer-threading")
    assert result["server"]["stats"] == {}  # a peer keeps no statistics of ours


def test_bench_command_prints_json_with_every_field() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "--local",
            "--design",
            "fork",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--concurrency",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert_complete(json.loads(result.output), "fork")


def test_bench_command_unknown_design_is_one_line() -> None:
    result = runner.invoke(app, ["bench", "--local", "--design", "nope"])
    assert result.exit_code == 2
    assert "unknown design 'nope'" in result.output and "Traceback" not in result.output
