"""A load run's settings: one frozen value, checked once, with defaults resolved.

:func:`make_config` takes the options as a user gave them (``None`` = not given) and returns a
:class:`LoadConfig`, or raises :class:`~lab.measure.errors.ConfigError` with one line naming the
fix. Options that contradict each other are refused rather than silently reinterpreted:

* ``--per-connection`` only means something for the workloads that reuse a connection
  (``persistent``, ``kv``); ``--mix``, ``--keys`` and ``--distribution`` only for ``kv``;
* every loader process needs at least one connection, so an explicit ``--processes`` may not
  exceed ``--concurrency`` (the default, the number of CPUs, is lowered to fit instead);
* ``--rate`` (open loop) and ``--concurrency`` combine: the rate says *when* each request is
  due, the concurrency is the most connections in flight at once — requests due while every
  connection is busy wait in the loader, and that wait is part of their latency.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from lab.measure.errors import ConfigError
from lab.sockets.client import DEFAULT_PORT

__all__ = [
    "CONNECT_PER_REQUEST",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DURATION",
    "DEFAULT_PER_CONNECTION",
    "DEFAULT_PORT",
    "DEFAULT_SIZE",
    "DEFAULT_STARVE_AFTER",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WARMUP",
    "KV",
    "KV_OPS",
    "MAX_DURATION",
    "PERSISTENT",
    "WORKLOADS",
    "LoadConfig",
    "make_config",
    "parse_mix",
    "parse_size",
]

CONNECT_PER_REQUEST = "connect-per-request"
PERSISTENT = "persistent"
#: Commands of the kv service (``--service kv``) instead of echoes, on reused connections.
KV = "kv"
WORKLOADS = (CONNECT_PER_REQUEST, PERSISTENT, KV)
#: The kv workload's commands, as ``--mix`` names them.
KV_OPS = ("get", "set", "incr", "del")
DEFAULT_MIX = "get=80,set=15,incr=5"
DEFAULT_KEYS = 1000
MAX_KEYS = 1_000_000
MAX_ZIPF = 5.0  # the steepest --distribution zipf:S
#: A SET line is ``SET load:k:<key> <key>.<value>``: the value's bytes must leave room for
#: the rest within the service's 4,096-byte line.
MAX_VALUE = 4000

DEFAULT_SIZE = 49  # the chapter's message with its NUL
MAX_SIZE = 1024 * 1024
DEFAULT_CONCURRENCY = 10
MAX_CONCURRENCY = 100_000
MAX_PROCESSES = 256
DEFAULT_PER_CONNECTION = 100
DEFAULT_DURATION = 10.0
MAX_DURATION = 600.0  # the hard cap: a load run always stops by itself
DEFAULT_WARMUP = 1.0
MAX_WARMUP = 60.0
DEFAULT_STARVE_AFTER = 1.0
DEFAULT_TIMEOUT = 5.0
MAX_RATE = 10_000_000.0
MAX_REQUESTS = 10**12
#: How far in the past ``--start-at`` may be (clock skew between containers) before it is an error.
START_AT_SLACK = 2.0
#: How far in the future ``--start-at`` may be.
MAX_START_AHEAD = 3600.0


@dataclass(frozen=True)
class LoadConfig:
    """Every setting of one load run (see ``lab load --help`` for each one's meaning)."""

    host: str
    port: int = DEFAULT_PORT
    workload: str = CONNECT_PER_REQUEST
    #: Messages per connection before reconnecting (``persistent``, ``kv``; 1 otherwise).
    per_connection: int = 1
    size: int = DEFAULT_SIZE
    #: Closed loop: connections each sending its next request when the last one is back.
    #: Open loop: the most connections in flight at once.
    concurrency: int = DEFAULT_CONCURRENCY
    #: Requests per second in total (open loop); ``None``: closed loop.
    rate: float | None = None
    processes: int = 1
    duration: float = DEFAULT_DURATION
    #: Measured requests in total (after warm-up); ``None``: bounded by ``duration`` only.
    requests: int | None = None
    warmup: float = DEFAULT_WARMUP
    #: Absolute UNIX time at which every loader starts; ``None``: shortly after they are ready.
    start_at: float | None = None
    starve_after: float = DEFAULT_STARVE_AFTER
    timeout: float = DEFAULT_TIMEOUT
    #: ``kv``: the commands' shares (``get=80,set=15,incr=5``), the keys, how a key is picked,
    #: and this run's own name for its counters (``load:c:<tag>:<key>``), so that the run's
    #: INCRs can be told from every earlier run's in the same database. ``size`` is the value's.
    mix: str = DEFAULT_MIX
    keys: int = DEFAULT_KEYS
    distribution: str = "uniform"
    tag: str = ""
    #: Record a throughput and error series in :data:`SERIES_STEP` intervals of the measured
    #: window (``lab bench --fault``); off, the per-request path does not pay for it.
    series: bool = False

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def persistent(self) -> bool:
        """Whether a connection carries ``per_connection`` requests (not one)."""
        return self.workload in (PERSISTENT, KV)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["loop"] = "open" if self.open_loop else "closed"
        if self.workload != KV:  # the kv workload's settings mean nothing to an echo run
            for name in _KV_FIELDS:
                del data[name]
        if not self.series:  # said only by a fault bench's runs (the schema is unchanged)
            del data["series"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_KV_FIELDS = ("mix", "keys", "distribution", "tag")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20}
_UNITS["mib"] = 1 << 20


def parse_size(text: str | int) -> int:
    """``49``, ``"1KiB"``, ``"64k"``, ``"1MiB"`` → bytes (binary units: k = KiB = 1024)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise ConfigError(f"--size {text!r} is not a size — give bytes, e.g. 49, 1KiB or 64KiB")
        size = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if not 1 <= size <= MAX_SIZE:
        raise ConfigError(f"--size must be 1 byte to 1 MiB, got {size} bytes — e.g. 49 or 64KiB")
    return size


_MIX_PART = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+)\s*$")


def parse_mix(text: str) -> dict[str, int]:
    """``get=80,set=15,incr=5`` → each command's weight (any non-negative integers, not all 0)."""
    weights: dict[str, int] = {}
    for part in text.lower().split(","):
        match = _MIX_PART.match(part)
        if not match:
            raise ConfigError(f"--mix takes command=weight pairs, e.g. {DEFAULT_MIX}; got {text!r}")
        op, weight = match.group(1), int(match.group(2))
        if op not in KV_OPS:
            raise ConfigError(f"--mix: unknown command {op!r}, choose from {', '.join(KV_OPS)}")
        if op in weights:
            raise ConfigError(f"--mix names {op} twice: give each command once")
        weights[op] = weight
    if not any(weights.values()):
        raise ConfigError(f"--mix needs a command with a weight above 0, e.g. {DEFAULT_MIX}")
    return weights


def zipf_exponent(distribution: str) -> float | None:
    """How the kv workload picks a key: ``uniform`` (every key alike) → None; Zipf's law (the
    k-th most popular key k^-s as likely as the first): ``zipf`` → 1.0, ``zipf:S`` → S."""
    if distribution == "uniform":
        return None
    name, _, exponent = distribution.partition(":")
    if name != "zipf":
        raise ConfigError(
            f"--distribution must be uniform, zipf or zipf:S (e.g. zipf:1.2), got {distribution!r}"
        )
    try:
        s = float(exponent) if exponent else 1.0
    except ValueError:
        s = math.nan
    if not 0 < s <= MAX_ZIPF:
        raise ConfigError(f"--distribution zipf:S needs 0 < S <= {MAX_ZIPF:g}, got {exponent!r}")
    return s


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _positive(name: str, value: float, *, most: float, unit: str = "") -> None:
    # "not > 0" also rejects NaN, which compares false with everything.
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a positive number{unit}, got {value}")
    if value > most:
        raise ConfigError(f"{name} must be at most {most:g}{unit}, got {value:g}")


def make_config(
    host: str,
    *,
    port: int = DEFAULT_PORT,
    workload: str = CONNECT_PER_REQUEST,
    per_connection: int | None = None,
    size: str | int = DEFAULT_SIZE,
    concurrency: int | None = None,
    rate: float | None = None,
    processes: int | None = None,
    duration: float = DEFAULT_DURATION,
    requests: int | None = None,
    warmup: float = DEFAULT_WARMUP,
    start_at: float | None = None,
    starve_after: float = DEFAULT_STARVE_AFTER,
    timeout: float = DEFAULT_TIMEOUT,
    mix: str | None = None,
    keys: int | None = None,
    distribution: str | None = None,
    tag: str | None = None,
    now: float | None = None,
    cpus: int | None = None,
) -> LoadConfig:
    """Check the options as given (``None``: not given) and resolve the defaults."""
    if not host or not host.strip():
        raise ConfigError("HOST is empty — give the server's name or address, e.g. 127.0.0.1")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")

    if workload not in WORKLOADS:
        raise ConfigError(f"--workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if workload in (PERSISTENT, KV):
        k = DEFAULT_PER_CONNECTION if per_connection is None else per_connection
        if k < 1:
            raise ConfigError(f"--per-connection must be at least 1 message, got {k}")
    else:
        if per_connection is not None and per_connection != 1:
            raise ConfigError(
                "--per-connection applies to the persistent and kv workloads only — "
                "add --workload persistent, or drop --per-connection"
            )
        k = 1
    message_size = parse_size(size)
    if workload == KV:
        weights = parse_mix(DEFAULT_MIX if mix is None else mix)
        mix = ",".join(f"{op}={weight}" for op, weight in weights.items())
        key_count = DEFAULT_KEYS if keys is None else keys
        if not 1 <= key_count <= MAX_KEYS:
            raise ConfigError(f"--keys must be 1 to {MAX_KEYS:,}, got {key_count}")
        distribution = distribution or "uniform"
        zipf_exponent(distribution)
        if message_size > MAX_VALUE:
            raise ConfigError(
                f"--size is the value's size in the kv workload: at most {MAX_VALUE} bytes (the "
                f"service's line is 4,096), got {message_size}"
            )
        tag = tag or secrets.token_hex(4)
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,32}", tag):
            raise ConfigError(f"--tag must be 1 to 32 letters, digits, - or _, got {tag!r}")
    else:
        options = (("--mix", mix), ("--keys", keys), ("--distribution", distribution))
        given = [name for name, value in options if value is not None]
        if given:
            raise ConfigError(
                f"{given[0]} applies to the kv workload only — add --workload kv, or drop it"
            )
        mix, key_count, distribution, tag = DEFAULT_MIX, DEFAULT_KEYS, "uniform", ""

    conns = DEFAULT_CONCURRENCY if concurrency is None else concurrency
    if not 1 <= conns <= MAX_CONCURRENCY:
        raise ConfigError(f"--concurrency must be 1 to {MAX_CONCURRENCY} connections, got {conns}")
    if rate is not None:
        _positive("--rate", rate, most=MAX_RATE, unit=" requests/s")
    if processes is None:
        procs = max(1, min(cpus or _usable_cpus(), conns, MAX_PROCESSES))
    else:
        if not 1 <= processes <= MAX_PROCESSES:
            raise ConfigError(f"--processes must be 1 to {MAX_PROCESSES}, got {processes}")
        if processes > conns:
            raise ConfigError(
                f"--processes {processes} exceeds --concurrency {conns}: every loader process "
                "needs at least one connection — lower --processes or raise --concurrency"
            )
        procs = processes

    _positive("--duration", duration, most=MAX_DURATION, unit=" s")
    if requests is not None and not 1 <= requests <= MAX_REQUESTS:
        raise ConfigError(f"--requests must be at least 1, got {requests}")
    if not 0 <= warmup <= MAX_WARMUP:  # also NaN
        raise ConfigError(f"--warmup must be 0 to {MAX_WARMUP:g} s, got {warmup}")
    _positive("--starve-after", starve_after, most=MAX_DURATION, unit=" s")
    _positive("--timeout", timeout, most=MAX_DURATION, unit=" s")

    if start_at is not None:
        current = time.time() if now is None else now
        if not math.isfinite(start_at) or start_at < current - START_AT_SLACK:
            raise ConfigError(
                f"--start-at {start_at:.3f} is {current - start_at:.1f} s in the past — give a "
                "future UNIX time, e.g. $(( $(date +%s) + 5 )), or leave it out"
            )
        if start_at > current + MAX_START_AHEAD:
            raise ConfigError(
                f"--start-at is {start_at - current:.0f} s from now (most "
                f"{MAX_START_AHEAD:.0f}) — is it in seconds since the epoch, not milliseconds?"
            )

    return LoadConfig(
        host=host.strip(),
        port=port,
        workload=workload,
        per_connection=k,
        size=message_size,
        concurrency=conns,
        rate=float(rate) if rate is not None else None,
        processes=procs,
        duration=float(duration),
        requests=requests,
        warmup=float(warmup),
        start_at=start_at,
        starve_after=float(starve_after),
        timeout=float(timeout),
        mix=mix,
        keys=key_count,
        distribution=distribution,
        tag=tag,
    )
