"""The kv workload on loopback: every design serves it with no update lost — also with a worker
killed mid-run — the check catches servers that lose updates or answer wrongly, and the
workload's options refuse what makes no sense with a one-line error."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import ServerFactory, children_of
from typer.testing import CliRunner

from lab.cli.app import app
from lab.measure import kvcheck
from lab.measure.bench import BenchError, LocalBackend, ServerSpec, bench
from lab.measure.config import make_config, parse_mix
from lab.measure.errors import ConfigError
from lab.measure.kvload import counter_key
from lab.sockets.designs import DESIGNS

runner = CliRunner()
USER_KV = Path(__file__).with_name("user_kv.py")
# Many INCRs on few counters: concurrent writers on one key, the case a lost update needs.
KV = {
    "workload": "kv",
    "mix": "get=30,set=20,incr=45,del=5",
    "keys": 20,
    "concurrency": 6,
    "processes": 2,
    "per_connection": 20,
    "duration": 0.6,
    "warmup": 0.1,
}
# The designs whose connections are served by processes a kill can take away mid-run.
PROCESS_DESIGNS = [
    name
    for name, design in DESIGNS.items()
    if design.pool_of == "processes" or design.family == "fork"
]


def kv_config(**overrides: object) -> object:
    return make_config("127.0.0.1", port=1, **{**KV, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize("design", list(DESIGNS))
def test_every_design_serves_kv_and_stores_every_acknowledged_incr(design: str) -> None:
    result = bench(LocalBackend(), ServerSpec(design), kv_config()).to_dict()  # type: ignore[arg-type]
    load, verdict = result["load"], result["kv_check"]
    assert load["requests"] > 0 and load["errors_total"] == 0, load["errors"]
    assert "--service" in result["server_options"] and "--db" in result["server_options"]
    assert verdict["ok"], verdict["examples"]
    assert verdict["acknowledged"] > 0 and verdict["unanswered"] == 0
    # Two independent readings of the same counters, each equal to the loaders' own count.
    for source in ("server", "file"):
        assert verdict["sources"][source] == {
            "stored": verdict["acknowledged"],
            "lost": 0,
            "extra": 0,
        }


@pytest.mark.parametrize("design", PROCESS_DESIGNS)
def test_a_worker_killed_mid_run_loses_no_acknowledged_incr(design: str, tmp_path: Path) -> None:
    """A kill can take an INCR that committed before its reply: acknowledged ≤ stored ≤
    acknowledged + unanswered, per counter."""
    db = str(tmp_path / "kv.sqlite")
    backend = LocalBackend()
    # No warm-up: from its first command the run is measured, and so is what the kill does.
    config = kv_config(mix="incr=1", duration=1.5, warmup=0.0, per_connection=1000)
    killed: list[int] = []

    def kill_all() -> None:
        """Once the run's INCRs are committing, every serving child at once: each takes the
        connections it was serving, and whatever INCR was in flight on them."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stored = kvcheck.read_file(db, config.tag).stored  # type: ignore[attr-defined]
            if stored and sum(stored.values()) >= 200:
                break
            time.sleep(0.01)
        server = backend.current
        for child in children_of(server.pid) if server is not None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
                killed.append(child)

    killer = threading.Thread(target=kill_all)
    killer.start()
    result = bench(backend, ServerSpec(design, ("--db", db)), config).to_dict()  # type: ignore[arg-type]
    killer.join()
    assert killed, "no worker was there to kill"
    assert result["load"]["errors_total"] > 0, result["load"]["errors"]  # the kill cut some
    verdict = result["kv_check"]
    assert verdict["ok"], verdict["examples"]
    assert verdict["acknowledged"] > 0
    for source in ("server", "file"):
        stored = verdict["sources"][source]["stored"]
        assert verdict["acknowledged"] <= stored <= verdict["acknowledged"] + verdict["unanswered"]


def user_kv(*mode: str) -> ServerSpec:
    command = shlex.join([sys.executable, str(USER_KV), "{port}", "--host", "{host}", *mode])
    return ServerSpec("lossy", command=command)


def test_the_check_fails_a_server_that_acknowledges_incrs_it_does_not_store() -> None:
    """Each reply looks right to its client; only the end's reading shows what was lost."""
    result = bench(LocalBackend(), user_kv("--lose", "7"), kv_config(mix="incr=1")).to_dict()  # type: ignore[arg-type]
    verdict = result["kv_check"]
    assert result["load"]["errors_total"] == 0  # no reply gave it away
    assert not verdict["ok"]
    server = verdict["sources"]["server"]
    assert server["lost"] > 0
    # Every 7th increment of a counter was dropped: stored = acknowledged - (its count // 7).
    assert server["stored"] < verdict["acknowledged"]
    assert any("acknowledged" in line and "stored" in line for line in verdict["examples"])
    assert "LOST OR EXTRA UPDATES" in kvcheck.KvCheck(**verdict).line


def test_replies_that_cannot_be_right_are_mismatches() -> None:
    """A server that answers OK to everything: GET, INCR (and any wrong value) are caught per
    reply; SET and DEL replies are right."""
    config = kv_config(mix="get=1,set=1,incr=1,del=1")
    load = bench(LocalBackend(), user_kv("--answer-ok"), config).to_dict()["load"]  # type: ignore[arg-type]
    assert load["errors"]["mismatch"] > 0 and load["requests"] > 0


def test_the_check_reads_counters_from_the_file_and_through_the_server_alike(
    tmp_path: Path,
) -> None:
    """Counters read back from an explicit --db, both ways, hold the loaders' counts."""
    db = tmp_path / "kv.sqlite"
    spec = ServerSpec("select", ("--db", str(db)))
    config = kv_config(mix="incr=1", keys=3)
    result = bench(LocalBackend(), spec, config).to_dict()  # type: ignore[arg-type]
    assert result["server_options"].count("--db") == 1 and db.exists()
    tag = result["kv_check"]["tag"]
    file = kvcheck.read_file(str(db), tag)
    assert (
        file.stored is not None and sum(file.stored.values()) == result["kv_check"]["acknowledged"]
    )
    assert set(file.stored) <= {counter_key(tag, i) for i in range(3)}


def test_a_database_the_server_cannot_have_is_one_line() -> None:
    reading = kvcheck.read_file("/nonexistent/kv.sqlite", "t")
    assert reading.stored is None and reading.error and "\n" not in reading.error


def test_the_verdict_allows_an_unanswered_incr_to_have_committed_or_not() -> None:
    tag = "t"
    counts = {"tag": tag, "counters": {"0": [5, 2], "1": [3, 0]}}
    key0, key1 = counter_key(tag, 0), counter_key(tag, 1)

    def verdict(stored: dict[str, int]) -> kvcheck.KvCheck:
        return kvcheck.check(counts, [kvcheck.Reading("file", stored)])

    assert verdict({key0: 5, key1: 3}).ok and verdict({key0: 7, key1: 3}).ok
    lost = verdict({key0: 4, key1: 3})
    assert not lost.ok and lost.sources["file"]["lost"] == 1
    extra = verdict({key0: 8, key1: 3})
    assert not extra.ok and extra.sources["file"]["extra"] == 1
    stranger = verdict({key0: 5, key1: 3, counter_key(tag, 9): 1})  # never incremented
    assert not stranger.ok and stranger.sources["file"]["extra"] == 1


def test_peers_and_echo_services_are_refused_for_kv_and_kv_for_echo() -> None:
    with pytest.raises(BenchError, match="only echoes"):
        bench(LocalBackend(), ServerSpec("peer-threading"), kv_config())  # type: ignore[arg-type]
    with pytest.raises(BenchError, match="does not speak kv"):
        bench(LocalBackend(), ServerSpec("select", ("--service", "echo")), kv_config())  # type: ignore[arg-type]
    echo = make_config("127.0.0.1", port=1, duration=0.2)
    with pytest.raises(BenchError, match="use --workload kv"):
        bench(LocalBackend(), ServerSpec("select", ("--service", "kv")), echo)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"mix": "get"}, "command=weight"),
        ({"mix": "get=1,put=2"}, "unknown command 'put'"),
        ({"mix": "get=1,get=2"}, "twice"),
        ({"mix": "get=0"}, "weight above 0"),
        ({"keys": 0}, "--keys"),
        ({"distribution": "pareto"}, "uniform, zipf"),
        ({"distribution": "zipf:0"}, "0 < S"),
        ({"size": 5000}, "value's size"),
        ({"tag": "a b"}, "--tag"),
    ],
)
def test_bad_kv_options_are_one_line_errors(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as caught:
        make_config("127.0.0.1", workload="kv", **options)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_kv_options_belong_to_the_kv_workload() -> None:
    with pytest.raises(ConfigError, match="--mix applies to the kv workload only"):
        make_config("127.0.0.1", workload="persistent", mix="get=1")
    config = make_config("127.0.0.1", workload="kv", per_connection=7)
    assert config.per_connection == 7 and config.persistent and len(config.tag) == 8
    assert parse_mix(config.mix) == {"get": 80, "set": 15, "incr": 5}
    assert make_config("127.0.0.1", workload="kv").tag != config.tag  # every run its own


def test_zipf_makes_the_first_keys_the_hot_ones() -> None:
    """The loader's key choice, counted: under zipf key 0 is drawn far more than the median."""
    from lab.measure.kvload import KvLoader
    from lab.measure.loader import LoaderPlan
    from lab.measure.target import Target

    config = make_config("127.0.0.1", workload="kv", keys=100, distribution="zipf")
    plan = LoaderPlan(0, config, Target("127.0.0.1", 1, 2, ("127.0.0.1", 1)), 1, None, 7)
    loader = KvLoader(plan)
    draws = [loader._pick_key() for _ in range(20_000)]
    counts = [draws.count(k) for k in range(100)]
    # P(k) ∝ 1/(k+1): key 0 about 50 times key 49's share.
    assert counts[0] > 20 * max(counts[49], 1) and min(draws) == 0 and max(draws) < 100


# --- through the commands --------------------------------------------------------------------


def test_lab_load_runs_kv_against_a_server_and_checks_its_counters(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = start_server("thread-pool", "--service", "kv", "--db", str(tmp_path / "kv.sqlite"))
    args = ["load", "127.0.0.1", "--port", str(server.port), "--workload", "kv", "-c", "4"]
    args += ["--mix", "get=1,incr=1", "--keys", "5", "--duration", "0.4", "--warmup", "0.1"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "kv (get=1,incr=1 over 5 keys, uniform" in out.output
    (line,) = [x for x in out.output.splitlines() if x.startswith("no lost update")]
    acknowledged = int(line.split(" INCRs acknowledged")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert acknowledged > 0 and f"stored: server {acknowledged:,}" in line


def test_lab_bench_fails_a_run_whose_server_lost_updates() -> None:
    command = shlex.join(
        [sys.executable, str(USER_KV), "{port}", "--host", "{host}", "--lose", "3"]
    )
    args = ["bench", "--local", "--server-cmd", command, "--workload", "kv", "--mix", "incr=1"]
    out = runner.invoke(app, [*args, "--duration", "0.4", "--warmup", "0.1", "--concurrency", "2"])
    assert out.exit_code == 1
    assert "LOST OR EXTRA UPDATES" in out.output and "acknowledged" in out.output


def test_lab_bench_refuses_db_where_it_cannot_apply(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "kv.sqlite"
    for args, fragment in [
        (["--design", "select", "--db", str(missing), "--local"], "no folder"),
        (["--design", "select", "--db", str(tmp_path / "kv.sqlite")], "data volume"),
        (["--design", "peer-threading", "--db", str(tmp_path / "kv"), "--local"], "not one of"),
    ]:
        out = runner.invoke(app, ["bench", "--workload", "kv", *args])
        assert out.exit_code == 2 and fragment in out.output, out.output


def test_lab_compare_workload_kv_runs_the_designs_beside_echo_and_judges_them(
    tmp_path: Path,
) -> None:
    """kv joins the echo workloads; the peer runs echo only; every kv run is checked, the
    report has its section and the claim its evidence."""
    import json

    args = ["compare", "--local", "--designs", "select,thread-pool,peer-threading"]
    args += ["--workload", "kv", "--mix", "get=50,incr=50", "--keys", "10", "--concurrency", "2"]
    args += ["--repeats", "2", "--duration", "0.3", "--no-experiments", "--out", str(tmp_path)]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    (results_file,) = tmp_path.glob("*/results.json")
    results = json.loads(results_file.read_text())
    kv_runs = [r for r in results["runs"] if r["workload"] == "kv"]
    assert sorted({r["design"] for r in kv_runs}) == ["select", "thread-pool"]
    assert len(kv_runs) == 4 and all(r["kv_check"]["ok"] for r in kv_runs)
    assert {r["workload"] for r in results["runs"] if r["design"] == "peer-threading"} == {
        "connect-per-request",
        "persistent",
    }
    assert results["matrix"]["mix"] == "get=50,incr=50" and results["matrix"]["keys"] == 10
    assert "--workload connect-per-request,persistent,kv" in results["command"]
    report = (results_file.parent / "report.md").read_text()
    assert "## The worker that does real work (kv)" in report and "### kv" in report
    assert "when the worker does real work" in report
    assert "echo ×" in report and "kv ×" in report  # the claim compared them


def test_lab_compare_refuses_kv_options_without_kv_and_unknown_workloads(tmp_path: Path) -> None:
    base = ["compare", "--local", "--designs", "select", "--out", str(tmp_path)]

    def error(*args: str) -> str:
        out = runner.invoke(app, [*base, *args])
        assert out.exit_code == 2
        return " ".join(out.output.replace("│", " ").split())  # the error box, unwrapped

    assert "add --workload kv" in error("--mix", "get=1")
    assert "unknown workload 'echo'" in error("--workload", "kv,echo")
