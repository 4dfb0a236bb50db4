"""Finding a process's cgroup in the host's cgroup file systems, and reading it: cgroup v1 (each
controller its own hierarchy, or cpu and cpuacct mounted together), v2 (unified), and hybrid
(v1 controllers beside an unified tree) — on fake trees, so every layout runs on any machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import require

from lab.measure import probe

CONTAINER = "/docker/4f1c0ffee"
SCOPE = "/system.slice/docker-4f1c0ffee.scope"


def mountinfo(*mounts: tuple[str, str, str, Path]) -> str:
    """mountinfo lines for (fstype, super options, root, mount point)."""
    lines = ["22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw"]
    for number, (fstype, options, root, point) in enumerate(mounts, start=30):
        escaped = str(point).replace(" ", "\\040")
        lines.append(
            f"{number} 22 0:{number} {root} {escaped} rw,nosuid - {fstype} {fstype} {options}"
        )
    return "\n".join(lines) + "\n"


def make(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text)
    return directory


def test_v1_with_a_hierarchy_per_controller(tmp_path: Path) -> None:
    cpuacct = make(tmp_path / "cpuacct" / CONTAINER[1:], cpuacct__usage="2500000000\n")
    memory = make(
        tmp_path / "memory" / CONTAINER[1:],
        memory__usage_in_bytes="1048576\n",
        memory__max_usage_in_bytes="4194304\n",
    )
    membership = f"4:memory:{CONTAINER}\n2:cpuacct:{CONTAINER}\n1:name=systemd:{CONTAINER}\n"
    mounts = mountinfo(
        ("cgroup", "rw,cpuacct", "/", tmp_path / "cpuacct"),
        ("cgroup", "rw,memory", "/", tmp_path / "memory"),
        ("cgroup", "rw,name=systemd", "/", tmp_path / "systemd"),
    )
    found = probe.locate_cgroup(membership, mounts)
    assert found == probe.HostCgroup(cpuacct=cpuacct, memory=memory)
    assert found.read() == probe.CgroupReading(2.5, 1048576, 4194304)


def test_v1_with_cpu_and_cpuacct_mounted_together(tmp_path: Path) -> None:
    point = tmp_path / "cpu,cpuacct"
    cpuacct = make(point / SCOPE[1:], cpuacct__usage="1000\n")
    found = probe.locate_cgroup(
        f"3:cpu,cpuacct:{SCOPE}\n", mountinfo(("cgroup", "rw,cpu,cpuacct", "/", point))
    )
    assert found.cpuacct == cpuacct and found.memory is None
    assert found.read() == probe.CgroupReading(1e-6, 0, None)  # nanoseconds; no memory here


def test_v2_unified_reads_microseconds_and_the_peak(tmp_path: Path) -> None:
    unified = make(
        tmp_path / SCOPE[1:],
        cpu__stat="usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n",
        memory__current="2097152\n",
        memory__peak="8388608\n",
    )
    found = probe.locate_cgroup(f"0::{SCOPE}\n", mountinfo(("cgroup2", "rw", "/", tmp_path)))
    assert found == probe.HostCgroup(unified=unified)
    assert found.read() == probe.CgroupReading(1.234567, 2097152, 8388608)


def test_v2_without_a_peak_counter_or_the_memory_controller(tmp_path: Path) -> None:
    unified = make(tmp_path / "c", cpu__stat="usage_usec 10\n")
    assert probe.HostCgroup(unified=unified).read() == probe.CgroupReading(1e-5, 0, None)
    (unified / "memory.current").write_text("4096\n")
    assert probe.HostCgroup(unified=unified).read() == probe.CgroupReading(1e-5, 4096, None)


def test_hybrid_takes_the_v1_controllers_and_keeps_the_unified_tree(tmp_path: Path) -> None:
    cpuacct = make(tmp_path / "cpuacct" / CONTAINER[1:], cpuacct__usage="3000000000\n")
    memory = make(tmp_path / "memory" / CONTAINER[1:], memory__usage_in_bytes="512\n")
    unified = make(tmp_path / "unified" / CONTAINER[1:], cpu__stat="usage_usec 2999999\n")
    membership = f"4:memory:{CONTAINER}\n2:cpuacct:{CONTAINER}\n0::{CONTAINER}\n"
    mounts = mountinfo(
        ("cgroup", "rw,cpuacct", "/", tmp_path / "cpuacct"),
        ("cgroup", "rw,memory", "/", tmp_path / "memory"),
        ("cgroup2", "rw", "/", tmp_path / "unified"),
    )
    found = probe.locate_cgroup(membership, mounts)
    assert found == probe.HostCgroup(cpuacct, memory, unified)
    assert found.read() == probe.CgroupReading(3.0, 512, None)  # v1's ns, not v2's µs


def test_a_mount_of_a_subtree_and_a_mount_point_with_a_space(tmp_path: Path) -> None:
    """A mount whose root is /docker shows /docker/ID at POINT/ID; spaces come escaped."""
    point = tmp_path / "cgroup v2"
    unified = make(point / "4f1c0ffee", cpu__stat="usage_usec 1\n")
    found = probe.locate_cgroup(f"0::{CONTAINER}\n", mountinfo(("cgroup2", "rw", "/docker", point)))
    assert found.unified == unified


def test_a_cgroup_outside_every_mount_is_not_found(tmp_path: Path) -> None:
    make(tmp_path / "other")
    found = probe.locate_cgroup(
        f"0::{CONTAINER}\n", mountinfo(("cgroup2", "rw", "/other", tmp_path))
    )
    assert found == probe.HostCgroup()
    with pytest.raises(FileNotFoundError):
        found.read()


def test_host_cgroup_of_this_process_reads_its_own_cpu() -> None:
    """On this machine, whatever its cgroup layout: our own cgroup, with some CPU spent."""
    try:
        found = probe.host_cgroup(os.getpid())
        reading = found.read()
    except OSError as exc:
        require(False, f"no readable cgroup CPU accounting for this process here: {exc}")
        return
    assert reading.cpu_seconds > 0


class _FakeContainer:
    """Enough of a docker SDK container: its first process is this test's own (so its cgroup
    path does not name the container), and `exec_run` answers like `cat`."""

    id = "4f1c0ffee" * 7
    name = "labtest_server_1"

    def __init__(self) -> None:
        self.attrs = {"State": {"Pid": os.getpid()}}

    def reload(self) -> None:
        pass

    def exec_run(self, argv: list[str], demux: bool = False) -> object:
        from types import SimpleNamespace

        files = {"/sys/fs/cgroup/cpu.stat": b"usage_usec 2000000\n", "/proc/net/netstat": b"x"}
        found = files.get(argv[-1])
        return SimpleNamespace(exit_code=0 if found else 1, output=found or b"")


def test_a_container_out_of_sight_is_read_by_exec_and_says_so() -> None:
    """A pid that is not the container's (another machine or PID namespace): exec, one note."""
    from lab.orchestration.readings import ContainerReader

    notes: list[str] = []
    reader = ContainerReader(_FakeContainer(), note=notes.append)  # type: ignore[arg-type]
    assert reader.source == "exec" and reader.cgroup_dirs is None
    assert len(notes) == 1 and "docker exec" in notes[0] and "labtest_server_1" in notes[0]
    assert reader.cgroup().cpu_seconds == 2.0
    assert reader.netstat() == "x"
