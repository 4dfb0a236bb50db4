"""``lab bench --fault``: parsing fault specs, where each applies, the timer that injects one,
what :func:`analyse` reads from a series, the loader's series, and a fault bench end to end on
loopback (no Docker). No assertion bounds an elapsed time from above: the machine is noisy."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import PROCESS_POOLS, wait_until
from typer.testing import CliRunner, Result

from lab.cli.app import app
from lab.cli.bench import fault_lines
from lab.measure.bench import BenchError, LocalBackend, ServerSpec, bench
from lab.measure.config import LoadConfig, make_config
from lab.measure.faultbench import (
    BACK_AT,
    BACK_RUN,
    ONE_CONNECTION_WORKERS,
    WORKER_DESIGNS,
    FaultError,
    FaultRun,
    FaultSpec,
    FaultTimer,
    analyse,
    check_applies,
    parse_fault,
)
from lab.measure.load import run_load
from lab.measure.result import LoadResult, merge, merge_series
from lab.sockets.designs import DESIGNS

runner = CliRunner()
STEP = 0.1  # the loaders' series interval, seconds
T = 1000.0  # measure_start of the synthetic loads (UNIX seconds)


# --- parse_fault -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kill-worker", FaultSpec("kill-worker")),
        ("kill-worker:term", FaultSpec("kill-worker", "TERM")),
        ("kill-worker:SEGV", FaultSpec("kill-worker", "SEGV")),
        ("pause", FaultSpec("pause")),
        ("delay:200", FaultSpec("delay", "200")),
        ("delay:200:20", FaultSpec("delay", "200", "20")),
        ("stall", FaultSpec("stall")),
        ("loss:5", FaultSpec("loss", "5")),
        ("loss:100", FaultSpec("loss", "100")),  # the top of the range is allowed
        ("rate:400", FaultSpec("rate", "400")),
        ("partition", FaultSpec("partition", client=1)),  # partition: client 1 by default
        ("partition@3", FaultSpec("partition", client=3)),
        ("switch:fork", FaultSpec("switch", "fork")),
        ("delay:200@2", FaultSpec("delay", "200", client=2)),
        ("loss:5@1", FaultSpec("loss", "5", client=1)),
    ],
)
def test_every_fault_kind_parses_to_its_spec(text: str, expected: FaultSpec) -> None:
    assert parse_fault(text) == expected


def test_the_seconds_a_fault_lasts_are_kept_and_only_instants_ignore_them() -> None:
    assert parse_fault("pause", 2.5).seconds == 2.5
    lasting = {k for k in ("kill-worker", "pause", "stall", "partition") if parse_fault(k).lasts}
    assert lasting == {"pause", "stall", "partition"}
    assert not parse_fault("switch:fork").lasts  # a switch is an instant, like a kill
    assert parse_fault("pause", 2.5).describe() == "pause for 2.5 s"
    assert parse_fault("kill-worker").describe() == "kill-worker"  # no duration on an instant


@pytest.mark.parametrize(
    ("text", "seconds", "fragment"),
    [
        ("bogus", 1.0, "choose kill-worker, pause"),
        ("", 1.0, "choose"),
        ("delay", 1.0, "delay needs a value: delay:MS"),
        ("loss", 1.0, "loss:PCT"),
        ("rate", 1.0, "rate:KBIT"),
        ("switch", 1.0, "switch:DESIGN"),
        ("loss:0", 1.0, "out of range"),
        ("loss:101", 1.0, "out of range"),
        ("delay:-5", 1.0, "out of range"),
        ("delay:200:0", 1.0, "out of range"),  # the jitter too
        ("rate:abc", 1.0, "KBIT is a number"),
        ("delay:200:abc", 1.0, "MS is a number"),
        ("delay:200@0", 1.0, "@N picks a client"),
        ("delay:200@x", 1.0, "@N picks a client"),
        ("@0", 1.0, "choose"),  # no kind at all
        ("kill-worker@2", 1.0, "@N picks a client"),  # only the network faults take a client
        ("pause@1", 1.0, "@N picks a client"),
        ("kill-worker:HUP", 1.0, "KILL, TERM or SEGV"),
        ("pause", 0.0, "--fault-for 0: give a positive number"),
        ("pause", -1.0, "--fault-for -1: give a positive number"),
    ],
)
def test_a_bad_fault_spec_is_a_one_line_fault_error(
    text: str, seconds: float, fragment: str
) -> None:
    with pytest.raises(FaultError) as caught:
        parse_fault(text, seconds)
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message and message.strip() == message


# --- check_applies -----------------------------------------------------------------------------


def test_worker_designs_are_the_process_pools_and_the_process_per_connection_designs() -> None:
    derived = {
        name
        for name, design in DESIGNS.items()
        if design.pool_of == "processes" or design.family == "fork"
    }
    assert set(WORKER_DESIGNS) == derived and len(WORKER_DESIGNS) == len(derived)
    assert set(PROCESS_POOLS) <= set(WORKER_DESIGNS)  # tests/harness.py's own derivation
    assert {"multi-accept", "fork", "sendmsg"} <= set(WORKER_DESIGNS)
    assert not {"select", "thread", "iterative", "asyncio", "thread-pool"} & set(WORKER_DESIGNS)
    # A worker that serves one connection at a time: a worker design, not an event loop.
    assert set(ONE_CONNECTION_WORKERS) == {
        n for n in WORKER_DESIGNS if DESIGNS[n].family != "epoll"
    }
    assert "multi-accept" in ONE_CONNECTION_WORKERS


@pytest.mark.parametrize("design", ["select", "thread", "iterative"])
@pytest.mark.parametrize("containers", [True, False])
def test_kill_worker_is_refused_on_a_design_serving_in_one_process(
    design: str, containers: bool
) -> None:
    with pytest.raises(FaultError, match=f"{design} serves in one process") as caught:
        check_applies(parse_fault("kill-worker"), design, containers)
    assert "multi-accept" in str(caught.value)  # it names designs that do have workers
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("design", ["multi-accept", "fork", "sendmsg"])
@pytest.mark.parametrize("containers", [True, False])
def test_kill_worker_is_accepted_on_a_design_with_worker_processes(
    design: str, containers: bool
) -> None:
    check_applies(parse_fault("kill-worker:term"), design, containers)


@pytest.mark.parametrize(
    "text", ["delay:200", "stall", "loss:5", "rate:400", "partition", "switch:fork"]
)
def test_network_faults_and_switch_need_the_containers(text: str) -> None:
    fault = parse_fault(text)
    with pytest.raises(FaultError, match="needs the containers") as caught:
        check_applies(fault, "select", containers=False)
    assert "drop --local" in str(caught.value)
    check_applies(fault, "select", containers=True)  # the same fault in the containers: fine


def test_pause_runs_locally_on_any_design() -> None:
    for design in DESIGNS:
        check_applies(parse_fault("pause"), design, containers=False)


def test_switch_to_something_that_is_not_a_design_is_refused() -> None:
    with pytest.raises(FaultError, match="switch:nope: not a design"):
        check_applies(parse_fault("switch:nope"), "select", containers=True)
    with pytest.raises(FaultError, match="not a design"):
        check_applies(parse_fault("switch:peer-c-prefork"), "select", containers=True)


@pytest.mark.parametrize("fault", ["pause", "kill-worker", "delay:100"])
def test_a_peer_or_a_users_server_is_refused(fault: str) -> None:
    for server in ("peer-c-prefork", "peer-threading", "user"):
        with pytest.raises(FaultError, match=f"{server} is a peer or your server"):
            check_applies(parse_fault(fault), server, containers=True)


# --- analyse, on series built by hand ------------------------------------------------------------


def load_dict(
    ok: list[int],
    series_errors: dict[str, list[int]] | None = None,
    totals: dict[str, int] | None = None,
    concurrency: int = 8,
) -> dict[str, Any]:
    """A LoadResult.to_dict() as analyse reads it: series, window start, totals, concurrency."""
    series_errors = series_errors or {}
    if totals is None:
        totals = {kind: sum(counts) for kind, counts in series_errors.items()}
    return {
        "series": {"step_s": STEP, "ok": ok, "errors": series_errors},
        "measure_start": T,
        "errors": {"mismatch": 0, "short_read": 0, **totals},
        "config": {"concurrency": concurrency},
    }


def test_analyse_a_kill_whose_dip_lasts_three_intervals() -> None:
    # Interval:  0   1   2    3    4    5   6   7   8    9   10   11   12   13   14   15
    ok = [40, 90, 100, 110, 120, 60, 30, 20, 10, 100, 95, 105, 100, 100, 100, 7]
    errors = {
        "refused": [0, 1],  # before the fault: not its doing
        "reset": [0, 0, 0, 0, 0, 2, 1],  # the killed worker's connection, and a retry's
        "timeout": [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],  # in the dip; long after
    }
    run = analyse(
        load_dict(ok, errors), parse_fault("kill-worker"), T + 0.53, None, "SIGKILL to 42"
    )
    # Before: intervals 0-4, the first (maybe partial) left out: median of 90, 100, 110, 120.
    assert run.before_rps == pytest.approx(105 / STEP)  # (100 + 110) / 2 per 100 ms
    # During an instant: the second from the injection's interval (5) on: intervals 5-14.
    assert run.during_rps == pytest.approx((60 + 30 + 20 + 10 + 100 + 95 + 105 + 100 * 3) / 1.0)
    # Back: from the first interval after the kill (6), the first of three in a row at 80 % of
    # 105 (84): 6, 7, 8 are below; 9, 10, 11 are all above. It begins 0.9 s in: 0.37 s later.
    assert BACK_AT == 0.8 and BACK_RUN == 3
    assert run.recovery_s == pytest.approx(0.9 - 0.53)
    # Counted: from the kill until back — the refusal before and the timeout at 13 are not.
    assert run.errors == {"reset": 3, "timeout": 1}
    assert run.lost == 4 and run.in_flight == 8
    assert run.verified and run.error is None
    assert run.at_s == pytest.approx(0.53) and run.lasted_s == 0.0
    assert run.said == "SIGKILL to 42" and run.fault == "kill-worker"


def test_analyse_a_pause_of_one_second_with_nothing_served_during_it() -> None:
    # Paused from 0.495 s to 1.495 s into the window (intervals 4 to 14).
    ok = [40, 80, 100, 120, 90] + [0] * 10 + [20, 50, 70, 90, 100, 95, 100, 10]
    assert len(ok) == 23
    errors = {
        "refused": [0, 0, 0, 1],  # before: not counted
        "timeout": [0] * 12 + [3] + [0] * 8 + [1],  # during (12); once it is back (21)
    }
    run = analyse(
        load_dict(ok, errors, concurrency=4), parse_fault("pause", 1.0), T + 0.495, T + 1.495
    )
    assert run.before_rps == pytest.approx(100 / STEP)  # median of 80, 100, 120 (0 left out)
    # During: the intervals from the injection's (4) to the undo's (14): 90 requests in 1.1 s.
    assert run.during_rps == pytest.approx(90 / 1.1)
    # Back when three intervals average 80 % of before's lower quartile (80): a sum of 192.
    # From 15 (the first after the undo): 20+50+70 = 140 is short, 50+70+90 = 210 from 16 is
    # back: 1.6 s in, 0.105 s after.
    assert run.recovery_s == pytest.approx(1.6 - 1.495)
    assert run.errors == {"timeout": 3} and run.lost == 3 and run.in_flight == 4
    assert run.lasted_s == pytest.approx(1.0)
    assert run.at_s == pytest.approx(0.495)
    assert run.fault == "pause for 1 s"


def test_analyse_a_run_that_never_recovers_counts_every_error_to_the_end() -> None:
    # After the kill at 0.45 s, throughput stays at half. The last full three intervals
    # (9-11: 50, 50, 100) average 67 %, short of 80; the last one (12) is partial and not
    # judged: never back.
    ok = [10, 100, 100, 100, 60, 50, 50, 50, 50, 50, 50, 100, 100]
    errors = {"reset": [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]}
    run = analyse(load_dict(ok, errors), parse_fault("kill-worker"), T + 0.45, None)
    assert run.before_rps == pytest.approx(1000.0)
    assert run.recovery_s is None
    assert run.errors == {"reset": 3} and run.lost == 3  # to the end, the last interval too
    assert fault_lines(run)[1].endswith("not back by the end of the run")


def test_analyse_a_corrupted_echo_anywhere_in_the_run_is_not_verified() -> None:
    ok = [10, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    clean = analyse(load_dict(ok), parse_fault("kill-worker"), T + 0.35, None)
    assert clean.verified
    # In the run's totals, even outside the fault's stretch (and not in the series at all).
    totals = {"mismatch": 2}
    run = analyse(load_dict(ok, totals=totals), parse_fault("kill-worker"), T + 0.35, None)
    assert not run.verified
    assert "CORRUPTED ECHOES" in fault_lines(run)[2]


def test_analyse_a_short_read_is_a_lost_connection_not_a_corrupted_echo() -> None:
    """A worker killed after reading the request: its socket closes with a FIN, the client's
    echo ends early — every byte that came was right."""
    ok = [10, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    errors = {"short_read": [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]}
    totals = {"short_read": 1}
    run = analyse(load_dict(ok, errors, totals), parse_fault("kill-worker"), T + 0.45, None)
    assert run.verified
    assert run.errors == {"short_read": 1} and run.lost == 1


def test_analyse_a_fault_never_injected_says_so() -> None:
    ok = [10, 100, 100]
    run = analyse(load_dict(ok, concurrency=6), parse_fault("pause"), None, None)
    assert run.error is not None and "never injected" in run.error
    assert run.recovery_s is None and run.lost == 0 and run.in_flight == 6
    assert fault_lines(run) == [f"fault pause for 1 s: not in place — {run.error}"]
    # An injector's own error is kept in its place.
    failed = analyse(load_dict(ok), parse_fault("pause"), None, None, error="no such process")
    assert failed.error == "no such process"


def test_analyse_takes_in_flight_from_the_whole_run_when_given() -> None:
    ok = [10, 100, 100, 100, 100, 100, 100, 100]
    run = analyse(
        load_dict(ok, concurrency=2), parse_fault("kill-worker"), T + 0.25, None, "", None, 8
    )
    assert run.in_flight == 8  # a merged result's config is one loader's share (2)


# --- merging series, and a series in the JSON ----------------------------------------------------


def padded(values: list[int], length: int) -> list[int]:
    return values + [0] * (length - len(values))


def test_merge_series_adds_interval_by_interval_across_lengths_and_unions_the_kinds() -> None:
    a = {"step_s": STEP, "ok": [1, 2, 3], "errors": {"reset": [0, 1]}}
    b = {"step_s": STEP, "ok": [10, 20, 30, 40, 50], "errors": {"timeout": [0, 0, 0, 1]}}
    c = {"step_s": STEP, "ok": [100], "errors": {"reset": [5, 0, 0, 0, 0, 0, 7]}}
    merged = merge_series([a, None, b, c])
    assert merged is not None
    assert merged["step_s"] == STEP
    assert merged["ok"] == [111, 22, 33, 40, 50]
    assert set(merged["errors"]) == {"reset", "timeout"}
    assert padded(merged["errors"]["reset"], 7) == [5, 1, 0, 0, 0, 0, 7]
    assert padded(merged["errors"]["timeout"], 7) == [0, 0, 0, 1, 0, 0, 0]
    assert merge_series([None, None]) is None
    assert a["ok"] == [1, 2, 3]  # the parts are left as they were


def result_with(series: dict[str, Any] | None) -> LoadResult:
    return LoadResult(
        config={"concurrency": 2}, start_at=T - 1, measure_start=T, measure_end=T + 1,
        end=T + 2, requests=sum(series["ok"]) if series else 5, loader_processes=1,
        series=series,
    )  # fmt: skip


def test_a_series_survives_the_json_and_a_run_without_one_has_no_series_key() -> None:
    series = {"step_s": STEP, "ok": [3, 4, 5], "errors": {"reset": [0, 2]}}
    with_series = result_with(series)
    data = json.loads(json.dumps(with_series.to_dict()))
    assert data["series"] == series
    assert LoadResult.from_dict(data).series == series
    without = result_with(None).to_dict()
    assert "series" not in without
    assert LoadResult.from_dict(without).series is None


def test_merging_results_merges_their_series() -> None:
    a = result_with({"step_s": STEP, "ok": [1, 2], "errors": {}})
    b = result_with({"step_s": STEP, "ok": [3, 4, 5], "errors": {"reset": [0, 0, 1]}})
    merged = merge([a, b])
    assert merged.series is not None
    assert merged.series["ok"] == [4, 6, 5] and sum(merged.series["ok"]) == merged.requests
    assert padded(merged.series["errors"]["reset"], 3) == [0, 0, 1]
    assert merge([result_with(None), result_with(None)]).series is None


# --- FaultTimer, with an injector that only records -----------------------------------------------


class Recorder:
    """An Injector that records each call with its UNIX time (and may fail on demand)."""

    def __init__(self, fail_inject: bool = False, fail_undo: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail_inject = fail_inject
        self.fail_undo = fail_undo

    def inject(self, fault: FaultSpec) -> str:
        self.calls.append(("inject", time.time()))
        if self.fail_inject:
            raise RuntimeError("no worker to kill")
        return f"injected {fault.kind}"

    def undo(self, fault: FaultSpec) -> None:
        self.calls.append(("undo", time.time()))
        if self.fail_undo:
            raise RuntimeError("cannot undo")

    def times(self, name: str) -> list[float]:
        return [when for call, when in self.calls if call == name]


def wait_thread(timer: FaultTimer) -> None:
    timer._thread.join(30)
    assert not timer._thread.is_alive()


def test_the_timer_injects_an_instant_after_warmup_plus_at_and_undoes_only_at_finish() -> None:
    injector = Recorder()
    timer = FaultTimer(injector, parse_fault("kill-worker"), at=0.3, warmup=0.2)
    start_at = time.time() + 0.1
    timer.arm(start_at)
    wait_thread(timer)  # an instant: the thread ends once it injected
    assert [call for call, _ in injector.calls] == ["inject"]  # no undo from the thread
    (injected,) = injector.times("inject")
    assert injected >= start_at + 0.2 + 0.3
    assert timer.injected_at is not None and timer.injected_at >= start_at + 0.5
    assert timer.said == "injected kill-worker"
    assert timer.undone_at is None and timer.error is None
    timer.finish()
    assert [call for call, _ in injector.calls] == ["inject", "undo"]  # once more, at the end
    timer.finish()  # again (bench() does): idempotent for the timer
    assert timer.error is None


def test_the_timer_undoes_a_lasting_fault_after_its_seconds_and_once_more_at_finish() -> None:
    injector = Recorder()
    timer = FaultTimer(injector, parse_fault("pause", 0.3), at=0.0, warmup=0.0)
    timer.arm(time.time())
    assert wait_until(lambda: len(injector.times("undo")) == 1, timeout=30)
    (injected,), (undone,) = injector.times("inject"), injector.times("undo")
    assert undone - injected >= 0.3 - 0.001  # its seconds (a lower bound only)
    assert timer.injected_at is not None and timer.undone_at is not None
    assert timer.undone_at - timer.injected_at >= 0.3 - 0.001
    timer.finish()
    assert len(injector.times("undo")) == 2 and timer.error is None


def test_finish_ends_a_lasting_fault_early_and_still_undoes_it() -> None:
    injector = Recorder()
    timer = FaultTimer(injector, parse_fault("pause", 3600.0), at=0.0, warmup=0.0)
    timer.arm(time.time())
    assert wait_until(lambda: len(injector.times("inject")) == 1, timeout=30)
    timer.finish()  # the load ended: no waiting out the hour
    assert not timer._thread.is_alive()
    assert len(injector.times("undo")) == 2  # the thread's, and finish's own
    assert timer.undone_at is not None


def test_re_arming_before_the_fault_fires_moves_it_earlier() -> None:
    injector = Recorder()
    timer = FaultTimer(injector, parse_fault("kill-worker"), at=0.1, warmup=0.1)
    timer.arm(time.time() + 3600)  # a start far away …
    later = time.time()
    timer.arm(later)  # … retried with another: the timer follows
    assert wait_until(lambda: bool(injector.times("inject")), timeout=30)
    assert injector.times("inject")[0] >= later + 0.2
    assert timer.when == pytest.approx(later + 0.2)
    timer.finish()


def test_re_arming_before_the_fault_fires_moves_it_later() -> None:
    injector = Recorder()
    timer = FaultTimer(injector, parse_fault("kill-worker"), at=0.0, warmup=0.1)
    with timer._cond:  # both arms before the thread can look: no race with the first
        timer.arm(time.time() - 10)  # already due …
        later = time.time() + 0.3
        timer.arm(later)  # … but a late start was retried
    assert wait_until(lambda: bool(injector.times("inject")), timeout=30)
    assert injector.times("inject")[0] >= later + 0.1
    timer.finish()


def test_an_injector_that_raises_sets_the_timers_error_and_nothing_else_fails() -> None:
    injector = Recorder(fail_inject=True)
    timer = FaultTimer(injector, parse_fault("pause", 0.2), at=0.0, warmup=0.0)
    timer.arm(time.time())
    wait_thread(timer)
    assert timer.error == "no worker to kill"
    assert timer.said == "" and timer.undone_at is None
    timer.finish()  # does not raise, and still takes the fault away
    assert len(injector.times("undo")) == 1
    assert timer.error == "no worker to kill"  # not replaced


def test_an_undo_that_raises_at_finish_is_reported_not_raised() -> None:
    injector = Recorder(fail_undo=True)
    timer = FaultTimer(injector, parse_fault("kill-worker"), at=0.0, warmup=0.0)
    timer.arm(time.time())
    wait_thread(timer)
    timer.finish()
    assert timer.error == "undo: cannot undo"


def test_finish_before_arm_never_injects() -> None:
    injector = Recorder()
    timer = FaultTimer(injector, parse_fault("kill-worker"), at=0.0, warmup=0.0)
    timer.finish()
    assert not timer._thread.is_alive()
    assert [call for call, _ in injector.calls] == ["undo"]
    assert timer.injected_at is None and timer.error is None
    timer.arm(time.time())  # too late: the timer is done
    assert injector.times("inject") == []


# --- the loader's series, against a real local load ----------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded echo server of the test's own on 127.0.0.1 (not one of the lab's)."""
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_loaders_series_adds_up_to_its_totals(echo_port: int) -> None:
    config = LoadConfig(
        host="127.0.0.1", port=echo_port, concurrency=4, duration=1.0, warmup=0.2, series=True
    )
    result = run_load(config)
    assert result.requests > 0
    series = result.series
    assert series is not None and series["step_s"] == STEP
    assert sum(series["ok"]) == result.requests
    for kind, counts in series["errors"].items():
        assert sum(counts) == result.errors[kind], kind
    assert sum(result.errors.values()) == sum(sum(c) for c in series["errors"].values())
    # The measured second spans ten intervals, each with verified echoes in it.
    assert len(series["ok"]) >= 10 and all(series["ok"][:10]), series["ok"]
    assert result.to_dict()["series"] == series


def test_without_series_the_loader_records_none(echo_port: int) -> None:
    config = LoadConfig(host="127.0.0.1", port=echo_port, concurrency=2, duration=0.3, warmup=0.0)
    result = run_load(config)
    assert result.requests > 0
    assert result.series is None and "series" not in result.to_dict()


# --- end to end: lab bench --local --fault ------------------------------------------------------


def invoke(*args: str) -> Result:
    return runner.invoke(app, ["bench", "--local", *args])


def assert_one_line_error(result: Result, code: int | None, *fragments: str) -> None:
    assert result.exit_code not in (0, None), result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.stderr.startswith("lab bench: error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("design", ["multi-accept", "sendmsg"])
def test_killing_a_worker_loses_at_most_the_connection_it_held(design: str) -> None:
    """multi-accept: the listen queue is shared, so what waits there goes to the other workers;
    sendmsg: every worker reads the one socketpair, so descriptors already queued in it (sent,
    not yet received) go to the others — either way the kill takes only the worker's own."""
    result = invoke(
        "--design", design, "--fault", "kill-worker", "--at", "0.5",
        "--duration", "2", "--warmup", "0.3", "--concurrency", "8", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    fault, load = data["fault"], data["load"]
    assert fault["error"] is None, fault
    assert "SIGKILL" in fault["said"]
    assert fault["at_s"] >= 0.5  # no earlier than --at into the measured window
    assert fault["in_flight"] == 8
    assert 0 <= fault["lost"] <= fault["in_flight"]
    # Such a worker serves one connection at a time: the kill takes one at most.
    assert design in ONE_CONNECTION_WORKERS and fault["lost"] <= 1
    assert fault["lost"] == sum(fault["errors"].values())
    # Independent figures: the series' error buckets from the fault's interval on, and the
    # loader's own totals (nothing failed before the fault).
    series = load["series"]
    start = int(fault["at_s"] / series["step_s"])
    after = {k: sum(v[start:]) for k, v in series["errors"].items() if sum(v[start:])}
    assert fault["errors"] == after
    assert all(sum(v[:start]) == 0 for v in series["errors"].values()), series["errors"]
    assert load["errors_total"] == fault["lost"]
    assert fault["verified"] is True
    assert load["errors"]["mismatch"] == 0  # a short read is the cut one, counted in lost
    assert sum(series["ok"]) == load["requests"]


def test_pausing_select_stops_its_throughput_and_corrupts_no_echo() -> None:
    result = invoke(
        "--design", "select", "--fault", "pause", "--fault-for", "0.5", "--at", "0.5",
        "--duration", "1.5", "--warmup", "0.2", "--concurrency", "8", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    fault, load = data["fault"], data["load"]
    assert fault["error"] is None, fault
    assert "SIGSTOP" in fault["said"]
    assert fault["lasted_s"] >= 0.5 - 0.001
    assert fault["before_rps"] > 0
    assert fault["during_rps"] < fault["before_rps"]
    # From the series itself: in the intervals wholly inside the pause (the first left out as
    # slack), at most one echo per connection can still have arrived.
    series, step = load["series"], load["series"]["step_s"]
    first = int(fault["at_s"] / step) + 2
    last = int((fault["at_s"] + fault["lasted_s"]) / step)  # the undo's interval, excluded
    assert last > first
    assert sum(series["ok"][first:last]) <= 8, series["ok"]
    assert fault["verified"] is True
    assert load["errors"]["mismatch"] == load["errors"]["short_read"] == 0


def test_a_fault_the_injector_cannot_put_in_place_is_reported_and_the_bench_goes_on() -> None:
    class Refusing(LocalBackend):
        def inject(self, fault: FaultSpec) -> str:
            raise BenchError("no worker process at that moment")

    config = make_config("127.0.0.1", port=1, concurrency=2, duration=1.0, warmup=0.1)
    result = bench(Refusing(), ServerSpec("select"), config, parse_fault("pause", 0.2), 0.3)
    assert result.load["requests"] > 0  # the load ran to its end
    assert isinstance(result.fault, FaultRun)
    assert result.fault.error == "no worker process at that moment"
    assert fault_lines(result.fault)[0].endswith("not in place — no worker process at that moment")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--fault", "bogus"], "--fault 'bogus': choose"),
        (["--design", "select", "--fault", "kill-worker"], "select serves in one process"),
        (["--fault", "delay:100"], "needs the containers"),
        (["--design", "peer-threading", "--fault", "pause"], "is a peer or your server"),
    ],
)
def test_a_fault_that_cannot_run_is_a_one_line_error_with_exit_2(
    args: list[str], fragment: str
) -> None:
    assert_one_line_error(invoke(*args), 2, fragment)


@pytest.mark.parametrize("at", ["3", "0"])
def test_at_outside_the_window_or_with_nothing_before_it_is_a_one_line_error(at: str) -> None:
    # --at 0 once left no interval before the fault: a server that never answered again was
    # reported "back" (a throughput of 0 before, so anything was back).
    result = invoke("--design", "select", "--fault", "pause", "--at", at, "--duration", "1")
    assert_one_line_error(result, 2, f"--at {at}: inject between 0.3 s")


def test_nothing_measured_before_the_fault_means_no_recovery_can_be_claimed() -> None:
    # Once: with no interval before the fault the "back" threshold was 0, and a server that
    # never answered again was reported back after 0.1 s.
    ok = [0] * 20  # paused at 0.0004 s for 1 s, and nothing answered ever after
    load = {
        "series": {"step_s": 0.1, "ok": ok, "errors": {}},
        "measure_start": T,
        "errors": {},
        "config": {"concurrency": 8},
    }
    run = analyse(load, parse_fault("pause", 1.0), T + 0.0004, T + 1.0004)
    assert run.recovery_s is None and run.before_rps == 0, run
