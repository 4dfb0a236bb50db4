"""The claims: each gives "holds", "does not hold" and "inconclusive" on data made for it; and
the control (a design against an identical copy of itself) comes out inconclusive."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from test_report import failed_run, kv_verdict, make_results, make_run

from lab.measure import claims as claims_module
from lab.measure import distribution
from lab.measure.claims import HOLDS, INCONCLUSIVE, NOT_HOLDS, POOLS, Claim, evaluate
from lab.measure.compare import ACCEPT_LOCKS, CONTROLS, GROWING, POOL_DESIGNS, VARIANTS
from lab.measure.report import aggregate, cells_for
from lab.sockets.designs import DESIGNS
from lab.sockets.pool import PoolServer

SLOW = (100, 200, 1_100_000)  # one SYN retransmission
CPR = "connect-per-request"


def design(
    name: str,
    cpu: Sequence[float] = (0.1,),
    tp: Sequence[float] = (1000.0,),
    concurrencies: Sequence[int] = (8,),
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """One run per repeat (the longer of ``cpu`` and ``tp``) at each concurrency."""
    repeats = max(len(cpu), len(tp))
    return [
        make_run(
            name,
            c,
            repeat=r,
            cpu_ms=cpu[min(r, len(cpu) - 1)],
            throughput=tp[min(r, len(tp) - 1)],
            latencies_us=(100, 200),
            **kwargs,
        )
        for c in concurrencies
        for r in range(repeats)
    ]


def claim(number: int, *runs: list[dict[str, Any]], **parts: Any) -> Claim:
    results = make_results([run for group in runs for run in group])
    results.update(parts)  # other parts of results.json: "distribution" …
    result = evaluate(results)[number - 1]
    assert result.number == number
    return result


#: The control's number: the last claim.
CONTROL_CLAIM = len(evaluate(make_results([])))


def test_every_claim_and_the_control_with_every_field() -> None:
    claims = evaluate(make_results(design("fork")))
    assert [c.number for c in claims] == list(range(1, CONTROL_CLAIM + 1))
    assert claims[-1].statement.startswith("control:")
    for c in claims:
        assert c.statement and c.source and c.measurement and c.evidence
        assert c.verdict in (HOLDS, NOT_HOLDS, INCONCLUSIVE)


def test_nothing_measured_is_inconclusive_everywhere() -> None:
    claims = evaluate(make_results([failed_run(d) for d in ("iterative", "spawn", "fork")]))
    assert all(c.verdict == INCONCLUSIVE for c in claims)


# --- 1. iterative ---------------------------------------------------------------------------


def test_iterative_holds_delayed_not_refused() -> None:
    c = claim(
        1,
        [make_run("iterative", 4)],
        [make_run("iterative", 16, overflows=9, latencies_us=SLOW, repeat=r) for r in range(2)],
    )
    assert c.verdict == HOLDS
    assert "overflows 18" in c.evidence and "refused 0" in c.evidence


def test_iterative_holds_on_connect_timeouts() -> None:
    run = make_run("iterative", 16, overflows=3, errors={"connect_timeout": 4})
    assert claim(1, [run]).verdict == HOLDS


@pytest.mark.parametrize(
    ("overflows", "errors"),
    [(9, {"refused": 3}), (0, {})],
    ids=["refused", "no-overflow"],
)
def test_iterative_does_not_hold(overflows: int, errors: dict[str, int]) -> None:
    run = make_run("iterative", 16, overflows=overflows, latencies_us=SLOW, errors=errors)
    assert claim(1, [run]).verdict == NOT_HOLDS


def test_iterative_delays_from_a_full_conntrack_table_are_no_evidence() -> None:
    """SYN retransmits caused by the firewall's table look like the backlog's: not judged."""
    run = make_run("iterative", 16, overflows=9, latencies_us=SLOW, conntrack_drops=40)
    c = claim(1, [run])
    assert c.verdict == INCONCLUSIVE
    assert "connection-tracking table was full (40 packets dropped)" in c.evidence


def test_iterative_inconclusive_within_the_backlog() -> None:
    c = claim(1, [make_run("iterative", 4, overflows=2)], design("fork"))
    assert c.verdict == INCONCLUSIVE and "beyond the backlog" in c.evidence


def test_iterative_inconclusive_overflow_without_delay() -> None:
    assert claim(1, [make_run("iterative", 16, overflows=2)]).verdict == INCONCLUSIVE


# --- 2. spawn ------------------------------------------------------------------------------------


def test_spawn_holds_and_reports_spawn_cat() -> None:
    c = claim(
        2,
        design("spawn", cpu=(19, 20, 21)),
        design("spawn+cat", cpu=(2, 2.1, 2.2)),
        design("multi-accept", cpu=(0.1, 0.11, 0.12)),
        design("sendmsg", cpu=(0.2, 0.21, 0.22)),
    )
    assert c.verdict == HOLDS
    assert "spawn+cat" in c.evidence and "single run" not in c.evidence
    # The verdict carries each side's spread: median (min–max over repeats).
    for spread in ("20.000 (19.000–21.000)", "0.110 (0.100–0.120)", "0.210 (0.200–0.220)"):
        assert spread in c.evidence, spread


def test_spawn_does_not_hold_when_cheaper() -> None:
    c = claim(2, design("spawn", cpu=(0.05, 0.06)), design("multi-accept", cpu=(0.1, 0.11)))
    assert c.verdict == NOT_HOLDS


def test_spawn_inconclusive() -> None:
    overlap = claim(2, design("spawn", cpu=(0.1, 0.3)), design("multi-accept", cpu=(0.2, 0.25)))
    assert overlap.verdict == INCONCLUSIVE and "overlap" in overlap.evidence
    missing = claim(2, design("multi-accept"), design("sendmsg"))
    assert missing.verdict == INCONCLUSIVE and "spawn did not run" in missing.evidence


def test_a_single_run_is_never_clear() -> None:
    c = claim(2, design("spawn", cpu=(20,)), design("multi-accept", cpu=(0.1,)))
    assert c.verdict == INCONCLUSIVE and "single run" in c.evidence
    assert claim(3, _sendmsg((400,), repeats=1)).verdict == INCONCLUSIVE
    assert claim(5, design("fork", cpu=(2.0,)), design("sendmsg", cpu=(0.1,))).verdict == (
        INCONCLUSIVE
    )


def test_spreads_apart_by_less_than_the_noise_are_not_clear() -> None:
    """Two repeats each, spreads apart by a hair (3 %): not clear, whatever the old rule of
    non-overlapping spreads said."""
    c = claim(
        6,
        design("multi-accept", cpu=(0.100, 0.101), tp=(1000, 1010)),
        design("sendmsg", cpu=(0.103, 0.104), tp=(1030, 1040)),
    )
    assert c.verdict == INCONCLUSIVE and "not clearly apart" in c.evidence
    (ma,) = cells_for(aggregate(make_results(design("multi-accept"))), "multi-accept", CPR).values()
    assert ma.cpu_s_per_1000 is not None and not ma.cpu_s_per_1000.repeated


def test_the_lists_of_designs_are_the_registries() -> None:
    assert set(POOLS) == {n for n, d in DESIGNS.items() if issubclass(d, PoolServer)}
    assert set(POOL_DESIGNS) == {n for n, d in DESIGNS.items() if d.pool_of is not None}
    assert set(POOLS) <= set(POOL_DESIGNS)
    # The growing variant runs a design whose pool does grow (the others would ignore growth).
    assert DESIGNS[VARIANTS[GROWING].design].grows
    assert CONTROLS and all(VARIANTS[copy].design == base for base, copy in CONTROLS)


# --- 3. sendmsg ----------------------------------------------------------------------------------


def _sendmsg(top: Sequence[float], repeats: int = 2, **kwargs: Any) -> list[dict[str, Any]]:
    """The growing sendmsg: its best at c=1, ``top`` at c=64."""
    best = (1000, 1010)[:repeats]
    return design(GROWING, tp=best, concurrencies=(1,)) + design(
        GROWING, tp=top, concurrencies=(64,), shed=5, **kwargs
    )


def test_sendmsg_holds_and_counts_sheds() -> None:
    c = claim(3, _sendmsg((900, 950)))
    assert c.verdict == HOLDS and "shed 10" in c.evidence and GROWING in c.measurement


def test_sendmsg_is_judged_on_its_growing_pool_only() -> None:
    pinned = design("sendmsg", tp=(1000, 1010), concurrencies=(1,)) + design(
        "sendmsg", tp=(400, 500), concurrencies=(64,)
    )
    c = claim(3, pinned)
    assert c.verdict == INCONCLUSIVE and f"{GROWING} did not run" in c.evidence


def test_sendmsg_does_not_hold() -> None:
    assert claim(3, _sendmsg((400, 500))).verdict == NOT_HOLDS


def test_sendmsg_inconclusive() -> None:
    assert claim(3, _sendmsg((700, 900))).verdict == INCONCLUSIVE  # straddles 80 %
    bound = claim(3, _sendmsg((900, 950), loader_bound=True))
    assert bound.verdict == INCONCLUSIVE and "loader-bound" in bound.evidence
    assert claim(3, design(GROWING)).verdict == INCONCLUSIVE  # one concurrency


# --- 4. multi-accept best of four ----------------------------------------------------------------


def _four(**rivals: tuple[Sequence[float], Sequence[float]]) -> list[list[dict[str, Any]]]:
    """multi-accept at 2000 req/s, 0.05 ms/req; the others at 1000, 0.1 unless given."""
    groups = [design("multi-accept", cpu=(0.05, 0.055), tp=(2000, 2100), concurrencies=(1, 8))]
    for name in ("iterative", "spawn", "sendmsg"):
        cpu, tp = rivals.get(name, ((0.1, 0.11), (1000, 1100)))
        groups.append(design(name, cpu=cpu, tp=tp, concurrencies=(1, 8)))
    return groups


def test_multi_accept_holds() -> None:
    assert claim(4, *_four()).verdict == HOLDS


def test_multi_accept_does_not_hold() -> None:
    c = claim(4, *_four(sendmsg=((0.01, 0.011), (3000, 3100))))
    assert c.verdict == NOT_HOLDS and "sendmsg" in c.evidence


def test_multi_accept_inconclusive() -> None:
    trade_off = claim(4, *_four(iterative=((0.01, 0.011), (500, 510))))
    assert trade_off.verdict == INCONCLUSIVE and "trade-off" in trade_off.evidence
    overlap = claim(4, *_four(spawn=((0.1, 0.11), (1500, 2050))))
    assert overlap.verdict == INCONCLUSIVE
    missing = claim(4, *_four()[1:])
    assert missing.verdict == INCONCLUSIVE and "multi-accept did not run" in missing.evidence


# --- 5. pools ≥ 10× cheaper than fork ------------------------------------------------------------


def test_factor_holds() -> None:
    c = claim(5, design("fork", cpu=(2.0, 2.2)), design("multi-accept", cpu=(0.1, 0.11)))
    assert c.verdict == HOLDS and "×" in c.evidence


def test_factor_does_not_hold() -> None:
    c = claim(5, design("fork", cpu=(0.5, 0.55)), design("sendmsg", cpu=(0.1, 0.11)))
    assert c.verdict == NOT_HOLDS


def test_factor_inconclusive() -> None:
    straddle = claim(5, design("fork", cpu=(0.5, 1.5)), design("multi-accept", cpu=(0.1, 0.1)))
    assert straddle.verdict == INCONCLUSIVE
    failed = claim(5, [failed_run("fork")], design("multi-accept"))
    assert failed.verdict == INCONCLUSIVE and "every run failed" in failed.evidence


# --- 6. multi-accept vs sendmsg -------------------------------------------------------------------


def test_accept_beats_passing_holds() -> None:
    c = claim(
        6,
        design("multi-accept", cpu=(0.1, 0.11), tp=(2000, 2100)),
        design("sendmsg", cpu=(0.2, 0.22), tp=(1000, 1100)),
    )
    assert c.verdict == HOLDS


def test_accept_beats_passing_does_not_hold() -> None:
    c = claim(
        6,
        design("multi-accept", cpu=(0.2, 0.22), tp=(1000, 1100)),
        design("sendmsg", cpu=(0.1, 0.11), tp=(2000, 2100)),
    )
    assert c.verdict == NOT_HOLDS


def test_accept_beats_passing_inconclusive() -> None:
    c = claim(
        6,
        design("multi-accept", cpu=(0.1, 0.2), tp=(1000, 2000)),
        design("sendmsg", cpu=(0.15, 0.16), tp=(1500, 1600)),
    )
    assert c.verdict == INCONCLUSIVE


# --- 7. threads vs processes ---------------------------------------------------------------------


def test_threads_cheaper_holds() -> None:
    c = claim(7, design("peer-threading", cpu=(0.1, 0.12)), design("peer-forking", cpu=(1, 1.1)))
    assert c.verdict == HOLDS


def test_threads_cheaper_does_not_hold() -> None:
    c = claim(7, design("peer-threading", cpu=(1, 1.1)), design("peer-forking", cpu=(0.1, 0.12)))
    assert c.verdict == NOT_HOLDS


def test_threads_cheaper_inconclusive() -> None:
    missing = claim(7, design("peer-threading"))
    assert missing.verdict == INCONCLUSIVE and "peer-forking did not run" in missing.evidence
    bound = claim(7, design("peer-threading"), design("peer-forking", cpu=(1,), loader_bound=True))
    assert bound.verdict == INCONCLUSIVE and "loader-bound" in bound.evidence


def test_threads_cheaper_is_judged_on_the_labs_own_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread design against its process counterpart: all cheaper → holds; one pair
    dearer → does not hold; a pair that did not run is named, the others still judged."""
    pairs = (("thread", "fork"), ("prethread-accept", "multi-accept"))
    monkeypatch.setattr(claims_module, "THREAD_PAIRS", (*pairs, ("peer-threading", "peer-forking")))
    two = {"1": 500, "2": 500}
    cheap = [
        design("thread", cpu=(0.1, 0.11)),
        design("fork", cpu=(1.0, 1.1)),
        design("prethread-accept", cpu=(0.05, 0.055), per_worker=two),
        design("multi-accept", cpu=(0.1, 0.11), per_worker=two),
    ]
    c = claim(7, *cheap)
    assert c.verdict == HOLDS, c.evidence
    assert "thread vs fork" in c.evidence and "prethread-accept vs multi-accept" in c.evidence
    assert "peer-threading did not run" in c.evidence  # named, not judged
    dearer = claim(7, *cheap[:2], design("prethread-accept", cpu=(0.3, 0.31)), cheap[3])
    assert dearer.verdict == NOT_HOLDS


def test_threads_cheaper_never_compares_unequal_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_module, "THREAD_PAIRS", (("prethread-accept", "multi-accept"),))
    four = {str(pid): 250 for pid in range(1, 5)}
    c = claim(
        7,
        design("prethread-accept", cpu=(0.05, 0.055), per_worker=four),
        design("multi-accept", cpu=(0.1, 0.11), per_worker={"1": 500, "2": 500}),
    )
    assert c.verdict == INCONCLUSIVE and "unequal pools" in c.evidence


def test_threads_cheaper_inconclusive_on_overlapping_spreads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claims_module, "THREAD_PAIRS", (("thread", "fork"),))
    c = claim(7, design("thread", cpu=(0.5, 1.2)), design("fork", cpu=(0.9, 1.0)))
    assert c.verdict == INCONCLUSIVE and "not clearly apart" in c.evidence


def _fake(name: str, model: str, pool_of: str | None = None) -> type:
    return type(name, (), {"name": name, "model": model, "pool_of": pool_of})


def test_thread_designs_are_paired_with_process_designs_by_their_declared_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = {
        "iterative": _fake("iterative", "one connection at a time"),
        "fork": _fake("fork", "a process per connection"),
        "sendmsg": _fake("sendmsg", "a pool of processes fed descriptors", "processes"),
        "multi-accept": _fake("multi-accept", "a pool of processes that accept", "processes"),
        "thread": _fake("thread", "a thread per connection"),
        "prethread-accept": _fake("prethread-accept", "a pool of threads that accept", "threads"),
        "thread-pool": _fake("thread-pool", "a pool of threads fed by one acceptor", "threads"),
        "asyncio": _fake("asyncio", "an event loop"),
    }
    monkeypatch.setattr(claims_module, "DESIGNS", registry)
    assert claims_module.thread_process_pairs() == [
        ("thread", "fork"),
        ("prethread-accept", "multi-accept"),
        ("thread-pool", "sendmsg"),
    ]
    # the registry as it is: every pair a thread design and a process design
    monkeypatch.undo()
    for a, b in claims_module.thread_process_pairs():
        assert claims_module._made_of(a) == "threads" and claims_module._made_of(b) == "processes"


# --- 8. an accept lock is not needed ------------------------------------------------------------

LOCK, BARE = ACCEPT_LOCKS[0]


def test_accept_lock_variants_are_the_variants_with_a_lock() -> None:
    assert ACCEPT_LOCKS and {lock for lock, _ in ACCEPT_LOCKS} >= {
        "multi-accept+flock",
        "multi-accept+sem",
    }
    for lock, bare in ACCEPT_LOCKS:
        assert VARIANTS[lock].design == bare and "--accept-lock" in VARIANTS[lock].options


def test_accept_lock_holds_when_it_costs_or_gains_nothing() -> None:
    costs = claim(
        8,
        design(LOCK, cpu=(0.2, 0.21), tp=(1000, 1010)),
        design(BARE, cpu=(0.1, 0.105), tp=(1000, 1010)),
    )
    assert costs.verdict == HOLDS and "clearly costs" in costs.evidence
    same = claim(
        8,
        design(LOCK, cpu=(0.100, 0.101), tp=(1000, 1010)),
        design(BARE, cpu=(0.100, 0.102), tp=(1000, 1020)),
    )
    assert same.verdict == HOLDS and "no gain beyond" in same.evidence


def test_accept_lock_does_not_hold_when_it_clearly_gains() -> None:
    c = claim(
        8,
        design(LOCK, cpu=(0.05, 0.052), tp=(2000, 2020)),
        design(BARE, cpu=(0.1, 0.105), tp=(1000, 1010)),
    )
    assert c.verdict == NOT_HOLDS and "clearly gains" in c.evidence


def test_accept_lock_inconclusive() -> None:
    overlap = claim(
        8,
        design(LOCK, cpu=(0.07, 0.12), tp=(900, 1400)),
        design(BARE, cpu=(0.09, 0.11), tp=(1000, 1200)),
    )
    assert overlap.verdict == INCONCLUSIVE and "might gain up to" in overlap.evidence
    missing = claim(8, design(BARE))
    assert missing.verdict == INCONCLUSIVE and f"{LOCK} did not run" in missing.evidence
    single = claim(8, design(LOCK, cpu=(0.1,)), design(BARE, cpu=(0.1,)))
    assert single.verdict == INCONCLUSIVE


# --- 9. sequential connections across workers (Cloudflare 2017) --------------------------------


def _record(name: str, *served: Sequence[int]) -> dict[str, Any]:
    rounds = [
        {
            "served_by": list(s),
            "counts": (counts := [list(s).count(w) for w in range(distribution.WORKERS)]),
            "pattern": distribution.classify(counts, len(s)),
        }
        for s in served
    ]
    patterns = {r["pattern"] for r in rounds}
    return {
        "design": name,
        "rounds": rounds,
        "pattern": patterns.pop() if len(patterns) == 1 else distribution.VARIES,
    }


def _experiment(*records: dict[str, Any]) -> dict[str, Any]:
    return {
        "workers": distribution.WORKERS,
        "connections": distribution.CONNECTIONS,
        "rounds": 2,
        "designs": {r["design"]: r for r in records},
    }


RR = (0, 1, 2, 0, 1, 2)
ONE = (0, 0, 0, 0, 0, 0)
DISTRIBUTION_CLAIM = len(claims_module._CLAIMS) + 1


def test_sequential_connections_classified() -> None:
    assert distribution.classify([2, 2, 2], 6) == distribution.ROUND_ROBIN
    assert distribution.classify([6, 0, 0], 6) == distribution.ONE_WORKER
    assert distribution.classify([3, 2, 1], 6) == distribution.UNEVEN


def test_sequential_connections_holds() -> None:
    c = claim(
        DISTRIBUTION_CLAIM,
        distribution=_experiment(
            _record("multi-accept", RR, RR),
            _record("prefork-epoll", ONE, ONE),
            _record("reuseport", (0, 1, 1, 2, 0, 0), (1, 1, 0, 2, 2, 0)),
        ),
    )
    assert c.verdict == HOLDS, c.evidence
    assert "served by 0,1,2,0,1,2; 0,1,2,0,1,2 → round-robin" in c.evidence
    assert "reuseport (observed)" in c.evidence  # shown, not judged


def test_sequential_connections_does_not_hold() -> None:
    c = claim(
        DISTRIBUTION_CLAIM,
        distribution=_experiment(
            _record("multi-accept", (0, 0, 1, 0, 0, 2), RR), _record("prefork-epoll", ONE, ONE)
        ),
    )
    assert c.verdict == NOT_HOLDS and distribution.VARIES in c.evidence


def test_sequential_connections_inconclusive() -> None:
    absent = claim(DISTRIBUTION_CLAIM, design("multi-accept"))
    assert absent.verdict == INCONCLUSIVE and "did not run" in absent.evidence
    one_side = claim(DISTRIBUTION_CLAIM, distribution=_experiment(_record("multi-accept", RR, RR)))
    assert one_side.verdict == INCONCLUSIVE and "prefork-epoll did not run" in one_side.evidence
    failed = claim(
        DISTRIBUTION_CLAIM,
        distribution=_experiment(
            {"design": "multi-accept", "error": "the server did not answer in time: boom"},
            _record("prefork-epoll", ONE, ONE),
        ),
    )
    assert failed.verdict == INCONCLUSIVE and "boom" in failed.evidence


# --- equal pools --------------------------------------------------------------------------


def test_pools_of_unequal_size_are_never_compared() -> None:
    two = {"101": 500, "102": 500}
    eight = {str(pid): 125 for pid in range(201, 209)}
    c = claim(
        6,
        design("multi-accept", cpu=(0.1, 0.11), tp=(2000, 2100), per_worker=two),
        design("sendmsg", cpu=(0.2, 0.22), tp=(1000, 1100), per_worker=eight),
    )
    assert c.verdict == INCONCLUSIVE
    assert "unequal pools" in c.evidence and "multi-accept 2 vs sendmsg 8" in c.evidence
    equal = claim(
        6,
        design("multi-accept", cpu=(0.1, 0.11), tp=(2000, 2100), per_worker=two),
        design("sendmsg", cpu=(0.2, 0.22), tp=(1000, 1100), per_worker=two),
    )
    assert equal.verdict == HOLDS


# --- the control: a design against an identical copy of itself ----------------------------------

CONTROL, COPY = CONTROLS[0]


def noisy(name: str, rng: random.Random, cv: float, repeats: int = 3) -> list[dict[str, Any]]:
    """Every workload and concurrency, each repeat's CPU and throughput drawn with noise ``cv``
    around the same true values."""
    return [
        make_run(
            name,
            c,
            workload=w,
            repeat=r,
            cpu_ms=0.1 * rng.lognormvariate(0, cv),
            throughput=10_000 * rng.lognormvariate(0, cv),
            latencies_us=(100, 200),
        )
        for w in (CPR, "persistent")
        for c in (1, 8, 64, 256)
        for r in range(repeats)
    ]


def test_control_identical_values_are_inconclusive() -> None:
    c = claim(
        CONTROL_CLAIM, design(CONTROL, cpu=(0.1, 0.1, 0.1)), design(COPY, cpu=(0.1, 0.1, 0.1))
    )
    assert c.verdict == INCONCLUSIVE and "as expected" in c.evidence


@pytest.mark.parametrize("cv", [0.05, 0.15, 0.3])
def test_control_noisy_copies_are_inconclusive(cv: float) -> None:
    """Ten runs of a design and its copy, with machine noise between repeats: the judging never
    tells them apart — where non-overlapping spreads alone would have, again and again."""
    apart = 0
    for seed in range(10):
        rng = random.Random(seed)
        runs = noisy(CONTROL, rng, cv) + noisy(COPY, rng, cv)
        c = claim(CONTROL_CLAIM, runs)
        assert c.verdict == INCONCLUSIVE, (seed, c.evidence)
        cells = aggregate(make_results(runs))
        for w in (CPR, "persistent"):
            mine, theirs = cells_for(cells, CONTROL, w), cells_for(cells, COPY, w)
            for conc, cell in mine.items():
                for metric in ("cpu_s_per_1000", "throughput"):
                    a, b = getattr(cell, metric), getattr(theirs[conc], metric)
                    apart += a.low > b.high or b.low > a.high
    assert apart > 0  # the old rule would have called these


def test_control_single_runs_are_inconclusive() -> None:
    rng = random.Random(1)
    c = claim(CONTROL_CLAIM, noisy(CONTROL, rng, 0.2, repeats=1), noisy(COPY, rng, 0.2, repeats=1))
    assert c.verdict == INCONCLUSIVE


def test_control_a_copy_that_really_differs_is_told_apart() -> None:
    c = claim(
        CONTROL_CLAIM,
        design(CONTROL, cpu=(0.1, 0.105, 0.11), tp=(2000, 2050, 2100)),
        design(COPY, cpu=(0.3, 0.31, 0.32), tp=(900, 950, 1000)),
    )
    assert c.verdict == HOLDS and "told apart" in c.evidence


def test_control_a_copy_that_differs_in_cpu_alone_is_told_apart() -> None:
    c = claim(
        CONTROL_CLAIM,
        design(CONTROL, cpu=(0.1, 0.105, 0.11), tp=(2000, 2050, 2100)),
        design(COPY, cpu=(0.3, 0.31, 0.32), tp=(2000, 2050, 2100)),
    )
    assert c.verdict == HOLDS and "clearly apart in ms/req" in c.evidence


def test_control_not_run_is_inconclusive() -> None:
    c = claim(CONTROL_CLAIM, design(CONTROL))
    assert c.verdict == INCONCLUSIVE and f"{COPY} did not run" in c.evidence


# --- the worker that does real work --------------------------------------------------------------

REAL_WORK = len(claims_module._CLAIMS) + 2


def workloads_of(name: str, echo: Sequence[float], kv: Sequence[float]) -> list[dict[str, Any]]:
    """``name``'s persistent echo and kv runs, one per throughput given."""
    return [
        *design(name, tp=echo, workload="persistent"),
        *design(name, tp=kv, workload="kv", kv_check=kv_verdict()),
    ]


def test_real_work_holds_when_the_designs_lie_closer_under_kv() -> None:
    """Echo: select 5× fork; kv: 1.2× — the database's cost swamps the design's."""
    result = claim(
        REAL_WORK,
        workloads_of("select", (10000, 10100, 9900), (1200, 1210, 1190)),
        workloads_of("fork", (2000, 2020, 1980), (1000, 1010, 990)),
    )
    assert result.verdict == HOLDS, result.evidence
    assert "echo ×5.00 (select ÷ fork" in result.evidence and "kv ×1.20" in result.evidence


def test_real_work_does_not_hold_when_kv_spreads_the_designs_further() -> None:
    result = claim(
        REAL_WORK,
        workloads_of("select", (1200, 1210, 1190), (10000, 10100, 9900)),
        workloads_of("fork", (1000, 1010, 990), (2000, 2020, 1980)),
    )
    assert result.verdict == NOT_HOLDS, result.evidence


def test_real_work_is_inconclusive_on_a_single_run_or_without_kv() -> None:
    single = claim(
        REAL_WORK, workloads_of("select", (10000,), (1200,)), workloads_of("fork", (2000,), (1000,))
    )
    assert single.verdict == INCONCLUSIVE and "single run" in single.evidence
    none = claim(REAL_WORK, design("select", workload="persistent"))
    assert none.verdict == INCONCLUSIVE and "did not run" in none.evidence


def test_real_work_leaves_out_a_design_whose_kv_run_lost_updates() -> None:
    """fork's kv runs lost updates: only select is left, no gap to judge."""
    lossy = [
        *design("fork", tp=(2000, 2020), workload="persistent"),
        *design("fork", tp=(1000, 1010), workload="kv", kv_check=kv_verdict(ok=False)),
    ]
    result = claim(REAL_WORK, workloads_of("select", (10000, 10100), (1200, 1210)), lossy)
    assert result.verdict == INCONCLUSIVE and "lost or extra updates" in result.evidence
