"""`lab compare --local`: a tiny sweep writes complete results, keeps them in the history, and
two runs can be compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.measure import compare as sweep
from lab.measure.bench import BenchError, LocalBackend
from lab.measure.claims import INCONCLUSIVE, evaluate
from lab.measure.report import aggregate, cells_for, render
from lab.sockets.designs import DESIGNS

# The module's fixture is one whole sweep (every server, two workloads) that may wait for room in
# the connection-tracking table: its first test carries it, beyond the suite's 120 s per test.
pytestmark = pytest.mark.timeout(600)

TINY = sweep.Matrix(
    sweep.all_servers(),  # every design, variant and peer
    workloads=["connect-per-request", "persistent"],
    concurrency=[2],
    repeats=1,
    duration=0.3,
    warmup=0.1,
    per_connection=5,
)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    out = tmp_path_factory.mktemp("results")
    results = sweep.compare(
        lambda: LocalBackend(keep=True),  # as `lab compare --local`: servers and loaders kept
        TINY,
        environment=sweep.environment(),
        command="lab compare --local",
        quick=True,
    )
    return results, sweep.save(results, out)


def test_tiny_local_compare_has_every_design_workload_and_field(
    tiny_results: tuple[dict[str, object], Path],
) -> None:
    results, path = tiny_results
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["schema"] == sweep.SCHEMA and saved["backend"] == "local"
    cells = {(r["design"], r["workload"]) for r in saved["runs"]}
    assert cells == {(d, w) for d in TINY.designs for w in TINY.workloads}
    for run in saved["runs"]:
        assert "error" not in run, (run["design"], run["workload"], run.get("error"))
        assert run["load"]["requests"] > 0 and run["load"]["errors_total"] == 0, run["design"]
        assert run["server"]["cpu_s_per_1000"] is not None
    spawn_cat = next(r for r in saved["runs"] if r["design"] == "spawn+cat")
    assert spawn_cat["server_options"] == ["--worker-cmd", "cat"]
    # Every pool at the same size, pinned (no growth), except the variant that grows.
    workers = str(TINY.workers)
    for name in sweep.POOL_DESIGNS:
        pool = next(r for r in saved["runs"] if r["design"] == name)
        pinned = ["--max-workers", workers] if DESIGNS[name].grows else []
        assert pool["server_options"] == ["--workers", workers, *pinned]
        assert pool["server"]["stats"]["workers_alive"] == TINY.workers
    grow = next(r for r in saved["runs"] if r["design"] == sweep.GROWING)
    assert grow["server_options"] == [
        "--workers",
        workers,
        "--max-workers",
        str(sweep.GROWTH * TINY.workers),
    ]
    for base, copy in sweep.CONTROLS:
        twin = next(r for r in saved["runs"] if r["design"] == copy)
        original = next(r for r in saved["runs"] if r["design"] == base)
        assert twin["server_options"] == original["server_options"]


def test_every_run_records_its_environment(tiny_results: tuple[dict[str, object], Path]) -> None:
    env = tiny_results[0]["environment"]
    assert isinstance(env, dict)
    for key in ("kernel", "cores", "python", "sysctls", "git_commit", "designs"):
        assert key in env, key
    assert set(env["sysctls"]) == set(sweep.SYSCTLS)
    assert env["designs"]["iterative"]["default_backlog"] == 5


def test_runs_are_kept_and_two_runs_compare(tiny_results: tuple[dict[str, object], Path]) -> None:
    results, path = tiny_results
    db = path.parent.parent / "lab.sqlite"
    second = dict(results, run_id="20991231-000000")
    sweep.store(second, db)
    assert sweep.run_ids(db) == sorted([str(results["run_id"]), "20991231-000000"])
    rows = sweep.changes(db, str(results["run_id"]), "20991231-000000")
    assert len(rows) == len(TINY.designs) * len(TINY.workloads)
    assert all(row["throughput_rps"]["ratio"] == pytest.approx(1.0) for row in rows)
    with pytest.raises(BenchError, match="no run 'nope'"):
        sweep.changes(db, "nope", "20991231-000000")


def test_control_a_design_against_its_identical_copy_is_inconclusive() -> None:
    """A real compare of a design and its copy, three repeats at two concurrencies, repeats
    interleaved: the judging tells them apart in nothing. A fresh server for every run (no
    keep), so the two sides are never one process and start-to-start differences count too.
    Run design by design, a shared machine's drift between the two turns once passed for a
    difference at c=2 (5,657 vs 8,011 req/s, each side's repeats tight)."""
    ((base, copy),) = sweep.CONTROLS
    matrix = sweep.Matrix(
        [base, copy],
        workloads=["connect-per-request"],
        concurrency=[2, 8],
        repeats=3,
        duration=0.5,
        warmup=0.2,
    )
    results = sweep.compare(LocalBackend, matrix)
    assert results["order"] == sweep.INTERLEAVED
    assert not [(r["design"], r["error"]) for r in results["runs"] if "error" in r]
    cells = aggregate(results)
    assert all(c.runs == 3 and c.usable for c in cells)
    control = evaluate(results)[-1]
    assert control.statement.startswith("control:") and copy in control.statement
    assert control.verdict == INCONCLUSIVE, control.evidence
    assert "nothing told apart in 2 comparisons" in control.evidence
    pool = cells_for(cells, copy, "connect-per-request")[8].pool
    assert pool is not None and pool.high == matrix.workers


# --- the sweep's order -----------------------------------------------------------------------


ORDER = sweep.Matrix(
    ["a", "b", "c"], workloads=["connect-per-request", "persistent"], concurrency=[1, 8], repeats=3
)


def test_interleaved_sweep_is_repeat_major_with_the_designs_reversed_on_odd_repeats() -> None:
    cells = sweep.sweep_order(ORDER, sweep.INTERLEAVED)
    every = {(d, w, c, r) for d in "abc" for w in ORDER.workloads for c in (1, 8) for r in range(3)}
    assert len(cells) == len(every) and set(cells) == every  # each cell once
    repeats = [r for *_, r in cells]
    assert repeats == sorted(repeats)  # every cell of repeat 1, then of repeat 2 …
    # Within a repeat, cell by cell, each design in turn: A B C, then C B A, then A B C.
    for repeat, names in ((0, "abc"), (1, "cba"), (2, "abc")):
        this = [cell for cell in cells if cell[3] == repeat]
        assert [d for d, *_ in this] == list(names) * 4
        assert [(w, c) for _, w, c, _ in this[::3]] == [
            (w, c) for w in ORDER.workloads for c in (1, 8)
        ]


def test_design_by_design_sweep_runs_each_designs_repeats_together() -> None:
    cells = sweep.sweep_order(ORDER, sweep.BY_DESIGN)
    assert set(cells) == set(sweep.sweep_order(ORDER, sweep.INTERLEAVED))
    assert [d for d, *_ in cells] == [d for d in "abc" for _ in range(3 * 4)]
    for design in "abc":
        assert [r for d, *_, r in cells if d == design] == [r for r in range(3) for _ in range(4)]


def test_rounds_sweep_restarts_each_design_once_per_repeat_reversed_on_odd_rounds() -> None:
    cells = sweep.sweep_order(ORDER, sweep.ROUNDS)
    assert sorted(cells) == sorted(sweep.sweep_order(ORDER, sweep.INTERLEAVED))  # each once
    turns = [d for i, (d, *_) in enumerate(cells) if i == 0 or cells[i - 1][0] != d]
    # a b c | c b a | a b c: the design ending a round keeps its server into the next round
    assert turns == list("abcbabc")
    for i in range(0, len(cells), 4):  # a turn: that design's four cells of one repeat
        assert len({(d, r) for d, _w, _c, r in cells[i : i + 4]}) == 1


@pytest.mark.parametrize(("many", "quick"), [(True, False), (False, False), (False, True)])
def test_compare_takes_its_order_from_the_backend(many: bool, quick: bool) -> None:
    """A backend that holds many servers is swept interleaved; one that does not, in rounds —
    or design by design in the quick compare (one server start per design); the steps count
    through the same total either way (no server runs here)."""

    class Refusing(LocalBackend):
        holds_many_servers = many

        def start(self, server: object) -> tuple[str, int]:  # type: ignore[override]
            raise BenchError("the server did not answer in time: boom")

    matrix = sweep.Matrix(
        ["fork", "iterative"], workloads=["connect-per-request"], concurrency=[1, 2], repeats=2
    )
    steps: list[sweep.Step] = []
    results = sweep.compare(Refusing, matrix, progress=steps.append, quick=quick)
    order = sweep.INTERLEAVED if many else sweep.BY_DESIGN if quick else sweep.ROUNDS
    assert results["order"] == order
    ran = [(r["design"], r["workload"], r["concurrency"], r["repeat"]) for r in results["runs"]]
    assert ran == sweep.sweep_order(matrix, order)
    assert [s.done for s in steps] == list(range(8)) and {s.total for s in steps} == {8}
    second = "iterative connect-per-request ×1" if many else "fork connect-per-request ×2"
    assert steps[1].what == f"{second} (repeat 1)"
    if order == sweep.ROUNDS:  # the second round starts with the last design
        assert steps[4].what == "iterative connect-per-request ×1 (repeat 2)"


def test_a_local_sweep_interleaves_its_repeats_and_starts_each_server_once() -> None:
    """Repeat 1 of both designs, then repeat 2 (reversed), each server started once for the
    whole sweep and measured in every one of its runs (its own statistics, one idle
    measurement)."""
    made: list[LocalBackend] = []

    def make() -> LocalBackend:
        made.append(LocalBackend(keep=True))
        return made[-1]

    matrix = sweep.Matrix(
        ["multi-accept", "fork"],
        workloads=["connect-per-request"],
        concurrency=[2],
        repeats=3,
        duration=0.2,
        warmup=0.1,
    )
    results = sweep.compare(make, matrix)
    runs = results["runs"]
    assert not [(r["design"], r["error"]) for r in runs if "error" in r]
    assert [(r["design"], r["repeat"]) for r in runs] == [
        ("multi-accept", 0),
        ("fork", 0),
        ("fork", 1),
        ("multi-accept", 1),
        ("multi-accept", 2),
        ("fork", 2),
    ]
    (backend,) = made
    specs = [sweep.server_spec(name, matrix.workers) for name in matrix.designs]
    assert backend.started == specs  # once each, in the order first needed
    assert not backend.servers  # close() stopped them
    for run in runs:
        stats = run["server"]["stats"]
        assert stats["design"] == run["design"]  # the statistics of the server measured
        assert stats["completed"] >= run["load"]["requests"] > 0
    for name in matrix.designs:  # the idle rate: measured once per server, then reused
        rates = {r["server"]["idle_cpu_rate"] for r in runs if r["design"] == name}
        assert len(rates) == 1, (name, rates)


def test_progress_on_a_terminal_is_one_bar_with_cells_done_left_and_time_left() -> None:
    import io

    from rich.console import Console

    from lab.cli.compare import progress_display

    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=120)
    with progress_display(terminal) as show:
        show(sweep.Step(0, 3, "fork connect-per-request ×8 (repeat 1)"))
        show(sweep.Step(1, 3, "fork persistent ×8 (repeat 1)"))
    text = out.getvalue()
    assert "3/3" in text and "0 left" in text and "done" in text  # the bar's last state
    assert "[1/3]" not in text  # no plain lines on a terminal

    piped = io.StringIO()
    with progress_display(Console(file=piped, width=120)) as show:
        show(sweep.Step(0, 3, "fork connect-per-request ×8 (repeat 1)"))
    assert piped.getvalue() == "[1/3] fork connect-per-request ×8 (repeat 1)\n"


def test_latency_curve_runs_open_loop_at_shares_of_the_closed_loop_maximum(tmp_path: Path) -> None:
    """multi-accept takes its maximum from the sweep, fork (not in the sweep) from a closed-loop
    run of its own; each then runs open loop at every share of it. Every request due in the
    window is accounted for: verified, failed, unfinished or never sent."""
    matrix = sweep.Matrix(
        ["multi-accept"],
        workloads=["connect-per-request"],
        concurrency=[4],
        repeats=1,
        duration=0.5,
        warmup=0.2,
        latency_curve=["multi-accept", "fork"],
    )
    results = sweep.compare(LocalBackend, matrix)
    curve = results["latency_curve"]
    assert curve["fractions"] == list(sweep.CURVE_FRACTIONS)
    ma, fork = curve["maximum"]["multi-accept"], curve["maximum"]["fork"]
    (swept,) = results["runs"]
    assert ma["source"] == "the sweep" and ma["concurrency"] == 4
    assert ma["throughput_rps"] == swept["load"]["throughput_rps"]
    assert fork["source"] == "a closed-loop run for the curve"
    assert fork.get("throughput_rps", 0) > 0, fork
    runs = curve["runs"]
    assert [(r["design"], r["fraction"]) for r in runs] == [
        (d, f) for d in ("multi-accept", "fork") for f in sweep.CURVE_FRACTIONS
    ]
    for run in runs:
        assert "error" not in run, run
        maximum = curve["maximum"][run["design"]]["throughput_rps"]
        load = run["load"]
        assert run["rate"] == pytest.approx(run["fraction"] * maximum)
        assert load["config"]["loop"] == "open" and load["config"]["rate"] == run["rate"]
        assert load["requests"] > 0
        due = run["rate"] * matrix.duration
        accounted = load["requests"] + load["errors_total"] + load["unfinished"] + load["unsent"]
        assert abs(accounted - due) <= load["loader"]["processes"] + 1, (accounted, due)
    path = render(results, tmp_path)
    text = path.read_text()
    assert "## Latency under offered load" in text and "latency-curve.png" in text
    assert (tmp_path / "latency-curve.png").is_file()


def test_a_failed_run_is_kept_with_its_error_and_the_sweep_goes_on(tmp_path: Path) -> None:
    class Broken(LocalBackend):
        def start(self, server: object) -> tuple[str, int]:  # type: ignore[override]
            raise BenchError("the server did not answer in time: boom")

    matrix = sweep.Matrix(
        ["fork", "iterative"],
        workloads=["connect-per-request"],
        concurrency=[1],
        repeats=1,
        duration=0.2,
        warmup=0.1,
    )
    results = sweep.compare(Broken, matrix)
    assert [r["error"] for r in results["runs"]] == ["the server did not answer in time: boom"] * 2


def test_compare_command_unknown_latency_curve_design_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lab.cli.app import app

    args = ["compare", "--local", "--latency-curve", "nope", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "unknown design 'nope'" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_unknown_design_names_the_valid_ones() -> None:
    with pytest.raises(BenchError, match="choose from iterative"):
        sweep.check_servers(["iterative", "nope"])


def test_quick_compare_is_three_repeats_of_the_chapter_designs_and_their_c_peers() -> None:
    servers = sweep.quick_servers()
    matrix = sweep.quick_matrix(servers, workers=2)
    assert matrix.repeats == 3 and matrix.duration <= 1.0 and len(matrix.concurrency) == 2
    # one concurrency beyond the iterative design's backlog: claim 1 has its case
    assert max(matrix.concurrency) > DESIGNS["iterative"].default_backlog + 1
    assert set(servers) >= {"iterative", "spawn", "sendmsg", "multi-accept", "fork", "spawn+cat"}
    # issue 8's budget: at most one thread design and one event loop besides
    models = [DESIGNS[d].model for d in servers if d in DESIGNS]
    assert sum("thread" in m for m in models) <= 1 and models.count("an event loop") <= 1
    assert "peer-c-epoll" in servers  # the event loop's ceiling
    assert "multi-accept#2" in servers  # the control claim has its copy to judge
    # the C peer of every family there, derived from the designs (not a hand-kept list)
    for name in servers:
        if sweep.c_peer(name) is not None:
            assert sweep.c_peer(name) in servers
    assert set(sweep.all_servers()) >= set(servers) | {"peer-socat"}


def test_compare_command_writes_results_and_report_and_report_rerenders(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lab.cli.app import app

    runner = CliRunner()
    args = [
        "compare",
        "--local",
        "--designs",
        "iterative,fork",
        "--concurrency",
        "2",
        "--repeats",
        "1",
        "--duration",
        "0.3",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / "results.json").is_file() and (folder / "report.md").is_file()
    assert list(folder.glob("*.png")), "the report has its plots"
    report = (folder / "report.md").read_text()
    saved = json.loads((folder / "results.json").read_text())
    # The claims section: one entry per claim, each with the verdict the data gives.
    claims = evaluate(saved)
    section = report.split("## Claims")[1].split("\n## ")[0]
    entries = [line for line in section.splitlines() if line.startswith("### ")]
    assert entries == [f"### {c.number}. {c.statement} — **{c.verdict}**" for c in claims]
    # Only iterative and fork ran, at c=2: nothing the claims need is there.
    assert all(c.verdict == INCONCLUSIVE for c in claims)
    assert "no measured iterative run beyond the backlog" in claims[0].evidence
    assert "multi-accept did not run" in claims[3].evidence
    assert "lab compare --designs iterative,fork" in saved["command"]
    assert saved["order"] == sweep.INTERLEAVED and "- order: **repeats interleaved**" in report
    assert "the report:" in result.output
    # Not a terminal: one plain line per cell, as it starts, in order — the sweep's (cell by
    # cell, each design in turn), then the full compare's experiments (no pool here: only the
    # idle connections, 0 and 2 held).
    steps = [
        *(
            f"{d} {w} ×2 (repeat 1)"
            for w in ("connect-per-request", "persistent")
            for d in ("iterative", "fork")
        ),
        *(
            f"{d} with {n} idle connection(s) (repeat 1)"
            for d in ("iterative", "fork")
            for n in (0, 2)
        ),
    ]
    cells = [f"[{i}/{len(steps)}] {what}" for i, what in enumerate(steps, start=1)]
    shown = [line for line in result.output.splitlines() if line.startswith("[")]
    assert shown == cells
    assert [r["idle"] for r in saved["idle"]["runs"]] == [0, 2, 0, 2]
    assert "## Idle connections" in report

    (folder / "report.md").unlink()
    again = runner.invoke(app, ["report", str(folder)])
    assert again.exit_code == 0, again.output
    assert (folder / "report.md").is_file()

    run = folder.name
    changes = runner.invoke(app, ["report", "--compare", run, run, "--out", str(tmp_path)])
    assert changes.exit_code == 0, changes.output
    assert "iterative" in changes.output

    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
