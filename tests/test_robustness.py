"""The robustness battery (``lab soak``, ``lab compare --robustness``): its checks on real local
servers, a client that never reads cut by the idle timeout, fuzzing an echo with hypothesis,
the table and the report's sections on synthetic results, the CLI, and the progress count.

Times here are bounds a test waits within to avoid a hang, never measurements: no assertion
bounds an elapsed time from above (the machine is noisy)."""

from __future__ import annotations

import contextlib
import json
import random
import re
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ORIGINAL_MESSAGE, RunningServer, ServerFactory, recv_exactly, stats_when
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lab.cli.app import app
from lab.measure import robustness
from lab.measure.faultbench import WORKER_DESIGNS
from lab.measure.report import fault_bench_lines, robustness_lines
from lab.measure.robustness import (
    CHECKS,
    NON_READER,
    Check,
    battery,
    check_large_echo,
    check_non_reader,
    check_sequential,
    check_slowloris,
    check_storm,
    fault_benches,
    fuzz_case,
    steps,
    table_markdown,
)
from lab.sockets.designs import DESIGNS

runner = CliRunner()
MIB = 1 << 20


def echoes(port: int, message: bytes = ORIGINAL_MESSAGE) -> bool:
    """One connection, one message: whether its echo came back the same (our own client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(message)
        return recv_exactly(sock, len(message)) == message


# --- a client that never reads ------------------------------------------------------------------


# The blocking designs cut it through lab/sockets/echo.py's abort_if_unsent, select through its
# idle wheel's (0adecf7): a plain close would queue the FIN behind the unsent echo.
@pytest.mark.parametrize("design", ["fork", "thread", "select"])
def test_a_client_that_never_reads_is_cut_and_the_others_are_served(design: str) -> None:
    check = check_non_reader(design)
    assert check.passed is True, check
    assert (check.design, check.check) == (design, "non-reader")
    assert f"sent {NON_READER >> 10} KiB unread" in check.figure, check.figure
    assert re.search(r"others served after \d+\.\d s", check.figure), check.figure
    assert re.search(r"cut after \d+\.\d s", check.figure), check.figure


# 1 MiB: the server reads all of it (its receive queue ends empty), so a plain close would
# queue its FIN behind the echo the client never takes: only abort_if_unsent's reset tells the
# client (this case fails without it: d96ce91 for thread, 0adecf7 for select). 4 MiB: the
# server stops reading with input left unread, and the kernel resets such a close anyway.
@pytest.mark.parametrize("size", [1 * MIB, NON_READER])
@pytest.mark.parametrize("design", ["thread", "select"])
def test_the_idle_timeout_resets_a_client_that_never_reads_its_echo(
    design: str, size: int, start_server: ServerFactory
) -> None:
    server = start_server(design, "--idle-timeout", "1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)  # a bound against a hang, not a measurement
    sock.connect(("127.0.0.1", server.port))

    def flood() -> None:
        with contextlib.suppress(OSError):  # the reset, seen by a blocked send
            sock.sendall(b"x" * size)

    sender = threading.Thread(target=flood, daemon=True)
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        sender.start()
        events = poller.poll(20_000)  # without reading: a read would be progress
        assert events, "the server never closed the connection of a client that never read"
        try:  # what the cut was: a reset (or a FIN, once whatever is queued is read)
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    finally:
        sock.close()
        sender.join(10)
    assert not sender.is_alive()
    # The server's own count: it was the idle timeout that cut it.
    stats = stats_when(server, lambda s: s["failed"] == {"idle_timeout": 1})
    assert stats["failed"] == {"idle_timeout": 1}, stats
    assert echoes(server.port)  # and the server serves on


# --- slowloris, storm, large echo, sequential -------------------------------------------------


def test_a_pool_of_two_serves_a_client_behind_idle_ones_once_the_timeout_clears_them() -> None:
    check = check_slowloris("multi-accept", 6)
    assert check.passed is True, check
    found = re.fullmatch(
        r"6 idle: a normal client served after (\d+\.\d) s \(bound (\d+) s\)", check.figure
    )
    assert found, check.figure
    # 2 workers, 6 idle clients ahead, 1 s idle timeout: 6 / 2 * 1 + 5 s of slack.
    assert int(found.group(2)) == 8
    # The idle clients really held the pool: it waited for at least one round of cuts.
    assert float(found.group(1)) >= 0.9, check.figure


def test_an_event_loop_serves_a_client_beside_idle_ones() -> None:
    check = check_slowloris("select", 20)
    assert check.passed is True, check
    assert check.figure.startswith("20 idle: a normal client served after"), check.figure


def test_a_storm_of_connections_each_ends_echoed_or_counted() -> None:
    check = check_storm("select", 150)
    assert check.passed is True, check
    assert "SERVER GONE" not in check.figure
    head, _, rest = check.figure.partition("; ")
    found = re.fullmatch(r"echoed (\d+) of (\d+)", head)
    assert found, check.figure
    others = [int(n) for n in re.findall(r"[a-z_]+ (\d+)", rest)]
    assert int(found.group(2)) == 150
    assert int(found.group(1)) + sum(others) == 150, check.figure
    assert "mismatch" not in rest


def test_a_large_echo_comes_back_whole() -> None:
    check = check_large_echo("thread")
    assert check.passed is True, check
    assert check.figure.startswith("8 MiB echoed whole"), check.figure


def test_sequential_connections_leave_no_descriptor_or_zombie_behind() -> None:
    check = check_sequential("fork", 300)
    assert check.passed is True, check
    found = re.fullmatch(
        r"300 connections, (\d+) failed; descriptors (\d+) → (\d+), zombies (\d+), "
        r"RSS \+(\d+) MiB",
        check.figure,
    )
    assert found, check.figure
    failed, before, after, zombies, _ = (int(g) for g in found.groups())
    assert failed == 0
    assert before == after, check.figure
    assert zombies == 0


# --- fuzz -----------------------------------------------------------------------------------------

FUZZ_DESIGNS = ["select", "multi-accept"]


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[dict[str, RunningServer]]:
    """One server per fuzzed design for the whole module (the fuzz runs many cases on each)."""
    factory = ServerFactory()
    try:
        yield {
            "select": factory("select", "--idle-timeout", "5"),
            "multi-accept": factory("multi-accept", "--idle-timeout", "5", "--workers", "2"),
        }
    finally:
        factory.cleanup()


def _split(length: int, sizes: list[int]) -> list[int]:
    """``sizes`` taken in turn (again from the start when they run out) until they cover
    ``length`` exactly, the last one cut short."""
    chunks, left, i = [], length, 0
    while left > 0:
        size = min(left, sizes[i % len(sizes)])
        chunks.append(size)
        left -= size
        i += 1
    return chunks


payloads = st.one_of(
    st.binary(max_size=2048),
    st.tuples(st.integers(0, 70_000), st.integers(0, 2**32 - 1)).map(
        lambda t: random.Random(t[1]).randbytes(t[0])
    ),
)


@pytest.mark.parametrize("design", FUZZ_DESIGNS)
def test_fuzzed_connections_echo_exactly_on_a_half_close_and_the_server_serves_on(
    design: str, fuzzed: dict[str, RunningServer]
) -> None:
    server = fuzzed[design]
    seen: dict[str, int] = {}

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        payload=payloads,
        sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
        ending=st.sampled_from(["half-close", "reset", "close"]),
    )
    def case(payload: bytes, sizes: list[int], ending: str) -> None:
        chunks = _split(len(payload), sizes)
        assert sum(chunks) == len(payload)
        assert fuzz_case(server.port, payload, chunks, ending), (len(payload), chunks, ending)
        seen[ending] = seen.get(ending, 0) + 1

    case()
    assert seen.get("half-close", 0) > 0, seen  # the exact-echo path was exercised
    assert server.proc.poll() is None, server.lines[-20:]
    assert echoes(server.port)


# --- the table and the report's sections ------------------------------------------------------


def _synthetic(designs: list[str]) -> list[Check]:
    """Checks as battery() orders them; fork's fuzz fails, select's kill-worker does not apply."""
    found = []
    for design in designs:
        for name in CHECKS:
            passed: bool | None = True
            if (design, name) == ("fork", "fuzz"):
                passed = False
            if (design, name) == ("select", "kill-worker"):
                passed = None
            found.append(Check(design, name, f"fig-{design}-{name}", passed, f"why {name}"))
    return found


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by design: their cells, stripped."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| design "):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_table_marks_each_cell_and_has_a_sentence_per_design() -> None:
    text = table_markdown(_synthetic(["fork", "select"]))
    lines = text.splitlines()
    assert lines[0] == "| design | " + " | ".join(CHECKS) + " |"
    assert lines[1] == "|---" * (len(CHECKS) + 1) + "|"
    rows = _rows(text)
    assert set(rows) == {"fork", "select"}
    for design, cells in rows.items():
        assert len(cells) == len(CHECKS)
        for name, cell in zip(CHECKS, cells, strict=True):
            mark = "✓"
            if (design, name) == ("fork", "fuzz"):
                mark = "✗ FAIL"
            if (design, name) == ("select", "kill-worker"):
                mark = "—"
            assert cell == f"{mark} fig-{design}-{name}", (design, name, cell)
    sentences = [line for line in lines if line.startswith("- **")]
    assert [s.split("**")[1] for s in sentences] == ["fork", "select"]
    for sentence in sentences:
        assert sentence.endswith(".")
        assert all(f"{name}: why {name}" in sentence for name in CHECKS)


def test_a_check_missing_from_a_design_leaves_its_cell_empty() -> None:
    checks = [
        Check("fork", "storm", "a", True, ""),
        Check("fork", "pause", "b", True, ""),
        Check("select", "storm", "c", False, "it broke"),
    ]
    text = table_markdown(checks)
    assert text.splitlines()[0] == "| design | storm | pause |"
    assert _rows(text) == {"fork": ["✓ a", "✓ b"], "select": ["✗ FAIL c", ""]}
    assert "- **select** — storm: it broke." in text


def test_the_robustness_section_says_every_check_passed_or_which_failed() -> None:
    passing = [c.to_dict() for c in _synthetic(["select"])]
    lines = robustness_lines({"robustness": passing})
    assert lines[0] == "## Robustness"
    assert "Every check passed." in lines
    assert not any(line.startswith("Failed:") for line in lines)
    text = "\n".join(lines)
    assert "| design | " + " | ".join(CHECKS) + " |" in text
    assert "— fig-select-kill-worker" in text  # does not apply: not a failure

    failing = [c.to_dict() for c in _synthetic(["fork", "select"])]
    lines = robustness_lines({"robustness": failing})
    assert "Failed: fork fuzz." in lines
    assert "Every check passed." not in lines
    assert robustness_lines({}) == [] and robustness_lines({"robustness": []}) == []


def _run(**over: Any) -> dict[str, Any]:
    run = {
        "fault": "kill-worker",
        "at_s": 1.0,
        "lasted_s": 0.0,
        "said": "killed 123",
        "before_rps": 2000.0,
        "during_rps": 500.0,
        "recovery_s": 0.3,
        "errors": {"reset": 1},
        "lost": 1,
        "in_flight": 6,
        "verified": True,
        "error": None,
    }
    return {**run, **over}


def _fault_rows(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in lines:
        if line.startswith("| ") and not line.startswith("| design "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_the_fault_section_has_a_row_per_run_and_says_which_did_not_run() -> None:
    results = {
        "faults": [
            {"design": "fork", "fault": "kill-worker", "run": _run(), "series": None},
            {
                "design": "iterative",
                "fault": "delay:300@1",
                "run": _run(fault="delay", before_rps=0.0, during_rps=0.0, recovery_s=None),
                "series": None,
            },
            {"design": "spawn", "fault": "kill-worker", "error": "no server: it crashed"},
            {
                "design": "sendmsg",
                "fault": "kill-worker",
                "run": _run(error="no worker to kill"),
                "series": None,
            },
            {
                "design": "multi-accept",
                "fault": "kill-worker",
                "run": _run(verified=False, errors={}),
                "series": None,
            },
        ]
    }
    lines = fault_bench_lines(results)
    assert lines[0] == "## Under faults"
    rows = _fault_rows(lines)
    assert len(rows) == 5
    assert rows[("fork", "kill-worker")] == [
        "2,000",
        "500 (25%)",  # 500 / 2000, worked out by hand
        "0.3 s",
        "1 of 6 (reset 1)",
        "yes",
    ]
    # Nothing before the fault: no share of zero, no division by it.
    assert rows[("iterative", "delay:300@1")][:3] == ["0", "0", "not back"]
    assert rows[("spawn", "kill-worker")][-1] == "not run: no server: it crashed"
    assert rows[("sendmsg", "kill-worker")][-1] == "not run: no worker to kill"
    assert rows[("multi-accept", "kill-worker")][-2:] == ["1 of 6 (none)", "CORRUPTED"]
    assert fault_bench_lines({}) == [] and fault_bench_lines({"faults": []}) == []


def test_a_plot_is_drawn_per_fault_that_has_a_series_and_none_for_those_without(
    tmp_path: Path,
) -> None:
    from lab.measure.plots import draw

    series = {"step_s": 0.1, "ok": [10] * 20 + [2] * 5 + [10] * 20, "errors": {}}
    results = {
        "faults": [
            {"design": "fork", "fault": "kill-worker", "run": _run(), "series": series},
            {"design": "multi-accept", "fault": "kill-worker", "run": _run(), "series": series},
            {
                "design": "thread",
                "fault": "delay:300@1",
                "run": _run(lasted_s=2.0),
                "series": series,
            },
            {"design": "spawn", "fault": "pause", "error": "it crashed"},  # no run, no series
            {"design": "iterative", "fault": "stall", "run": _run(), "series": None},
        ]
    }
    plots, _ = draw([], [], tmp_path, results=results)
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.filename for p in plots) == drawn
    assert drawn == ["fault-delay-300-1.png", "fault-kill-worker.png"]  # one per fault


# --- the CLI ----------------------------------------------------------------------------------


def test_soak_with_an_unknown_design_is_a_one_line_usage_error() -> None:
    result = runner.invoke(app, ["soak", "--designs", "nope"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nope" in lines[0] and all(d in lines[0] for d in DESIGNS), lines[0]
    assert "Traceback" not in result.output


def test_soak_quick_on_select_writes_its_table_and_every_check(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["soak", "--designs", "select", "--quick", "--connections", "200", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.glob("soak-*")
    checks = json.loads((folder / "robustness.json").read_text())
    assert [c["check"] for c in checks] == list(CHECKS)
    assert {c["design"] for c in checks} == {"select"}
    assert all(c["passed"] in (True, None) for c in checks), checks
    by_name = {c["check"]: c for c in checks}
    assert by_name["kill-worker"]["passed"] is None  # select serves in one process
    assert by_name["sequential"]["figure"].startswith("200 connections, 0 failed")
    table = (folder / "robustness.md").read_text()
    assert "| design | " + " | ".join(CHECKS) + " |" in table
    assert "| design | " in result.output


# --- progress -----------------------------------------------------------------------------------


@pytest.mark.parametrize("containers", [False, True])
def test_steps_counts_every_progress_call_of_the_battery_and_the_fault_benches(
    containers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    designs = ["iterative", "fork", "select", "multi-accept", "peer-threading"]

    def fake_check(design: str, *_: Any) -> Check:
        return Check(design, "x", "", True, "")

    for name in (
        "check_storm",
        "check_slowloris",
        "check_non_reader",
        "check_large_echo",
        "check_sequential",
        "check_fuzz",
        "check_fault",
    ):
        monkeypatch.setattr(robustness, name, fake_check)

    def no_bench(*_: Any, **__: Any) -> Any:
        raise RuntimeError("not here")

    monkeypatch.setattr(robustness, "bench", no_bench)
    calls: list[tuple[str, str]] = []

    def progress(design: str, what: str) -> None:
        calls.append((design, what))

    found = fault_benches(None, designs, containers, 2, progress)
    assert all(f["error"] == "not here" for f in found)
    ours = [d for d in designs if d in DESIGNS]  # as lab compare passes them
    battery(ours, quick=True, progress=progress)
    # By hand: 4 lab designs × every check, a kill for each process design, a delay each
    # in the containers.
    kills = sum(d in WORKER_DESIGNS for d in ours)
    assert kills == 2  # fork, multi-accept
    expected = 4 * len(CHECKS) + kills + (4 if containers else 0)
    assert len(calls) == expected
    assert steps(designs, containers) == expected
