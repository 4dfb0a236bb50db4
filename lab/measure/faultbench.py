"""Benches under a fault: ``lab bench --fault SPEC --at SECONDS``.

The loaders record a series — verified requests and failures by kind in 100 ms intervals of
the measured window (``LoadConfig.series``) — and a timer thread injects the fault ``--at``
seconds into that window, through the backend (``inject``/``undo``: the Docker backend uses
``lab fault``'s machinery, the local one signals the server's processes). What the run then
says, from the series alone:

* **errors during the fault**, by kind: failures from the interval of the injection until the
  first of the intervals that show throughput back (or the end of the run);
* **recovery**: the time from the fault's end (its injection, for a kill) until throughput is
  back — the first interval from which three in a row average :data:`BACK_AT` of the lower
  quartile of the intervals before the fault (the spread before it is its own measure of
  noise: on a busy machine single intervals swing by a third), none when nothing was
  measured before it;
* **lost against in flight**: the failed requests of that stretch against the requests in
  flight when the fault came (closed loop: one per connection, ``--concurrency``);
* **verification**: no echo corrupted (``mismatch`` and ``short_read`` zero), in the whole run.

Fault specs: ``kill-worker[:SIGNAL]``, ``pause``, ``delay:MS[:JITTER]``, ``stall``,
``loss:PCT``, ``rate:KBIT``, ``partition``, ``switch:DESIGN`` (a graceful ``lab switch``);
``@N`` after a network fault picks client N (default: all; ``partition``: client 1). How long a
fault lasts is ``--fault-for`` (a kill and a switch are instants).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from lab.sockets.designs import DESIGNS

__all__ = [
    "BACK_AT",
    "KINDS",
    "FaultRun",
    "FaultSpec",
    "FaultTimer",
    "analyse",
    "check_at",
    "parse_fault",
]

BACK_AT = 0.8  # back when three intervals in a row average this share of before's lower quartile
BACK_RUN = 3
#: The fault kinds, and whether each lasts (``--fault-for``) or is an instant.
KINDS = {
    "kill-worker": False,
    "pause": True,
    "delay": True,
    "stall": True,
    "loss": True,
    "rate": True,
    "partition": True,
    "switch": False,
}
NETWORK = ("delay", "stall", "loss", "rate", "partition")
#: An echo that came back wrong: a byte that differs from what was sent. A short read (the
#: stream ended before the whole echo; every byte that came was right) is a cut connection —
#: what a killed worker leaves when it had read the request: the kernel closes its socket with
#: a FIN, not a reset — so it counts as lost, not as corrupted.
CORRUPT = ("mismatch",)


#: The designs that serve in worker processes a kill can take away: the process pools and the
#: process per connection. The rest serve in one process (threads, an event loop).
WORKER_DESIGNS = tuple(
    name
    for name, design in DESIGNS.items()
    if design.pool_of == "processes" or design.family == "fork"
)
#: The designs whose worker serves one connection at a time: a kill loses at most that one.
ONE_CONNECTION_WORKERS = tuple(n for n in WORKER_DESIGNS if DESIGNS[n].family != "epoll")


class FaultError(Exception):
    """A fault spec that cannot be run (one line naming the fix)."""


def check_applies(fault: FaultSpec, design: str, containers: bool) -> None:
    """:class:`FaultError` when ``fault`` cannot run against ``design`` here."""
    if design not in DESIGNS:
        raise FaultError(f"--fault runs on the lab's designs: {design} is a peer or your server")
    if fault.kind == "kill-worker" and design not in WORKER_DESIGNS:
        raise FaultError(
            f"--fault kill-worker: {design} serves in one process (no worker to kill): "
            f"choose one of {', '.join(WORKER_DESIGNS)}"
        )
    if (fault.kind in NETWORK or fault.kind == "switch") and not containers:
        raise FaultError(
            f"--fault {fault.kind} needs the containers (a client's network namespace, "
            "a compose switch): drop --local"
        )
    if fault.kind == "switch" and fault.value not in DESIGNS:
        raise FaultError(f"--fault switch:{fault.value}: not a design (see `lab designs`)")


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    value: str = ""  # the signal, the milliseconds, the percent, the kbit/s, the design
    extra: str = ""  # delay's jitter
    client: int | None = None
    seconds: float = 1.0  # how long it lasts (ignored by instants)

    @property
    def lasts(self) -> bool:
        return KINDS[self.kind]

    def describe(self) -> str:
        text = self.kind + (f" {self.value}" if self.value else "")
        if self.kind == "delay":
            text += " ms" + (f" ± {self.extra} ms" if self.extra else "")
        elif self.kind == "loss":
            text += " %"
        elif self.kind == "rate":
            text += " kbit/s"
        if self.client is not None:
            text += f" on client {self.client}"
        return text + (f" for {self.seconds:g} s" if self.lasts else "")


#: The least ``--at``: intervals before the fault to measure "before" with (the first of the
#: measured window may be partial).
AT_LEAST = 0.3


def check_at(at: float, duration: float) -> None:
    """:class:`FaultError` unless ``at`` leaves room before the fault and falls in the window."""
    if not AT_LEAST <= at < duration:
        raise FaultError(
            f"--at {at:g}: inject between {AT_LEAST:g} s (a throughput before it to compare "
            f"with) and --duration {duration:g}: change --at or raise --duration"
        )


def parse_fault(text: str, seconds: float = 1.0) -> FaultSpec:
    """``KIND[:VALUE[:EXTRA]][@CLIENT]`` → a FaultSpec (:class:`FaultError`: one line)."""
    spec, _, client_text = text.strip().partition("@")
    kind, _, rest = spec.partition(":")
    value, _, extra = rest.partition(":")
    if kind not in KINDS:
        raise FaultError(
            f"--fault {text!r}: choose {', '.join(KINDS)} (e.g. kill-worker, delay:200@1)"
        )
    client = None
    if client_text:
        if kind not in NETWORK or not client_text.isdigit() or int(client_text) < 1:
            raise FaultError(
                f"--fault {text!r}: @N picks a client (N ≥ 1) for {', '.join(NETWORK)}"
            )
        client = int(client_text)
    if kind == "partition" and client is None:
        client = 1
    needs = {"delay": "MS", "loss": "PCT", "rate": "KBIT", "switch": "DESIGN"}
    if kind in needs and not value:
        raise FaultError(f"--fault {kind} needs a value: {kind}:{needs[kind]}")
    if kind in ("delay", "loss", "rate"):
        try:
            numbers = [float(v) for v in (value, extra) if v]
        except ValueError:
            raise FaultError(f"--fault {text!r}: {needs[kind]} is a number") from None
        if any(n <= 0 for n in numbers) or (kind == "loss" and numbers[0] > 100):
            raise FaultError(f"--fault {text!r}: {needs[kind]} out of range")
    if kind == "kill-worker" and value and value.upper() not in ("KILL", "TERM", "SEGV"):
        raise FaultError(f"--fault {text!r}: the signal is KILL, TERM or SEGV")
    if seconds <= 0:
        raise FaultError(f"--fault-for {seconds:g}: give a positive number of seconds")
    return FaultSpec(
        kind, value.upper() if kind == "kill-worker" else value, extra, client, seconds
    )


class Injector(Protocol):
    def inject(self, fault: FaultSpec) -> str:
        """Put ``fault`` in place now; returns what was done, in a few words."""

    def undo(self, fault: FaultSpec) -> None:
        """Take it away (idempotent; called once more at the end of every fault bench)."""


class FaultTimer:
    """Injects a fault ``at`` seconds into the measured window, in a thread of its own.

    :meth:`arm` is given each start time the backend picks (a late start is retried with a
    later one: the timer follows); the thread injects at ``start_at + warmup + at`` and, for a
    fault that lasts, undoes it ``seconds`` later. Times are UNIX seconds."""

    def __init__(self, injector: Injector, fault: FaultSpec, at: float, warmup: float) -> None:
        self.injector = injector
        self.fault = fault
        self.at = at
        self.warmup = warmup
        self.when: float | None = None
        self.injected_at: float | None = None
        self.undone_at: float | None = None
        self.said = ""
        self.error: str | None = None
        self._cond = threading.Condition()
        self._cancel = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-timer")
        self._thread.start()

    def arm(self, start_at: float) -> None:
        with self._cond:
            self.when = start_at + self.warmup + self.at
            self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            while not self._cancel and (self.when is None or time.time() < self.when):
                timeout = None if self.when is None else max(0.0, self.when - time.time())
                self._cond.wait(timeout)
            if self._cancel:
                return
        try:
            self.said = self.injector.inject(self.fault)
            # In place once inject() returns (a helper container takes a moment to start).
            self.injected_at = time.time()
            if self.fault.lasts:
                with self._cond:
                    self._cond.wait_for(lambda: self._cancel, self.fault.seconds)
                self.undone_at = time.time()  # undoing begins: it ends here (a proxy's
                self.injector.undo(self.fault)  # drain of what it still carries aside)
        except Exception as exc:  # reported with the run: the bench goes on and says so
            self.error = str(exc) or type(exc).__name__

    def finish(self) -> None:
        """After the load: stop waiting, make sure the fault is gone."""
        with self._cond:
            self._cancel = True
            self._cond.notify_all()
        self._thread.join(60)
        try:
            self.injector.undo(self.fault)
        except Exception as exc:
            self.error = self.error or f"undo: {exc}"


@dataclass
class FaultRun:
    """What a fault did to a run, read from its series."""

    fault: str
    at_s: float  # into the measured window, as injected
    lasted_s: float
    said: str
    before_rps: float  # median throughput of the intervals before the fault
    during_rps: float  # mean throughput from the injection to the fault's end (or +1 s)
    recovery_s: float | None  # from the fault's end until throughput was back; None: never
    errors: dict[str, int] = field(default_factory=dict)  # during the fault and its recovery
    lost: int = 0
    in_flight: int = 0
    verified: bool = True
    error: str | None = None  # the fault could not be put in place (then nothing else holds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyse(
    load: dict[str, Any],
    fault: FaultSpec,
    injected_at: float | None,
    undone_at: float | None,
    said: str = "",
    error: str | None = None,
    in_flight: int | None = None,
) -> FaultRun:
    """The fault's effect on ``load`` (a LoadResult.to_dict() with a series); ``in_flight``:
    the run's whole concurrency (a merged result's config is one loader's share)."""
    series = load.get("series") or {"step_s": 0.1, "ok": [], "errors": {}}
    step = float(series["step_s"])
    ok: list[int] = list(series["ok"])
    errors: dict[str, list[int]] = dict(series["errors"])
    in_flight = in_flight if in_flight is not None else int(load["config"]["concurrency"])
    corrupt = sum(int(load["errors"].get(kind, 0)) for kind in CORRUPT)
    measure_start = float(load["measure_start"])
    length = max([len(ok), *(len(v) for v in errors.values())], default=0)
    ok += [0] * (length - len(ok))
    if injected_at is None:
        never = "the fault was never injected (the run ended first)"
        return FaultRun(
            fault.describe(), 0.0, 0.0, said, 0.0, 0.0, None, verified=corrupt == 0,
            in_flight=in_flight, error=error or never,
        )  # fmt: skip
    start = max(0, int((injected_at - measure_start) / step))
    end_time = undone_at if (fault.lasts and undone_at is not None) else injected_at
    end = min(length, max(start + 1, int((end_time - measure_start) / step + 0.999)))
    before = ok[:start][1:] or ok[:start]  # the first interval may be partial
    before_rps = statistics.median(before) / step if before else 0.0
    stretch = ok[start:end] if fault.lasts else ok[start : start + int(1 / step)]
    during_rps = sum(stretch) / (len(stretch) * step) if stretch else 0.0
    recovery = None
    usual = sorted(before)[len(before) // 4] if before else 0  # before's lower quartile
    back = BACK_AT * usual * BACK_RUN
    upto = length  # errors are counted from the fault's interval until it is back
    last_full = length - 1  # the last interval may be partial
    for i in range(end, last_full - BACK_RUN + 1):
        if before_rps <= 0:
            break  # nothing was measured before the fault: "back" would mean nothing
        if sum(ok[i : i + BACK_RUN]) >= back:
            recovery = max(0.0, i * step - (end_time - measure_start))
            upto = i
            break
    counted = {k: sum(v[start:upto]) for k, v in errors.items() if sum(v[start:upto])}
    return FaultRun(
        fault=fault.describe(),
        at_s=injected_at - measure_start,
        lasted_s=(end_time - injected_at),
        said=said,
        before_rps=before_rps,
        during_rps=during_rps,
        recovery_s=recovery,
        errors=counted,
        lost=sum(counted.values()),
        in_flight=in_flight,
        verified=corrupt == 0,
        error=error,
    )
