"""A tiny containerised bench: the server in its container, load from every client container
at one start time, the cost read from the server's cgroup — every field present."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from containers import remove_project
from labcli import free_loopback_port

from lab.measure.bench import ServerSpec, bench
from lab.measure.config import make_config
from lab.orchestration import compose, stack
from lab.orchestration.bench import DockerBackend
from lab.orchestration.engine import LabError

if TYPE_CHECKING:
    import docker


@pytest.fixture
def bench_project(
    compose_project: str, lab_image: str, docker_engine: object, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.setenv("LAB_HOST_PORT", str(free_loopback_port()))  # not the user's 12345
    try:
        yield compose_project
    finally:
        with contextlib.suppress(LabError):
            compose.run(["down", "--remove-orphans", "--timeout", "0"], project=compose_project)
        remove_project(docker_engine, compose_project)  # type: ignore[arg-type]


def cat_execs(engine: docker.DockerClient, project: str, since: float) -> list[str]:
    """The `cat …` processes run in the project's containers since then: how the old backend
    read the server's cgroup (each one's CPU charged to the server)."""
    events = engine.events(
        since=int(since),
        until=int(time.time()) + 1,
        filters={"event": "exec_create", "label": f"{compose.PROJECT_LABEL}={project}"},
        decode=True,
    )
    return [e["Action"] for e in events if "exec_create: cat " in e.get("Action", "")]


@pytest.mark.timeout(600)
def test_containerised_bench_merges_every_client_and_reads_the_cgroup(bench_project: str) -> None:
    backend = DockerBackend(project=bench_project, clients=2, pin=True)
    config = make_config("bakawali", concurrency=4, duration=1.0, warmup=0.3, processes=1)
    spec = ServerSpec("multi-accept", ("--workers", "2"))
    began = time.time()
    result = bench(backend, spec, config).to_dict()

    load, server = result["load"], result["server"]
    assert result["backend"] == "docker" and result["design"] == "multi-accept"
    assert load["parts"] == 2  # one result per client container, merged
    assert load["requests"] > 0 and load["errors_total"] == 0
    assert load["latency_us"]["p99"] > 0 and load["histogram"]
    assert server["cpu_s"] > 0 and server["cpu_s_per_1000"] > 0
    assert server["memory_peak_bytes"] > 0
    stats = server["stats"]
    assert stats["design"] == "multi-accept" and stats["failed"] == {}
    assert len(stats["per_worker"]) == 2
    assert sum(stats["per_worker"].values()) == stats["completed"] >= load["requests"]
    # the health probes are counted apart, never as connections
    assert stats["health_probes"] >= 0
    # --pin: the server's container on core 0, the loaders' on core 1
    pinned = {
        c.labels["com.docker.compose.service"]: c.attrs["HostConfig"]["CpusetCpus"]
        for c in stack.containers(backend.engine, bench_project)
    }
    assert pinned == {"server": "0", "client": "1"}
    # the server's cgroup and netstat are read from the host: no process of ours in it
    assert backend.reader().source == "host", backend.reader().why
    assert cat_execs(backend.engine, bench_project, began) == []
    backend.close()  # the bench started the lab: it goes
    assert stack.containers(backend.engine, bench_project) == []


@pytest.mark.timeout(600)
def test_containerised_bench_runs_a_peer_in_the_servers_place_and_restores_it(
    bench_project: str,
) -> None:
    backend = DockerBackend(project=bench_project, clients=2)
    config = make_config("bakawali", concurrency=2, duration=0.5, warmup=0.2, processes=1)
    peer = bench(backend, ServerSpec("peer-threading"), config).to_dict()
    assert peer["design"] == "peer-threading" and peer["load"]["requests"] > 0
    assert peer["load"]["errors_total"] == 0 and peer["server"]["cpu_s_per_1000"] > 0
    assert peer["server"]["stats"] == {}  # a peer keeps no statistics of ours
    design = bench(backend, ServerSpec("fork"), config).to_dict()  # a design takes over …
    assert backend.peer is None  # … the peer's container is gone
    assert design["server"]["stats"]["design"] == "fork"
    assert design["load"]["errors_total"] == 0
    again = bench(backend, ServerSpec("fork"), config).to_dict()  # the same: reused, not
    assert again["server"]["stats"]["accepted"] > 0  # restarted (its counters go on)
    backend.close()
    assert stack.containers(backend.engine, bench_project) == []  # the bench started the lab
