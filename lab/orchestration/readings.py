"""What a container costs, read without entering it.

A bench samples the server's memory ten times a second and reads its CPU and listen-queue
overflows around every run. Read inside the container (``docker exec … cat``), every reading is a
process in the server's cgroup: runc's and cat's CPU are charged to the server — about 20 ms a
reading on the machine this was written on, far more than an idle server spends. From the host
the same numbers cost the server nothing: its cgroup's files in the host's cgroup file systems
(found from its first process, ``State.Pid``, and ``/proc/PID/cgroup``) and its network
namespace's counters in ``/proc/PID/net/netstat``.

That needs the engine's processes in sight: the same machine and PID namespace, as with a local
engine. Otherwise (a remote ``DOCKER_HOST``, ``lab`` itself in a container, no permission) the
reader falls back to exec, and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lab.measure import probe

if TYPE_CHECKING:
    from docker.models.containers import Container

HOST = "host"
EXEC = "exec"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class _OutOfSight(Exception):
    """The container's processes are not this machine's to read."""


class ContainerReader:
    """A container's cgroup reading (CPU, memory) and its network namespace's netstat, from the
    host when it can (``source == "host"``), else by exec (``"exec"``, with a note)."""

    def __init__(self, container: Container, note: Callable[[str], None] = _stderr) -> None:
        self.container = container
        self.source = HOST
        self.why = ""  # why not from the host
        self.cgroup_dirs: probe.HostCgroup | None = None  # its cgroup in the host's file systems
        self._pid = 0
        try:
            self._pid, self.cgroup_dirs = self._locate(container)
        except (OSError, ValueError, _OutOfSight) as exc:
            self.source, self.why = EXEC, str(exc) or type(exc).__name__
            note(
                f"note: reading {container.name}'s cgroup with `docker exec` ({self.why}): "
                "each reading's CPU is charged to it, so its CPU figures are high"
            )

    @staticmethod
    def _locate(container: Container) -> tuple[int, probe.HostCgroup]:
        container.reload()
        pid = int(container.attrs.get("State", {}).get("Pid") or 0)
        if pid <= 0:
            raise _OutOfSight("it is not running")
        membership = Path(f"/proc/{pid}/cgroup").read_text()
        # The engine's pid means this machine's process only if we share its PID namespace:
        # the process's cgroup path names the container (/docker/ID, docker-ID.scope) if so.
        if container.id is None or container.id not in membership:
            raise _OutOfSight("its processes are not in sight: another machine or PID namespace")
        cgroup = probe.locate_cgroup(membership, Path("/proc/self/mountinfo").read_text())
        cgroup.read()  # readable now, or OSError
        Path(f"/proc/{pid}/net/netstat").read_text()
        return pid, cgroup

    def cgroup(self) -> probe.CgroupReading:
        if self.cgroup_dirs is not None:
            return self.cgroup_dirs.read()
        return probe.read_cgroup(self.exec_read)

    def netstat(self) -> str:
        """``/proc/net/netstat`` of the container's network namespace."""
        if self.cgroup_dirs is not None:
            return Path(f"/proc/{self._pid}/net/netstat").read_text()
        return self.exec_read("/proc/net/netstat") or ""

    def net_file(self, name: str) -> str | None:
        """``/proc/net/NAME`` of the container's network namespace (tcp, tcp6 …), or None."""
        if self.cgroup_dirs is not None:
            try:
                return Path(f"/proc/{self._pid}/net/{name}").read_text()
            except FileNotFoundError:
                return None
        return self.exec_read(f"/proc/net/{name}")

    def exec_read(self, path: str) -> str | None:
        """``cat PATH`` inside the container (the fallback; a process it pays for)."""
        result = self.container.exec_run(["cat", path], demux=False)
        output = result.output
        if result.exit_code != 0 or not isinstance(output, bytes):
            return None
        return output.decode()
