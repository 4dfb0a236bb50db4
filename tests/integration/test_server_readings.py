"""The server's CPU, memory and listen-queue counters, read from the host: reading them costs the
server nothing, and they agree with what its own container shows.

The server here is a peer (``peer-threading``, in the server's place as a bench puts it): it has
no health check, so an idle one spends next to nothing and any CPU the readings cost would show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from labcli import free_loopback_port

from lab.measure import probe
from lab.measure.bench import ServerSpec
from lab.orchestration.bench import DockerBackend

SAMPLING_WINDOW = 3.0  # seconds of idle memory sampling, ten samples a second
# CPU seconds the server may spend over that window, readings included. An idle peer wakes twice
# a second (its selector's timeout): microseconds. Thirty readings by `docker exec` cost it about
# 0.7 s on the machine this was written on.
IDLE_CPU_BOUND = 0.05
MEMORY_SLACK = 8 * 2**20  # bytes: `cat` and runc, in the container while it reads its files


@pytest.fixture(scope="module")
def idle_peer(module_project: str, lab_image: str) -> Iterator[DockerBackend]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAB_HOST_PORT", str(free_loopback_port()))  # not the user's 12345
        backend = DockerBackend(project=module_project, clients=1)
        try:
            backend.start(ServerSpec("peer-threading"))
            yield backend
        finally:
            backend.close()


def in_container(backend: DockerBackend, *argv: str) -> str:
    code, output = backend.reader().container.exec_run(list(argv))
    assert code == 0, output
    return bytes(output).decode()


@pytest.mark.timeout(600)
def test_sampling_an_idle_server_costs_it_no_cpu(idle_peer: DockerBackend) -> None:
    assert idle_peer.reader().source == "host", idle_peer.reader().why
    cpu_before = idle_peer.cpu_seconds()
    with probe.Sampler(idle_peer.memory_bytes) as memory:
        time.sleep(SAMPLING_WINDOW)
    overflows = idle_peer.listen_overflows()
    cpu = idle_peer.cpu_seconds() - cpu_before
    assert len(memory.samples) >= 20 and min(memory.samples) > 0, memory.samples
    assert overflows == 0
    assert cpu < IDLE_CPU_BOUND, f"{len(memory.samples)} readings cost the server {cpu:.3f} s"


@pytest.mark.timeout(600)
def test_the_host_readings_agree_with_the_containers_own_files(idle_peer: DockerBackend) -> None:
    reader = idle_peer.reader()
    assert reader.source == "host", reader.why
    v2 = in_container(idle_peer, "sh", "-c", "test -f /sys/fs/cgroup/cpu.stat && echo yes || :")
    if v2.strip():  # unified: the container's own cgroup at /sys/fs/cgroup (private namespace)
        cpu_argv = ["cat", "/sys/fs/cgroup/cpu.stat"]
        memory_path = "/sys/fs/cgroup/memory.current"

        def cpu_of(text: str) -> float:
            return probe._keyed(text)["usage_usec"] / 1e6

    else:  # v1: each controller's hierarchy shows the container's own cgroup
        cpu_argv = ["cat", "/sys/fs/cgroup/cpuacct/cpuacct.usage"]
        memory_path = "/sys/fs/cgroup/memory/memory.usage_in_bytes"

        def cpu_of(text: str) -> float:
            return int(text) / 1e9

    # CPU is a counter: the container's own figure, read by an exec between two host readings,
    # lies between them (the exec's own CPU counts by the second).
    first = idle_peer.cpu_seconds()
    inside = cpu_of(in_container(idle_peer, *cpu_argv))
    second = idle_peer.cpu_seconds()
    assert first <= inside <= second, (first, inside, second)

    host_memory = idle_peer.memory_bytes()
    inside_memory = int(in_container(idle_peer, "cat", memory_path))
    assert abs(inside_memory - host_memory) <= MEMORY_SLACK, (host_memory, inside_memory)

    # The network namespace's counters: the same file, not the host's own.
    assert reader.netstat() == in_container(idle_peer, "cat", "/proc/net/netstat")

    # A hybrid host has the unified tree too: its cpu.stat (µs) counts what cpuacct (ns) does.
    cgroup = reader.cgroup_dirs
    assert cgroup is not None
    if cgroup.cpuacct is not None and cgroup.unified is not None:
        v1_before = cgroup.read().cpu_seconds
        unified = probe.HostCgroup(unified=cgroup.unified).read().cpu_seconds
        v1_after = cgroup.read().cpu_seconds
        assert v1_before - 1e-3 <= unified <= v1_after + 1e-3, (v1_before, unified, v1_after)
