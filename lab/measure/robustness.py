"""The robustness battery: ``lab soak`` and ``lab compare --robustness``.

Every design gets the same checks, each on a fresh local server (loopback, ``--idle-timeout 3``,
2 workers), each a figure and a pass or fail, and a sentence on why the design behaves so:

* **storm**: ``STORM`` connections at once, far beyond the backlog, each echoing a message —
  passes when every one ends echoed or with a classified error, and the server serves on;
* **slowloris**: ``IDLE`` idle connections (``--idle-timeout 1``), then a normal client —
  passes when it is served within the time the idle timeout needs to clear the idle ones
  ahead of it (a pool of N serves them N at a time; an event loop serves it at once);
* **non-reader**: a client sends 4 MiB and never reads, then a normal client — passes when it
  is served and the non-reader is cut by the idle timeout;
* **large echo**: 8 MiB — passes when it comes back whole and the server grew < 64 MiB;
* **sequential**: N connections one after another — passes when the server's descriptors are
  back where they were, no zombie is left, and it grew < 32 MiB;
* **fuzz**: random bytes in random chunks, then a half-close, a reset or an early close —
  passes when every half-closed one echoed exactly and the server serves on;
* **kill-worker** (process designs): a worker SIGKILLed under a persistent load — passes when
  at most what it held fails and throughput is back;
* **pause**: the server stopped (SIGSTOP) for 1 s under load — passes when nothing is lost (1 s
  is below the loaders' timeout) and throughput is back.

The checks are plain sockets and threads: they judge the server, not a load generator. Times
are bounds a check waits within (a slow machine may fail one; none is a measurement), figures
are counts and sizes read from the kernel (``/proc``).
"""

from __future__ import annotations

import contextlib
import random
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lab.measure import probe
from lab.measure.bench import LocalBackend, ServerSpec, bench
from lab.measure.config import make_config
from lab.measure.faultbench import ONE_CONNECTION_WORKERS, WORKER_DESIGNS, parse_fault
from lab.sockets.designs import DESIGNS

__all__ = ["CHECKS", "Check", "battery", "fault_benches", "steps", "table_markdown"]

IDLE_TIMEOUT = 3.0
SERVER_OPTIONS = ("--idle-timeout", str(IDLE_TIMEOUT), "--workers", "2")
STORM = 1000
STORM_QUICK = 300
IDLE = 20
SLOW_IDLE_TIMEOUT = 1.0  # slowloris's own: 20 idle clients cost a pool of 2 about 10 s
SEQUENTIAL = 100_000
SEQUENTIAL_QUICK = 2_000
FUZZ = 400
FUZZ_QUICK = 60
LARGE = 8 << 20
NON_READER = 4 << 20
MESSAGE = b"This is a test message from a stupid client lol!\0"
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

CHECKS = (
    "storm",
    "slowloris",
    "non-reader",
    "large echo",
    "sequential",
    "fuzz",
    "kill-worker",
    "pause",
)


@dataclass
class Check:
    design: str
    check: str
    figure: str
    passed: bool | None  # None: does not apply
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- small clients ---------------------------------------------------------------------------
def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def echo_once(port: int, message: bytes = MESSAGE, timeout: float = 10.0) -> bool:
    """One connection, one message, its echo read whole: whether it came back the same."""
    try:
        with _connect(port, timeout) as sock:
            sock.sendall(message)
            got = bytearray()
            while len(got) < len(message):
                data = sock.recv(65536)
                if not data:
                    break
                got += data
            return bytes(got) == message
    except OSError:
        return False


def served_within(port: int, seconds: float) -> float | None:
    """Seconds until a normal client got its echo (retrying a refused or timed-out attempt),
    or None if not within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        remaining = seconds - (time.monotonic() - started)
        if echo_once(port, timeout=max(0.1, remaining)):
            return time.monotonic() - started
    return None


@contextlib.contextmanager
def _server(design: str, extra: Sequence[str] = ()) -> Iterator[tuple[LocalBackend, int, int]]:
    backend = LocalBackend()
    try:
        _, port = backend.start(ServerSpec(design, options=(*SERVER_OPTIONS, *extra)))
        yield backend, port, backend.pid
    finally:
        backend.close()


# -- the checks --------------------------------------------------------------------------------
def check_storm(design: str, count: int) -> Check:
    """``count`` non-blocking connects at once; each sends the message and reads its echo."""
    with _server(design) as (_, port, _pid):
        outcome: dict[str, int] = {}
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, bytearray] = {}
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            if code not in (0, 115):  # EINPROGRESS
                outcome["refused"] = outcome.get("refused", 0) + 1
                sock.close()
                continue
            pending[sock] = bytearray()
            sel.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for key, events in sel.select(0.5):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                kind = _storm_step(sel, conn, events, pending[conn])
                if kind is not None:
                    outcome[kind] = outcome.get(kind, 0) + 1
                    sel.unregister(conn)
                    conn.close()
                    del pending[conn]
        for sock in pending:
            outcome["timeout"] = outcome.get("timeout", 0) + 1
            sock.close()
        sel.close()
        alive = served_within(port, 10) is not None
    echoed = outcome.pop("echoed", 0)
    rest = ", ".join(f"{k} {v}" for k, v in sorted(outcome.items()))
    figure = f"echoed {echoed} of {count}" + (f"; {rest}" if rest else "")
    ok = alive and echoed + sum(outcome.values()) == count and "mismatch" not in outcome
    why = (
        "a full backlog drops SYNs (syncookies off): clients retransmit and get in later"
        if echoed == count
        else "what the backlog could not hold was reset or timed out, each counted"
    )
    return Check(design, "storm", figure + ("" if alive else "; SERVER GONE"), ok, why)


def _storm_step(
    sel: selectors.BaseSelector, sock: socket.socket, events: int, got: bytearray
) -> str | None:
    try:
        if events & selectors.EVENT_WRITE:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                return "refused" if code == 111 else "reset" if code == 104 else "other"
            sock.send(MESSAGE)
            sel.modify(sock, selectors.EVENT_READ)
            return None
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    except OSError:
        return "other"
    if not data:
        return "short_read"
    got += data
    if len(got) < len(MESSAGE):
        return None
    return "echoed" if bytes(got) == MESSAGE else "mismatch"


def check_slowloris(design: str, idle: int) -> Check:
    cls = DESIGNS[design]
    if design == "iterative":
        capacity = 1
    elif cls.pool_of is not None and not cls.grows and cls.family != "epoll":
        capacity = 2  # SERVER_OPTIONS' workers, one connection each
    else:
        capacity = 0  # an event loop, a thread or a process per connection, a growing pool
    # What the idle timeout needs to clear the idle clients queued ahead, capacity at a time.
    bound = (idle / capacity if capacity else 0) * SLOW_IDLE_TIMEOUT + 5
    extra = ("--idle-timeout", str(SLOW_IDLE_TIMEOUT))
    with _server(design, extra) as (_, port, _pid):
        held = []
        for _ in range(idle):
            with contextlib.suppress(OSError):
                held.append(_connect(port))
        after = served_within(port, bound)
        for sock in held:
            sock.close()
    figure = (
        f"{idle} idle: "
        + (f"a normal client served after {after:.1f} s" if after is not None else "not served")
        + f" (bound {bound:.0f} s)"
    )
    if capacity == 2:
        why = (
            f"a pool of 2 {cls.pool_of} serving one connection each is held by the idle "
            "clients, 2 at a time, until the idle timeout cuts them"
        )
    elif capacity == 1:
        why = "one connection at a time: each idle client holds it until the idle timeout"
    elif cls.family == "epoll":
        why = "an event loop waits for every connection at once: idle ones cost it nothing"
    else:
        why = f"{cls.model}: an idle client holds only its own"
    return Check(design, "slowloris", figure, after is not None, why)


def check_non_reader(design: str) -> Check:
    with _server(design) as (_, port, _pid):
        hog = _connect(port)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = [0]

        def flood() -> None:
            block = b"x" * 65536
            with contextlib.suppress(OSError):
                while sent[0] < NON_READER:
                    sent[0] += hog.send(block)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        time.sleep(0.3)  # let it back up (a load, not a measurement)
        # A design that serves one connection at a time serves the others only once the
        # non-reader is cut: as long as that may take (see below).
        other = served_within(port, 3 * IDLE_TIMEOUT + 5)
        # A blocking write that moved a few bytes (the client's window opens a crack to a
        # zero-window probe) is progress: the timeout starts again. So allow it a few rounds.
        cut_after = _closed_within(hog, 3 * IDLE_TIMEOUT + 5)
        hog.close()
        thread.join(5)
    parts = [f"sent {sent[0] >> 10} KiB unread"]
    parts.append(f"others served after {other:.1f} s" if other is not None else "others not served")
    parts.append(f"cut after {cut_after:.1f} s" if cut_after is not None else "never cut")
    cls = DESIGNS[design]
    if design == "iterative":
        why = (
            "one connection at a time: the others wait until the idle timeout cuts the "
            "non-reader (its write() blocked on the full buffers)"
        )
    elif cls.family == "epoll" or cls.pool_of == "threads" or cls.model.startswith("a thread"):
        why = (
            "its echo fills both socket buffers, then the server stops reading it (bounded "
            "output) until the idle timeout closes it"
        )
    else:
        why = "the one serving it blocks in write() until the idle timeout closes it"
    return Check(
        design, "non-reader", "; ".join(parts), other is not None and cut_after is not None, why
    )


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (a FIN or a reset), seen without reading: a
    read would drain the echo, and the server would be making progress."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if poller.poll(500):
            return time.monotonic() - started
    return None


def check_large_echo(design: str) -> Check:
    with _server(design) as (_, port, pid):
        before = probe.tree_rss_bytes(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], probe.tree_rss_bytes(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        payload = random.Random(1).randbytes(LARGE)
        ok = False
        with contextlib.suppress(OSError), _connect(port, 30) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            got = bytearray()
            while len(got) < LARGE:
                data = sock.recv(1 << 20)
                if not data:
                    break
                got += data
            ok = bytes(got) == payload
            sender.join(10)
        done.set()
        sampler.join(2)
    grew = max(0, peak[0] - before) >> 20
    figure = f"8 MiB echoed {'whole' if ok else 'WRONG'}; server grew {grew} MiB at most"
    why = "the echo streams through a fixed buffer: memory does not follow the message"
    return Check(design, "large echo", figure, ok and grew < 64, why)


def check_sequential(design: str, count: int) -> Check:
    with _server(design) as (_, port, pid):
        echo_once(port)  # the first connection's one-time costs (imports, a first child)
        time.sleep(0.2)
        fds, rss = probe.tree_descriptors(pid), probe.tree_rss_bytes(pid)
        failed = sum(1 for _ in range(count) if not echo_once(port))
        time.sleep(0.5)  # the last children reaped, threads ended (a bound, not a figure)
        fds_after, rss_after = probe.tree_descriptors(pid), probe.tree_rss_bytes(pid)
        zombies = probe.zombies(pid)
    grew = max(0, rss_after - rss) >> 20
    figure = (
        f"{count:,} connections, {failed} failed; descriptors {fds} → {fds_after}, "
        f"zombies {zombies}, RSS +{grew} MiB"
    )
    ok = failed == 0 and fds_after <= fds + 2 and zombies == 0 and grew < 32
    return Check(design, "sequential", figure, ok, "each connection's resources end with it")


def check_fuzz(design: str, cases: int, seed: int = 0) -> Check:
    """Random bytes in random chunks, then one of: a half-close (the echo must come back
    exactly, then EOF), a reset, or an early close. Afterwards the server must serve on."""
    rng = random.Random(seed)
    exact = wrong = 0
    with _server(design) as (_, port, _pid):
        for _ in range(cases):
            payload = rng.randbytes(rng.choice((0, 1, 49, 1000, rng.randrange(1, 65536))))
            ending = rng.choice(("half-close", "half-close", "reset", "close"))
            result = fuzz_case(port, payload, _chunks(rng, len(payload)), ending)
            if ending == "half-close":
                exact += result
                wrong += not result
        alive = served_within(port, 10) is not None
    figure = f"{cases} cases, {exact} half-closed echoed exactly, {wrong} not" + (
        "" if alive else "; SERVER GONE"
    )
    why = "bytes are bytes to an echo: framing, NULs, resets and early closes end one connection"
    return Check(design, "fuzz", figure, wrong == 0 and alive, why)


def _chunks(rng: random.Random, length: int) -> list[int]:
    sizes, left = [], length
    while left > 0:
        size = min(left, rng.choice((1, 7, 100, 4096, left)))
        sizes.append(size)
        left -= size
    return sizes


def fuzz_case(port: int, payload: bytes, chunks: Sequence[int], ending: str) -> bool:
    """One fuzz case; True when a half-closed one echoed exactly (others: True if no hang)."""
    try:
        with _connect(port, 10) as sock:
            offset = 0
            for size in chunks:
                sock.sendall(payload[offset : offset + size])
                offset += size
            if ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                return True
            if ending == "close":
                return True
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
            return bytes(got) == payload
    except OSError:
        return ending != "half-close"


def check_fault(design: str, kind: str) -> Check:
    """kill-worker or pause under a persistent load, through the fault bench."""
    if kind == "kill-worker" and design not in WORKER_DESIGNS:
        return Check(design, kind, "n/a", None, "it serves in one process: no worker to kill")
    # The fault 1.5 s into the run, 1 s long, then 2 s to see throughput back. "Back" is
    # BACK_RUN intervals in a row near the lower quartile of the intervals before the fault: on
    # a loaded machine throughput swings by half from one 0.1 s interval to the next, and a
    # short window before (0.5 s was tried) or after (0.5 s) made a busy CI say "not back".
    config = make_config(
        "127.0.0.1", port=1, workload="persistent", concurrency=4, duration=4.5, warmup=0.5
    )
    spec = parse_fault(kind, 1.0)
    backend = LocalBackend()
    try:
        result = bench(backend, ServerSpec(design, options=SERVER_OPTIONS), config, spec, 1.5)
    finally:
        backend.close()
    run = result.fault
    assert run is not None
    if run.error:
        return Check(design, kind, f"not injected: {run.error}", False, "")
    back = f"back after {run.recovery_s:.1f} s" if run.recovery_s is not None else "not back"
    figure = f"lost {run.lost} of {run.in_flight}; {back}"
    if kind == "kill-worker":
        held = 1 if design in ONE_CONNECTION_WORKERS else run.in_flight
        ok = run.lost <= held and run.recovery_s is not None and run.verified
        why = (
            "a worker serves one connection: only that one is lost; the master replaces it"
            if held == 1
            else "an event-loop worker holds all its connections: those are lost together"
        )
    else:
        ok = run.lost == 0 and run.recovery_s is not None and run.verified
        why = "a stopped server's connections wait in the kernel's buffers and queues"
    return Check(design, kind, figure, ok, why)


def battery(
    designs: Sequence[str],
    quick: bool = False,
    sequential: int | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> list[Check]:
    """Every check on every design, in that order."""
    runs: dict[str, Callable[[str], Check]] = {
        "storm": lambda d: check_storm(d, STORM_QUICK if quick else STORM),
        "slowloris": lambda d: check_slowloris(d, IDLE),
        "non-reader": check_non_reader,
        "large echo": check_large_echo,
        "sequential": lambda d: check_sequential(
            d, sequential or (SEQUENTIAL_QUICK if quick else SEQUENTIAL)
        ),
        "fuzz": lambda d: check_fuzz(d, FUZZ_QUICK if quick else FUZZ),
        "kill-worker": lambda d: check_fault(d, "kill-worker"),
        "pause": lambda d: check_fault(d, "pause"),
    }
    found = []
    for design in designs:
        for name in CHECKS:
            if progress is not None:
                progress(design, name)
            found.append(runs[name](design))
    return found


#: The fault benches ``lab compare --robustness`` runs per design, each with its workload: a
#: kill under a persistent load (process designs), and in the containers one slow client,
#: connect-per-request (the proxy delays new connections; head-of-line blocking shows).
FAULTS = {"kill-worker": "persistent", "delay:300@1": "connect-per-request"}


def _faults_for(design: str, containers: bool) -> list[str]:
    return [
        text
        for text in FAULTS
        if (design in WORKER_DESIGNS if text == "kill-worker" else containers)
    ]


def steps(designs: Sequence[str], containers: bool) -> int:
    """How many steps :func:`battery` and :func:`fault_benches` take for ``designs``."""
    ours = [d for d in designs if d in DESIGNS]
    return len(ours) * len(CHECKS) + sum(len(_faults_for(d, containers)) for d in ours)


def fault_benches(
    backend: Any,
    designs: Sequence[str],
    containers: bool,
    workers: int,
    progress: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Each design under each of its :data:`FAULTS` (concurrency 6, the fault 1 s into 5 s, 2 s
    long: room after it to see throughput come back): ``{"design", "fault", "run": FaultRun,
    "series"}``; a bench that fails is kept with its error."""
    found: list[dict[str, Any]] = []
    for design in (d for d in designs if d in DESIGNS):
        for text in _faults_for(design, containers):
            if progress is not None:
                progress(design, text)
            spec = parse_fault(text, 2.0)
            options: tuple[str, ...] = ()
            if DESIGNS[design].pool_of is not None:
                options = ("--workers", str(workers))
            config = make_config(
                "127.0.0.1", port=1, workload=FAULTS[text], concurrency=6, duration=5.0, warmup=1.0
            )
            try:
                result = bench(backend, ServerSpec(design, options=options), config, spec, 1.0)
            except Exception as exc:  # kept with the sweep's other failures, one line
                found.append({"design": design, "fault": text, "error": str(exc)})
                continue
            assert result.fault is not None
            found.append(
                {
                    "design": design,
                    "fault": text,
                    "run": result.fault.to_dict(),
                    "series": result.load.get("series"),
                }
            )
    return found


def table_markdown(checks: Sequence[Check]) -> str:
    """Design × check: the figure and ✓/✗, then a sentence per row on why."""
    designs = list(dict.fromkeys(c.design for c in checks))
    names = list(dict.fromkeys(c.check for c in checks))
    cell = {(c.design, c.check): c for c in checks}
    lines = ["| design | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for design in designs:
        row = []
        for name in names:
            c = cell.get((design, name))
            if c is None:
                row.append("")
                continue
            mark = "—" if c.passed is None else ("✓" if c.passed else "✗ FAIL")
            row.append(f"{mark} {c.figure}")
        lines.append(f"| {design} | " + " | ".join(row) + " |")
    lines.append("")
    for design in designs:
        whys = [f"{c.check}: {c.why}" for c in checks if c.design == design and c.why]
        lines.append(f"- **{design}** — " + "; ".join(whys) + ".")
    return "\n".join(lines) + "\n"
