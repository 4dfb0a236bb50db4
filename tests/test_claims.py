"""The seven claims: each gives "holds", "does not hold" and "inconclusive" on data made for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_report import failed_run, make_results, make_run

from lab.measure.claims import HOLDS, INCONCLUSIVE, NOT_HOLDS, Claim, evaluate

SLOW = (100, 200, 1_100_000)  # one SYN retransmission


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


def claim(number: int, *runs: list[dict[str, Any]]) -> Claim:
    result = evaluate(make_results([run for group in runs for run in group]))[number - 1]
    assert result.number == number
    return result


def test_seven_claims_with_every_field() -> None:
    claims = evaluate(make_results(design("fork")))
    assert [c.number for c in claims] == [1, 2, 3, 4, 5, 6, 7]
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


def test_spawn_does_not_hold_when_cheaper() -> None:
    c = claim(2, design("spawn", cpu=(0.05, 0.06)), design("multi-accept", cpu=(0.1, 0.11)))
    assert c.verdict == NOT_HOLDS


def test_spawn_inconclusive() -> None:
    overlap = claim(2, design("spawn", cpu=(0.1, 0.3)), design("multi-accept", cpu=(0.2, 0.25)))
    assert overlap.verdict == INCONCLUSIVE and "overlap" in overlap.evidence
    missing = claim(2, design("multi-accept"), design("sendmsg"))
    assert missing.verdict == INCONCLUSIVE and "spawn did not run" in missing.evidence


def test_single_run_still_gives_a_verdict() -> None:
    c = claim(2, design("spawn", cpu=(20,)), design("multi-accept", cpu=(0.1,)))
    assert c.verdict == HOLDS and "single run" in c.evidence


# --- 3. sendmsg ----------------------------------------------------------------------------------


def _sendmsg(top: Sequence[float], **kwargs: Any) -> list[dict[str, Any]]:
    return design("sendmsg", tp=(1000, 1010), concurrencies=(1,)) + design(
        "sendmsg", tp=top, concurrencies=(64,), shed=5, **kwargs
    )


def test_sendmsg_holds_and_counts_sheds() -> None:
    c = claim(3, _sendmsg((900, 950)))
    assert c.verdict == HOLDS and "shed 10" in c.evidence


def test_sendmsg_does_not_hold() -> None:
    assert claim(3, _sendmsg((400, 500))).verdict == NOT_HOLDS


def test_sendmsg_inconclusive() -> None:
    assert claim(3, _sendmsg((700, 900))).verdict == INCONCLUSIVE  # straddles 80 %
    bound = claim(3, _sendmsg((900, 950), loader_bound=True))
    assert bound.verdict == INCONCLUSIVE and "loader-bound" in bound.evidence
    assert claim(3, design("sendmsg")).verdict == INCONCLUSIVE  # one concurrency


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
