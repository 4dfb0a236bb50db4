"""The claims the lab tests, judged against a ``lab compare`` run.

Each claim compares aggregated cells (:mod:`lab.measure.report`). "Clearly" means: both cells
from at least two repeats, their spreads (min–max over repeats) apart, and their medians apart
by more than the run's own repeat-to-repeat noise allows by chance (:meth:`Spread.above`);
anything less gives ``inconclusive``. A single run has no spread: it is never clear, and the
evidence says "single run". A design missing from the run, with every run failed, or
loader-bound gives ``inconclusive`` with the reason; so do two pools of unequal size (the pool
each run actually had, from the server's statistics), which are never compared.

Per concurrency a comparison gives a verdict; a claim's verdict combines them: any
``does not hold`` → does not hold; all ``holds`` → holds; otherwise inconclusive.

The last claim is a control: a design against an identical copy of itself (a variant with the
same options). It must come out inconclusive; anything else means the judging called noise a
difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lab.measure.compare import ACCEPT_LOCKS, CONTROLS, GROWING, POOL_DESIGNS, VARIANTS
from lab.measure.config import KV, PERSISTENT
from lab.measure.report import CONNECT_PER_REQUEST, Cell, Spread, aggregate, cells_for
from lab.sockets.designs import DESIGNS

__all__ = ["BACKLOG", "HOLDS", "INCONCLUSIVE", "NOT_HOLDS", "Claim", "Verdict", "evaluate"]

Verdict = Literal["holds", "does not hold", "inconclusive"]
HOLDS: Verdict = "holds"
NOT_HOLDS: Verdict = "does not hold"
INCONCLUSIVE: Verdict = "inconclusive"

#: The iterative design's listen backlog.
BACKLOG = DESIGNS["iterative"].default_backlog
#: A delay this long (µs) is a SYN retransmission, not service time.
SYN_DELAY_US = 1_000_000
#: sendmsg stays unhindered if its throughput at the highest concurrency is this share of its best.
UNHINDERED_SHARE = 0.8
#: Said of a comparison that tells nothing apart.
UNCLEAR = " (not clearly apart: the spreads overlap, or differ by less than the noise)"
#: Stevens: pools cut per-connection CPU by this factor against fork-per-connection.
POOL_FACTOR = 10.0

#: The pre-started process pools, which claims 2 and 6 set against a process per connection.
POOLS = tuple(name for name in POOL_DESIGNS if DESIGNS[name].pool_of == "processes")
#: spawn with another worker program (``--worker-cmd``): the process without the interpreter.
SPAWN_OTHER = next(
    (n for n, v in VARIANTS.items() if v.design == "spawn" and "--worker-cmd" in v.options), None
)
#: The chapter's own designs (claim 4's "the four"): those whose origin is the chapter.
CHAPTER = tuple(name for name, design in DESIGNS.items() if design.origin.startswith("the chapter"))
#: A lock around accept() may gain this much, at the most favourable repeats, and still count
#: as "no clear gain" (claim 8).
LOCK_MARGIN = 0.10


def _made_of(name: str) -> str | None:
    """What a design serves with, from its declarations: "threads", "processes", or None (an
    event loop, a program started per connection, one connection at a time)."""
    design = DESIGNS[name]
    if design.pool_of is not None:
        return design.pool_of
    words = design.model.split()
    if "thread" in words or "threads" in words:
        return "threads"
    if "process" in words or "processes" in words:
        return "processes"
    return None


def _as_processes(model: str) -> list[str]:
    swap = {"thread": "process", "threads": "processes"}
    return [swap.get(word, word) for word in model.split()]


def thread_process_pairs() -> list[tuple[str, str]]:
    """Each thread design with its process counterpart, from the declarations: the process
    design whose model is the thread design's with "threads" read as "processes"; failing that,
    the one with a pool exactly when it has one whose model shares the most words. One-to-one,
    in registry order; a thread design with no counterpart left is not paired."""
    threads = [n for n in DESIGNS if _made_of(n) == "threads"]
    processes = [n for n in DESIGNS if _made_of(n) == "processes"]
    pairs: list[tuple[str, str]] = []
    left = list(processes)
    unmatched = []
    for name in threads:
        wanted = _as_processes(DESIGNS[name].model)
        exact = next((p for p in left if DESIGNS[p].model.split() == wanted), None)
        if exact is None:
            unmatched.append(name)
            continue
        pairs.append((name, exact))
        left.remove(exact)
    for name in unmatched:
        wanted_words = set(_as_processes(DESIGNS[name].model))
        pooled = DESIGNS[name].pool_of is not None
        candidates = [p for p in left if (DESIGNS[p].pool_of is not None) == pooled]
        if not candidates:
            continue
        best = max(candidates, key=lambda p: len(wanted_words & set(DESIGNS[p].model.split())))
        pairs.append((name, best))
        left.remove(best)
    order = list(DESIGNS)
    return sorted(pairs, key=lambda pair: order.index(pair[0]))


#: Claim 7's pairs: the lab's thread designs against their process counterparts, and the
#: standard library's two socketservers.
THREAD_PAIRS = (*thread_process_pairs(), ("peer-threading", "peer-forking"))


@dataclass(frozen=True)
class Claim:
    number: int
    statement: str
    source: str
    measurement: str
    verdict: Verdict
    evidence: str


def _combine(verdicts: Iterable[Verdict]) -> Verdict:
    found = list(verdicts)
    if NOT_HOLDS in found:
        return NOT_HOLDS
    if found and all(v == HOLDS for v in found):
        return HOLDS
    return INCONCLUSIVE


def _single(*spreads: Spread | None) -> str:
    if any(s is not None and s.n == 1 for s in spreads):
        return " (single run: never clear)"
    return ""


def _pool_text(cell: Cell) -> str:
    return f"{cell.design} {_fmt(cell.pool, 0)}"


def _unequal_pools(a: Cell, b: Cell) -> bool:
    """Both are pools, and they did not run with the same number of workers."""
    if a.pool is None or b.pool is None:
        return False
    return (a.pool.low, a.pool.high) != (b.pool.low, b.pool.high)


def _fmt(spread: Spread | None, digits: int = 3) -> str:
    return spread.format(digits) if spread is not None else "—"


def _missing(cells: Sequence[Cell], designs: Sequence[str], workload: str) -> list[str]:
    """Why some of ``designs`` cannot be compared under ``workload`` at all."""
    reasons = []
    for design in designs:
        mine = cells_for(cells, design, workload)
        if not mine:
            reasons.append(f"{design} did not run {workload}")
        elif not any(c.usable for c in mine.values()):
            reasons.append("; ".join(c.why_unusable() for c in mine.values()))
    return reasons


def _pairwise(
    cells: Sequence[Cell],
    a: str,
    others: Sequence[str],
    judge: Callable[[Cell, Sequence[Cell]], tuple[Verdict, str]],
    workload: str = CONNECT_PER_REQUEST,
) -> tuple[Verdict, list[str]]:
    """Judge ``a`` against ``others`` at every concurrency where ``a`` and some other design
    are usable; the combined verdict and one line per concurrency."""
    mine = cells_for(cells, a, workload)
    theirs = [cells_for(cells, o, workload) for o in others]
    verdicts: list[Verdict] = []
    lines: list[str] = []
    for concurrency in sorted(mine):
        cell = mine[concurrency]
        rivals = [t[concurrency] for t in theirs if concurrency in t and t[concurrency].usable]
        if not cell.usable or not rivals:
            continue
        unequal = [r for r in rivals if _unequal_pools(cell, r)]
        rivals = [r for r in rivals if r not in unequal]
        note = ""
        if unequal:
            note = "; not compared, unequal pools (workers): " + ", ".join(
                f"{_pool_text(cell)} vs {_pool_text(r)}" for r in unequal
            )
        if not rivals:
            verdicts.append(INCONCLUSIVE)
            lines.append(f"c={concurrency}: {note.removeprefix('; ')} → {INCONCLUSIVE}")
            continue
        verdict, line = judge(cell, rivals)
        verdicts.append(verdict)
        lines.append(f"c={concurrency}: {line}{note} → {verdict}")
    return _combine(verdicts), lines


def _lines(lines: Sequence[str], limit: int = 2) -> str:
    """At most ``limit`` lines: the last (highest concurrency) ones, and how many were left."""
    if len(lines) <= limit:
        return "\n".join(lines)
    shown = list(lines[-limit:])
    shown[0] = f"(+{len(lines) - limit} lower concurrencies) {shown[0]}"
    return "\n".join(shown)


def _no_data(reasons: Sequence[str], default: str) -> str:
    return "no comparable data: " + ("; ".join(reasons) if reasons else default)


# --- the claims ----------------------------------------------------------------------------------


def _iterative(cells: Sequence[Cell]) -> Claim:
    claim = (
        1,
        "iterative: while one client is served the others wait; beyond the backlog (5) new "
        "connections are delayed by SYN retransmits or time out, not refused, and listen "
        "overflows rise",
        "docs/designs/iterative.md; listen(2)",
        f"iterative at concurrency > {BACKLOG + 1}: listen overflows, refused connects, "
        "p99/max latency, connect timeouts",
    )
    beyond = sorted(
        # A full connection-tracking table delays SYNs too: such a cell is no evidence here.
        (
            c
            for c in cells
            if c.design == "iterative"
            and c.concurrency > BACKLOG + 1
            and c.runs
            and not c.conntrack_drops
        ),
        key=lambda c: (c.workload == CONNECT_PER_REQUEST, c.concurrency),
    )
    if not beyond:
        dropped = [c.why_unusable() for c in cells if c.design == "iterative" and c.conntrack_drops]
        return Claim(
            *claim,
            INCONCLUSIVE,
            f"no measured iterative run beyond the backlog ({BACKLOG})"
            + (f" that the kernel's firewall left alone: {dropped[0]}" if dropped else ""),
        )
    refused, holding, overflowing, lines = [], [], [], []
    for cell in beyond:
        timeouts = cell.errors.get("connect_timeout", 0)
        p99 = cell.latency.get("p99")
        worst = cell.pooled.get("max", 0)
        delayed = (p99 is not None and p99.high >= SYN_DELAY_US) or worst >= SYN_DELAY_US
        line = (
            f"{cell.workload} c={cell.concurrency}: overflows {cell.listen_overflows:,}, "
            f"refused {cell.errors.get('refused', 0):,}, connect timeouts {timeouts:,}, "
            f"p99 {_fmt(p99, 0)} µs, max {worst:,} µs" + (" (single run)" if cell.runs == 1 else "")
        )
        lines.append(line)
        if cell.errors.get("refused", 0):
            refused.append(line)
        elif cell.listen_overflows and (delayed or timeouts):
            holding.append(line)
        elif cell.listen_overflows:
            overflowing.append(line)
    if refused:
        return Claim(*claim, NOT_HOLDS, refused[-1] + " — connections were refused")
    if holding:
        return Claim(*claim, HOLDS, holding[-1] + " — delayed, not refused")
    if overflowing:
        return Claim(
            *claim, INCONCLUSIVE, overflowing[-1] + " — overflows but no delay ≥ 1 s or timeout"
        )
    return Claim(*claim, NOT_HOLDS, lines[-1] + " — no listen overflow beyond the backlog")


def _cpu(cell: Cell) -> Spread | None:
    return cell.cpu_s_per_1000


def _tp(cell: Cell) -> Spread | None:
    return cell.throughput


def _spawn(cells: Sequence[Cell]) -> Claim:
    claim = (
        2,
        "spawn: creating a process per connection costs performance",
        "docs/designs/spawn.md",
        "server CPU ms per request, spawn vs the pools (multi-accept, sendmsg), "
        f"connect-per-request at equal concurrency; {SPAWN_OTHER} vs spawn",
    )

    def judge(spawn: Cell, pools: Sequence[Cell]) -> tuple[Verdict, str]:
        mine = _cpu(spawn)
        theirs = [(p.design, _cpu(p)) for p in pools]
        theirs_ = [(d, s) for d, s in theirs if s is not None]
        if mine is None or not theirs_:
            return INCONCLUSIVE, "no CPU per request"
        text = f"spawn {_fmt(mine)} vs " + ", ".join(f"{d} {_fmt(s)}" for d, s in theirs_)
        text += _single(mine, *(s for _, s in theirs_))
        if all(mine.above(s) for _, s in theirs_):
            return HOLDS, text
        if any(mine.below(s) for _, s in theirs_):
            return NOT_HOLDS, text
        return INCONCLUSIVE, text + UNCLEAR

    verdict, lines = _pairwise(cells, "spawn", POOLS, judge)
    if not lines:
        reasons = _missing(cells, ("spawn",), CONNECT_PER_REQUEST)
        if len(_missing(cells, POOLS, CONNECT_PER_REQUEST)) == len(POOLS):
            reasons += _missing(cells, POOLS, CONNECT_PER_REQUEST)
        return Claim(*claim, INCONCLUSIVE, _no_data(reasons, "no common concurrency"))
    evidence = _lines(lines, 1)
    spawn = cells_for(cells, "spawn", CONNECT_PER_REQUEST)
    cat = cells_for(cells, SPAWN_OTHER, CONNECT_PER_REQUEST) if SPAWN_OTHER else {}
    common = [c for c in sorted(spawn) if c in cat and spawn[c].usable and cat[c].usable]
    if common:
        s, k = _cpu(spawn[common[-1]]), _cpu(cat[common[-1]])
        if s is not None and k is not None and s.median > 0:
            evidence += (
                f"\nc={common[-1]}: {SPAWN_OTHER} {_fmt(k)} vs spawn {_fmt(s)} ms/req: the process "
                f"alone (cat) costs {k.median / s.median:.0%} of spawning the interpreter"
            )
    return Claim(*claim, verdict, evidence)


def _sendmsg(cells: Sequence[Cell]) -> Claim:
    claim = (
        3,
        "sendmsg: the server stays unhindered during heavy activity",
        "docs/designs/sendmsg.md",
        f"{GROWING} (its pool free to grow, as the design means it) connect-per-request "
        f"throughput at the highest concurrency vs its best (≥ {UNHINDERED_SHARE:.0%}); "
        "connections shed",
    )
    mine = cells_for(cells, GROWING, CONNECT_PER_REQUEST)
    usable = {c: cell for c, cell in mine.items() if cell.usable}
    if not mine or max(mine) not in usable or len(usable) < 2:
        reasons = [mine[max(mine)].why_unusable()] if mine and max(mine) not in usable else []
        return Claim(
            *claim,
            INCONCLUSIVE,
            _no_data(
                reasons or _missing(cells, (GROWING,), CONNECT_PER_REQUEST),
                "fewer than two usable concurrencies",
            ),
        )
    top = usable[max(usable)]
    best = max(usable.values(), key=lambda c: c.throughput.median if c.throughput else 0.0)
    assert top.throughput is not None and best.throughput is not None
    floor = UNHINDERED_SHARE * best.throughput.median
    share = top.throughput.median / best.throughput.median if best.throughput.median else 0.0
    if not (top.throughput.repeated and best.throughput.repeated):
        verdict = INCONCLUSIVE
    elif top.throughput.low >= floor:
        verdict = HOLDS
    elif top.throughput.high < floor:
        verdict = NOT_HOLDS
    else:
        verdict = INCONCLUSIVE
    shed = sum(c.shed for c in mine.values())
    evidence = (
        f"c={top.concurrency} {_fmt(top.throughput, 0)} req/s = {share:.0%} of its best "
        f"{_fmt(best.throughput, 0)} at c={best.concurrency}"
        f"{_single(top.throughput, best.throughput)}"
        f"\npool {_fmt(top.pool, 0)} workers at c={top.concurrency}; shed {top.shed:,} "
        f"({shed:,} over all concurrencies), errors {top.errors_total:,}"
    )
    return Claim(*claim, verdict, evidence)


def _multi_accept(cells: Sequence[Cell]) -> Claim:
    claim = (
        4,
        f"multi-accept has the best performance of the {len(CHAPTER)} ({', '.join(CHAPTER)})",
        "docs/designs/multi-accept.md",
        "connect-per-request throughput and server CPU per request at each concurrency",
    )
    others = [d for d in CHAPTER if d != "multi-accept"]

    def judge(ma: Cell, rivals: Sequence[Cell]) -> tuple[Verdict, str]:
        tp, cpu = _tp(ma), _cpu(ma)
        beaten: list[str] = []
        unclear: list[str] = []
        for rival in rivals:
            rtp, rcpu = _tp(rival), _cpu(rival)
            if tp is None or rtp is None or cpu is None or rcpu is None:
                unclear.append(f"{rival.design} (no data)")
                continue
            rival_better = rtp.above(tp) or rcpu.below(cpu)
            rival_worse = rtp.below(tp) or rcpu.above(cpu)
            if rival_better and not rival_worse:
                beaten.append(f"{rival.design} {_fmt(rtp, 0)} req/s, {_fmt(rcpu)} ms/req")
            elif rival_better:
                unclear.append(
                    f"{rival.design} (trade-off: {_fmt(rtp, 0)} req/s, {_fmt(rcpu)} ms/req)"
                )
            elif not (tp.above(rtp) and cpu.below(rcpu)):
                unclear.append(f"{rival.design} (not clearly apart)")
        missing = len(others) - len(rivals)
        head = f"multi-accept {_fmt(tp, 0)} req/s, {_fmt(cpu)} ms/req" + _single(tp, cpu)
        if beaten:
            return NOT_HOLDS, head + "; clearly better: " + ", ".join(beaten)
        if unclear:
            return INCONCLUSIVE, head + "; not clearly better than " + ", ".join(unclear)
        if missing:
            return INCONCLUSIVE, head + f"; best of {len(rivals) + 1}, {missing} not comparable"
        return HOLDS, head + f"; best of the {len(CHAPTER)} on both"

    verdict, lines = _pairwise(cells, "multi-accept", others, judge)
    if not lines:
        reasons = _missing(cells, ("multi-accept", *others), CONNECT_PER_REQUEST)
        return Claim(*claim, INCONCLUSIVE, _no_data(reasons, "no common concurrency"))
    return Claim(*claim, verdict, _lines(lines))


def _factor(cells: Sequence[Cell]) -> Claim:
    claim = (
        5,
        f"pools cut per-connection CPU by a factor of {POOL_FACTOR:g} or more vs "
        "fork-per-connection",
        "Stevens, UNIX Network Programming vol. 1, ch. 30",
        "server CPU per request: fork ÷ the best pool (multi-accept, sendmsg), connect-per-request",
    )

    def judge(fork: Cell, pools: Sequence[Cell]) -> tuple[Verdict, str]:
        f = _cpu(fork)
        cpus = [(p.design, _cpu(p)) for p in pools]
        present = [(d, s) for d, s in cpus if s is not None and s.median > 0 and s.low > 0]
        if f is None or not present:
            return INCONCLUSIVE, "no CPU per request"
        design, best = min(present, key=lambda item: item[1].median)
        factor = f.median / best.median
        low, high = f.low / best.high, f.high / best.low
        text = (
            f"fork {_fmt(f)} ÷ {design} {_fmt(best)} ms/req = ×{factor:.1f} "
            f"(range ×{low:.1f}–×{high:.1f}){_single(f, best)}"
        )
        if not (f.repeated and best.repeated):
            return INCONCLUSIVE, text
        if low >= POOL_FACTOR:
            return HOLDS, text
        if high < POOL_FACTOR:
            return NOT_HOLDS, text
        return INCONCLUSIVE, text + " (range straddles the factor)"

    verdict, lines = _pairwise(cells, "fork", POOLS, judge)
    if not lines:
        reasons = _missing(cells, ("fork", *POOLS), CONNECT_PER_REQUEST)
        return Claim(*claim, INCONCLUSIVE, _no_data(reasons, "no common concurrency"))
    return Claim(*claim, verdict, _lines(lines))


def _versus(
    a: str, b: str, throughput: bool
) -> Callable[[Cell, Sequence[Cell]], tuple[Verdict, str]]:
    """Judge ``a``'s cell against ``b``'s: clearly lower CPU per request (and clearly higher
    throughput if ``throughput``) → holds; ``b`` clearly better on one and not clearly worse on
    the other → does not hold; a trade-off or nothing clear → inconclusive."""

    def judge(cell: Cell, rivals: Sequence[Cell]) -> tuple[Verdict, str]:
        rival = rivals[0]
        cpu, rcpu = _cpu(cell), _cpu(rival)
        if cpu is None or rcpu is None:
            return INCONCLUSIVE, "no CPU per request"
        text = f"CPU {a} {_fmt(cpu)} vs {b} {_fmt(rcpu)} ms/req"
        better = [cpu.below(rcpu)]
        worse = [cpu.above(rcpu)]
        tp, rtp = _tp(cell), _tp(rival)
        if throughput and tp is not None and rtp is not None:
            text += f"; {_fmt(tp, 0)} vs {_fmt(rtp, 0)} req/s"
            better.append(tp.above(rtp))
            worse.append(tp.below(rtp))
        text += _single(cpu, rcpu)
        if any(worse) and any(better):
            return INCONCLUSIVE, text + " (a trade-off)"
        if any(worse):
            return NOT_HOLDS, text
        if all(better):
            return HOLDS, text
        return INCONCLUSIVE, text + UNCLEAR

    return judge


def _head_to_head(
    number: int,
    statement: str,
    source: str,
    a: str,
    b: str,
    throughput: bool,
) -> Callable[[Sequence[Cell]], Claim]:
    """``a`` beats ``b`` (see :func:`_versus`), connect-per-request."""
    measurement = (
        f"{a} vs {b}, connect-per-request: "
        + ("throughput and " if throughput else "")
        + "server CPU per request"
    )

    def evaluate(cells: Sequence[Cell]) -> Claim:
        verdict, lines = _pairwise(cells, a, (b,), _versus(a, b, throughput))
        if not lines:
            reasons = _missing(cells, (a, b), CONNECT_PER_REQUEST)
            return Claim(
                number,
                statement,
                source,
                measurement,
                INCONCLUSIVE,
                _no_data(reasons, "no common concurrency"),
            )
        return Claim(number, statement, source, measurement, verdict, _lines(lines))

    return evaluate


def _differs(a: str, b: str) -> Callable[[Cell, Sequence[Cell]], tuple[Verdict, str]]:
    """``a``'s cell differs from ``b``'s: clearly apart, either way, in throughput or in server
    CPU per request → holds; nothing clearly apart → inconclusive."""

    def judge(cell: Cell, rivals: Sequence[Cell]) -> tuple[Verdict, str]:
        rival = rivals[0]
        texts, apart = [], []
        for label, metric, digits, unit in (("CPU", _cpu, 3, "ms/req"), ("", _tp, 0, "req/s")):
            mine, theirs = metric(cell), metric(rival)
            if mine is None or theirs is None:
                continue
            texts.append(f"{label} {a} {_fmt(mine, digits)} vs {b} {_fmt(theirs, digits)} {unit}")
            if mine.above(theirs) or mine.below(theirs):
                apart.append(unit)
        text = "; ".join(t.strip() for t in texts) or "no figures"
        text += _single(_cpu(cell), _cpu(rival), _tp(cell), _tp(rival))
        if apart:
            return HOLDS, text + f" (clearly apart in {', '.join(apart)})"
        return INCONCLUSIVE, text + UNCLEAR

    return judge


def _threads(cells: Sequence[Cell]) -> Claim:
    pairs = ", ".join(f"{a} vs {b}" for a, b in THREAD_PAIRS)
    claim = (
        7,
        "threads are cheaper than processes",
        "Stevens, UNIX Network Programming vol. 1, ch. 30",
        f"server CPU per request, connect-per-request, each thread design against its process "
        f"counterpart (paired by their declared model): {pairs}; pools only at equal size",
    )
    judges = [(a, b, _versus(a, b, throughput=False)) for a, b in THREAD_PAIRS]
    return _pairs_claim(claim, cells, judges, keep=1, none_ran="no pair ran")


def _pairs_claim(
    claim: tuple[int, str, str, str],
    cells: Sequence[Cell],
    judges: Sequence[tuple[str, str, Callable[[Cell, Sequence[Cell]], tuple[Verdict, str]]]],
    keep: int,
    none_ran: str,
) -> Claim:
    """A claim judged on pairs (a against b, each with its judge): the pairs' verdicts combined,
    the last ``keep`` lines of each as evidence, and the pairs that could not be compared named."""
    verdicts: list[Verdict] = []
    lines: list[str] = []
    reasons: list[str] = []
    for a, b, judge in judges:
        verdict, found = _pairwise(cells, a, (b,), judge)
        if found:
            verdicts.append(verdict)
            lines += [f"{a} vs {b}: {line}" for line in found[-keep:]]
        else:
            reasons += _missing(cells, (a, b), CONNECT_PER_REQUEST) or [
                f"{a} vs {b}: no common concurrency"
            ]
    if not verdicts:
        return Claim(*claim, INCONCLUSIVE, _no_data(reasons, none_ran))
    evidence = "\n".join(lines)
    if reasons:
        evidence += "\nnot compared: " + "; ".join(reasons)
    return Claim(*claim, _combine(verdicts), evidence)


def _lock_gain(lock: Spread, bare: Spread, higher_is_better: bool) -> float:
    """The most a lock could gain, from its best repeat against the lock-less worst one."""
    if higher_is_better:
        return lock.high / bare.low - 1 if bare.low > 0 else float("inf")
    return 1 - lock.low / bare.high if bare.high > 0 else 0.0


def _no_gain(
    lock_name: str, bare_name: str
) -> Callable[[Cell, Sequence[Cell]], tuple[Verdict, str]]:
    """The lock (``lock_name``'s cell) against none (``bare_name``'s): clearly better on CPU per
    connection or throughput, and clearly worse on neither → does not hold; clearly worse and
    clearly better on neither, or at most :data:`LOCK_MARGIN` better even at its most favourable
    repeats → holds; a trade-off, or spreads too wide to bound the gain → inconclusive."""

    def judge(cell: Cell, rivals: Sequence[Cell]) -> tuple[Verdict, str]:
        rival = rivals[0]
        cpu, rcpu, tp, rtp = _cpu(cell), _cpu(rival), _tp(cell), _tp(rival)
        if cpu is None or rcpu is None or tp is None or rtp is None:
            return INCONCLUSIVE, "no CPU per connection or throughput"
        text = (
            f"CPU {lock_name} {_fmt(cpu)} vs {bare_name} {_fmt(rcpu)} ms/conn; "
            f"{_fmt(tp, 0)} vs {_fmt(rtp, 0)} req/s" + _single(cpu, rcpu, tp, rtp)
        )
        better = cpu.below(rcpu) or tp.above(rtp)
        worse = cpu.above(rcpu) or tp.below(rtp)
        if better and worse:
            return INCONCLUSIVE, text + " (a trade-off)"
        if better:
            return NOT_HOLDS, text + " (the lock clearly gains)"
        if worse:
            return HOLDS, text + " (the lock clearly costs)"
        if not (cpu.repeated and rcpu.repeated and tp.repeated and rtp.repeated):
            return INCONCLUSIVE, text
        gain = max(_lock_gain(cpu, rcpu, False), _lock_gain(tp, rtp, True))
        if gain <= LOCK_MARGIN:
            return HOLDS, text + f" (no gain beyond {gain:.0%} even at its best repeats)"
        return INCONCLUSIVE, text + UNCLEAR + f": the lock might gain up to {gain:.0%}"

    return judge


def _accept_lock(cells: Sequence[Cell]) -> Claim:
    locks = ", ".join(f"{lock} vs {bare}" for lock, bare in ACCEPT_LOCKS) or "no lock variant"
    claim = (
        8,
        "an accept lock is not needed on Linux: a lock around accept() brings no clear gain",
        "Stevens, UNIX Network Programming vol. 1, ch. 30 (servers 3 and 4); accept(2) wakes one "
        "exclusive waiter",
        f"server CPU per connection and throughput, connect-per-request: {locks}; a gain of at "
        f"most {LOCK_MARGIN:.0%} at the lock's most favourable repeats counts as none",
    )
    judges = [(lock, bare, _no_gain(lock, bare)) for lock, bare in ACCEPT_LOCKS]
    return _pairs_claim(claim, cells, judges, keep=2, none_ran="no lock variant ran")


def _control(cells: Sequence[Cell]) -> Claim:
    pairs = " and ".join(f"{a} vs {b}" for a, b in CONTROLS) or "no control variant"
    claim = (
        len(_CLAIMS) + len(_RESULT_CLAIMS) + 1,
        f"control: a design differs from an identical copy of itself ({pairs}) — the expected "
        "verdict is inconclusive; anything else means the judging calls noise a difference",
        "the lab's own check of its judging (compare.VARIANTS)",
        "throughput and server CPU per request, clearly apart either way, in every workload "
        "and at every concurrency",
    )
    verdicts: list[Verdict] = []
    lines: list[str] = []
    reasons: list[str] = []
    for a, b in CONTROLS:
        for workload in dict.fromkeys(c.workload for c in cells):
            verdict, found = _pairwise(cells, a, (b,), _differs(a, b), workload)
            if found:
                verdicts.append(verdict)
                lines += [f"{workload} {line}" for line in found]
        if not any(c.design == b and c.usable for c in cells):
            reasons += _missing(cells, (a, b), CONNECT_PER_REQUEST)
    if not verdicts:
        return Claim(*claim, INCONCLUSIVE, _no_data(reasons, "no common cell"))
    told_apart = [line for line in lines if line.endswith(f"→ {HOLDS}")]
    if told_apart:
        head = (
            f"identical designs told apart in {len(told_apart)} of {len(lines)} comparisons — "
            "read this run's verdicts with suspicion"
        )
        return Claim(*claim, HOLDS, head + "\n" + _lines(told_apart))
    head = f"as expected, nothing told apart in {len(lines)} comparisons"
    return Claim(*claim, INCONCLUSIVE, head + "\n" + _lines(lines, 1))


_CLAIMS: tuple[Callable[[Sequence[Cell]], Claim], ...] = (
    _iterative,
    _spawn,
    _sendmsg,
    _multi_accept,
    _factor,
    _head_to_head(
        6,
        "all workers calling accept beats passing descriptors",
        "Stevens, UNIX Network Programming vol. 1, ch. 30",
        "multi-accept",
        "sendmsg",
        throughput=True,
    ),
    _threads,
    _accept_lock,
)


def _distribution(results: Mapping[str, Any]) -> Claim:
    from lab.measure import distribution as d

    expected = ", ".join(f"{name} {pattern}" for name, pattern in d.EXPECTED.items())
    claim = (
        len(_CLAIMS) + 1,
        f"sequential connections: workers blocking in accept() take them in turn (FIFO, "
        f"round-robin); workers in epoll_wait with EPOLLEXCLUSIVE leave them all to one (LIFO) "
        f"— {expected}",
        'Cloudflare, "Why does one NGINX worker take all the load?" (2017)',
        f"{d.WORKERS} workers, {d.CONNECTIONS} sequential connections with the lab's client, "
        "each closed before the next opens; the server's per-worker counts after each say who "
        "served it (every pool design; the expectation for the two Cloudflare compared)",
    )
    found = results.get("distribution")
    if not isinstance(found, Mapping):
        return Claim(
            *claim, INCONCLUSIVE, "the experiment did not run (a full `lab compare` runs it)"
        )
    records: Mapping[str, Any] = found.get("designs") or {}
    verdicts: list[Verdict] = []
    lines: list[str] = []
    for name, pattern in d.EXPECTED.items():
        record = records.get(name)
        if record is None:
            verdicts.append(INCONCLUSIVE)
            lines.append(f"{name} did not run")
            continue
        if "error" in record:
            verdicts.append(INCONCLUSIVE)
            lines.append(f"{name}: failed ({record['error']})")
            continue
        seen = str(record.get("pattern"))
        verdict = HOLDS if seen == pattern else NOT_HOLDS
        if seen.startswith("unknown"):
            verdict = INCONCLUSIVE
        verdicts.append(verdict)
        lines.append(f"{name}: {_rounds_text(record)} → {seen} (expected {pattern}) → {verdict}")
    others = [n for n in records if n not in d.EXPECTED]
    for name in others:
        record = records[name]
        seen = record.get("error") or f"{_rounds_text(record)} → {record.get('pattern')}"
        lines.append(f"{name} (observed): {seen}")
    return Claim(*claim, _combine(verdicts), "\n".join(lines))


def _rounds_text(record: Mapping[str, Any]) -> str:
    """``served by 0,1,2,0,1,2; 0,1,2,0,1,2`` — each round's serving workers."""
    rounds = record.get("rounds") or []
    served = [
        ",".join("?" if w is None else str(w) for w in r.get("served_by") or []) for r in rounds
    ]
    return "served by " + "; ".join(served) if served else "no round"


def _gap(throughputs: Sequence[tuple[Spread, str]]) -> tuple[float, float, float, str, str]:
    """The fastest design's throughput ÷ the slowest's: median ratio, its range (low, high),
    and the two designs."""
    best, fastest = max(throughputs, key=lambda row: row[0].median)
    worst, slowest = min(throughputs, key=lambda row: row[0].median)
    return (
        best.median / worst.median,
        best.low / worst.high,
        best.high / worst.low,
        fastest,
        slowest,
    )


def _real_work(results: Mapping[str, Any]) -> Claim:
    claim = (
        len(_CLAIMS) + 2,
        "when the worker does real work, the design's own cost matters less: the designs' "
        "throughputs lie closer together serving a database than echoing",
        'the chapter (its worker "accesses a database file"); a corollary of Amdahl\'s law',
        f"at each concurrency, the fastest design's throughput ÷ the slowest's (the lab's "
        f"designs that ran both), {PERSISTENT} echo against kv (the same connections, each "
        "request one database command), in the same run; clearly smaller under kv: its range "
        "(best high ÷ worst low) below echo's (best low ÷ worst high), two repeats or more",
    )
    cells = aggregate(results)
    kv = [c for c in cells if c.workload == KV]
    if not kv:
        return Claim(
            *claim, INCONCLUSIVE, "the kv workload did not run (`lab compare --workload kv`)"
        )
    verdicts: list[Verdict] = []
    lines: list[str] = []
    for concurrency in sorted({c.concurrency for c in kv}):
        both: list[tuple[Spread, Spread, str]] = []
        for design in DESIGNS:
            echo_cell = cells_for(cells, design, PERSISTENT).get(concurrency)
            kv_cell = cells_for(cells, design, KV).get(concurrency)
            if echo_cell is None or kv_cell is None or not (echo_cell.usable and kv_cell.usable):
                continue
            echo, served = echo_cell.throughput, kv_cell.throughput
            if echo is not None and served is not None and min(echo.low, served.low) > 0:
                both.append((echo, served, design))
        if len(both) < 2:
            continue
        echo_gap, echo_low, echo_high, *echo_names = _gap([(e, d) for e, _, d in both])
        kv_gap, kv_low, kv_high, *kv_names = _gap([(k, d) for _, k, d in both])
        repeated = all(e.repeated and k.repeated for e, k, _ in both)
        text = (
            f"c={concurrency}, {len(both)} designs: echo ×{echo_gap:.2f} ({echo_names[0]} ÷ "
            f"{echo_names[1]}, range ×{echo_low:.2f}–×{echo_high:.2f}), kv ×{kv_gap:.2f} "
            f"({kv_names[0]} ÷ {kv_names[1]}, range ×{kv_low:.2f}–×{kv_high:.2f})"
        )
        if not repeated:
            verdict = INCONCLUSIVE
            text += " (single run: never clear)"
        elif kv_high < echo_low:
            verdict = HOLDS
        elif kv_low > echo_high:
            verdict = NOT_HOLDS
        else:
            verdict = INCONCLUSIVE
            text += UNCLEAR
        verdicts.append(verdict)
        lines.append(f"{text} → {verdict}")
    if not lines:
        reasons = [c.why_unusable() for c in kv if not c.usable]
        return Claim(
            *claim,
            INCONCLUSIVE,
            _no_data(reasons, f"no two designs ran both {PERSISTENT} and kv at one concurrency"),
        )
    return Claim(*claim, _combine(verdicts), _lines(lines))


#: The claims judged on other parts of results.json than the sweep's cells.
_RESULT_CLAIMS: tuple[Callable[[Mapping[str, Any]], Claim], ...] = (_distribution, _real_work)


def evaluate(results: Mapping[str, Any]) -> list[Claim]:
    """Every claim and the control, each with its verdict on ``results`` (a
    ``results.json``)."""
    cells = aggregate(results)
    return [
        *(judge(cells) for judge in _CLAIMS),
        *(judge(results) for judge in _RESULT_CLAIMS),
        _control(cells),
    ]
