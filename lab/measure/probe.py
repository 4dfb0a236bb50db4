"""What a server costs, read from outside it: CPU time, memory, listen-queue overflows, and the
change in its own statistics over a run.

Two sources of CPU and memory, one answer each:

* a local server: its process tree in ``/proc``. CPU is user + system time of every live process
  of the tree *plus* the children's time the kernel added to a parent when it reaped them
  (``cutime``/``cstime``) — so fork/spawn children that already ended still count, and children
  still running count too. Memory is the tree's summed RSS, sampled (there is no peak counter for
  a set of processes);
* a container: its cgroup. v2 has ``cpu.stat`` (``usage_usec``) and ``memory.current`` (and on
  newer kernels ``memory.peak``); v1 has ``cpuacct.usage`` (ns) and ``memory.usage_in_bytes``
  with ``memory.max_usage_in_bytes`` as its peak. Where no peak counter exists, sample.
  Read from the host (:func:`host_cgroup`) — from inside, by ``docker exec``, only when the host's
  copy is out of reach (:func:`read_cgroup`), since each exec is a process the container pays for.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

ReadFile = Callable[[str], str | None]  # path → contents, or None when it does not exist

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- a local process tree -------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # from field 3 (state) on


def process_tree(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def children_of(parent: int) -> list[int]:
    """The live processes whose parent is ``parent``, oldest first (by their start time: pids
    wrap around)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == parent and fields[0] != "Z":
                found.append((int(fields[19]), int(entry)))  # starttime is field 22
    return [pid for _, pid in sorted(found)]


def tree_descriptors(root: int) -> int:
    """Open descriptors of the tree, summed (a process gone meanwhile counts none)."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def zombies(root: int) -> int:
    """Processes of the tree that ended and were not reaped."""
    return sum(1 for pid in process_tree(root) if (_stat_fields(pid) or ["?"])[0] == "Z")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of the tree, reaped children included (see the module docstring)."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:  # utime, stime, cutime, cstime are fields 14–17
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / _CLOCK_TICKS


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[21]) * _PAGE_SIZE  # rss, in pages: field 24
    return total


# -- a container's cgroup -------------------------------------------------------------------------
@dataclass(frozen=True)
class CgroupReading:
    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int | None  # None: this cgroup keeps no peak; sample memory_bytes


def read_cgroup(read: ReadFile, root: str = "/sys/fs/cgroup") -> CgroupReading:
    """The container's own cgroup as seen from inside it (v2 unified, or v1 controllers)."""
    v2_cpu = read(f"{root}/cpu.stat")
    if v2_cpu is not None:
        usage = _keyed(v2_cpu).get("usage_usec", 0)
        current = int((read(f"{root}/memory.current") or "0").strip() or 0)
        peak = read(f"{root}/memory.peak")
        return CgroupReading(usage / 1e6, current, int(peak) if peak and peak.strip() else None)
    v1_cpu = read(f"{root}/cpuacct/cpuacct.usage")
    if v1_cpu is None:
        raise FileNotFoundError("no cgroup v1 or v2 CPU accounting found under " + root)
    current = int((read(f"{root}/memory/memory.usage_in_bytes") or "0").strip() or 0)
    peak = read(f"{root}/memory/memory.max_usage_in_bytes")
    return CgroupReading(int(v1_cpu) / 1e9, current, int(peak) if peak and peak.strip() else None)


def _keyed(text: str) -> dict[str, int]:
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


# -- a container's cgroup, read from the host ---------------------------------------------------
# Reading the files inside the container means a process in it (`docker exec … cat`), and that
# process's CPU is the container's: sampling memory ten times a second that way costs the server
# more than it spends idle. The same files are in the host's cgroup file systems, and reading them
# there charges nothing to the container.
@dataclass(frozen=True)
class HostCgroup:
    """Where one process's cgroup lives in this host's cgroup file systems: the directories of
    the v1 ``cpuacct`` and ``memory`` controllers, and the v2 (unified) one — whichever exist (a
    "hybrid" host has both: the controllers in v1, an unified tree beside them)."""

    cpuacct: Path | None = None
    memory: Path | None = None
    unified: Path | None = None

    def read(self) -> CgroupReading:
        """CPU from the controller that counts it, in nanoseconds (v1 ``cpuacct.usage``) or
        microseconds (v2 ``cpu.stat`` usage_usec) — never the 10 ms ticks of ``cpuacct.stat``;
        memory from v1's memory controller if it is there, else v2's. OSError when unreadable."""
        if self.cpuacct is not None and (self.cpuacct / "cpuacct.usage").exists():
            cpu = int((self.cpuacct / "cpuacct.usage").read_text()) / 1e9
        elif self.unified is not None:
            cpu = _keyed((self.unified / "cpu.stat").read_text()).get("usage_usec", 0) / 1e6
        else:
            raise FileNotFoundError("no cgroup v1 cpuacct or v2 cpu.stat for this process")
        if self.memory is not None:
            current, peak = self.memory / "memory.usage_in_bytes", "memory.max_usage_in_bytes"
        elif self.unified is not None and (self.unified / "memory.current").exists():
            current, peak = self.unified / "memory.current", "memory.peak"
        else:
            return CgroupReading(cpu, 0, None)  # no memory accounting for it (v2, controller off)
        highest = local_file(str(current.parent / peak))
        return CgroupReading(
            cpu, int(current.read_text()), int(highest) if highest and highest.strip() else None
        )


def host_cgroup(pid: int, proc: Path = Path("/proc")) -> HostCgroup:
    """The cgroup of process ``pid`` (as ``/proc/PID/cgroup`` names it), found in the cgroup
    file systems this process sees mounted (``/proc/self/mountinfo``). OSError if unreadable."""
    membership = (proc / str(pid) / "cgroup").read_text()
    return locate_cgroup(membership, (proc / "self" / "mountinfo").read_text())


def locate_cgroup(membership: str, mountinfo: str) -> HostCgroup:
    """``/proc/PID/cgroup`` (``ID:CONTROLLERS:PATH`` lines; v2's is ``0::PATH``) and a mountinfo
    → the directories of that cgroup. A hierarchy's path is relative to the root of the mount
    that shows it (``/`` on a host; deeper for a bind mount of a subtree)."""
    mounts = _cgroup_mounts(mountinfo)
    found: dict[str, Path] = {}
    for line in membership.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not number.isdigit() or not path.startswith("/"):
            continue
        if number == "0" and not controllers:
            wanted: list[tuple[str, str]] = [("unified", "cgroup2")]
        else:
            names = set(controllers.split(","))
            wanted = [(name, "cgroup") for name in ("cpuacct", "memory") if name in names]
        for key, fstype in wanted:
            for kind, options, root, point in mounts:
                if kind != fstype or (fstype == "cgroup" and key not in options):
                    continue
                inside = _below(path, root)
                if inside is not None and (point / inside).is_dir():
                    found.setdefault(key, point / inside)
                    break
    return HostCgroup(found.get("cpuacct"), found.get("memory"), found.get("unified"))


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, set[str], str, Path]]:
    """(fstype, super options, root, mount point) of every cgroup/cgroup2 mount."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()  # fstype, source, super options
        if len(after) >= 3 and after[0] in ("cgroup", "cgroup2"):
            options = set(after[2].split(","))
            mounts.append((after[0], options, _unescape(fields[3]), Path(_unescape(fields[4]))))
    return mounts


def _unescape(field: str) -> str:
    r"""mountinfo writes a space, tab, newline and backslash as \040, \011, \012, \134."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _below(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` ("" for root itself), or None if it is not under it."""
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    return path[len(root) + 1 :] if path.startswith(root.rstrip("/") + "/") else None


# -- the kernel's listen-queue overflows ----------------------------------------------------------
def listen_overflows(netstat: str) -> int:
    """``TcpExt: ListenOverflows`` from /proc/net/netstat (per network namespace): SYNs or
    completed handshakes dropped because a listen queue was full."""
    lines = netstat.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            table = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


# -- the kernel's connection-tracking table ------------------------------------------------------
@dataclass(frozen=True)
class Conntrack:
    """One network namespace's connection-tracking table (netfilter's ``nf_conntrack``).

    Where a firewall or Docker's NAT loaded it, the kernel tracks *every* TCP connection —
    loopback too — and keeps each entry for ``nf_conntrack_tcp_timeout_time_wait`` (120 s) after
    the connection closed. A bench opens tens of thousands of connections a second, so it can
    fill the table (``nf_conntrack_max``) within seconds; then the kernel drops new connections'
    SYNs ("nf_conntrack: table full, dropping packet" in its log). The client retransmits its SYN
    after 1 s, 3 s, 7 s: the run measures the firewall's table, not the design — a throughput
    near 0 and connect delays that look like listen-queue overflows but are not counted as such.
    ``drops`` (the table's own counter) tells such a run apart."""

    entries: int  # connections tracked now
    limit: int  # nf_conntrack_max: past it, new connections are dropped
    drops: int  # packets dropped because the table was full, since boot

    @property
    def room(self) -> int:
        return self.limit - self.entries


def conntrack(stat: str | None, limit: str | None) -> Conntrack | None:
    """The table from ``/proc/net/stat/nf_conntrack`` (a header, then one row of hexadecimal
    counters per CPU; ``entries`` is the namespace's count, on every row) and
    ``/proc/sys/net/netfilter/nf_conntrack_max``; None where nothing tracks connections."""
    lines = (stat or "").split("\n")
    header = lines[0].split()
    rows = [line.split() for line in lines[1:] if line.strip()]
    if "entries" not in header or "drop" not in header or not rows or not (limit or "").strip():
        return None
    entries, drop = header.index("entries"), header.index("drop")
    return Conntrack(
        entries=int(rows[0][entries], 16),
        limit=int(str(limit).strip()),
        drops=sum(int(row[drop], 16) for row in rows),
    )


def local_conntrack() -> Conntrack | None:
    """This network namespace's table (None where nothing tracks connections)."""
    return conntrack(local_file("/proc/net/stat/nf_conntrack"), local_file(CONNTRACK_MAX))


CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


# -- the server's own statistics ------------------------------------------------------------------
def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two statistics lines of one server: counters subtracted, failure
    reasons and per-worker connection counts subtracted key by key."""
    delta: dict[str, Any] = {"design": after.get("design")}
    for key in ("accepted", "completed", "shed", "bytes_in", "bytes_out", "health_probes"):
        delta[key] = int(after.get(key, 0)) - int(before.get(key, 0))
    for key in ("failed", "per_worker"):
        change = Counter(after.get(key) or {})
        change.subtract(before.get(key) or {})
        delta[key] = {k: v for k, v in sorted(change.items()) if v}
    delta["workers_alive"] = after.get("workers_alive")
    return delta


# -- sampling in the background -----------------------------------------------------------------
class Periodic:
    """Inside a ``with``: :meth:`tick` every ``interval`` seconds in a daemon thread — first at
    once — and, when ``bracket``, once more on exit (so the readings span the whole block)."""

    interval: float = 0.1
    bracket: bool = False

    def tick(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        if self.bracket:
            self.tick()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.bracket:
            self.tick()

    def _run(self) -> None:
        if not self.bracket:
            self.tick()
        while not self._stop.wait(self.interval):
            self.tick()


class Sampler(Periodic):
    """Calls ``measure`` every ``interval`` seconds in a thread; keeps the peak and the mean
    (memory, where there is no peak counter)."""

    def __init__(self, measure: Callable[[], int], interval: float = 0.1) -> None:
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self.samples: list[int] = []

    def tick(self) -> None:
        try:
            value = self.measure()
        except (OSError, ValueError):
            value = 0
        self.samples.append(value)
        self.peak = max(self.peak, value)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


def local_file(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None
