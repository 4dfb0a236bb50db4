"""The kv service in the containers: the database on the lab's data volume outlives a switch of
design and a `lab down` (not `lab down --volumes`); the clients reach it with `lab client --kv`;
a kv bench with INCRs from every client container loses no update, read back through the
server and from the file; and a server that loses updates fails the check there too."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from containers import bench_backend
from labcli import lab, ok, status

from lab.measure.bench import ServerSpec, bench
from lab.measure.config import make_config
from lab.orchestration import compose, stack
from lab.orchestration.bench import DockerBackend
from lab.sockets.designs import DESIGNS

if TYPE_CHECKING:
    import docker

TESTS = Path(__file__).resolve().parents[1]  # holds user_kv.py, mounted into the container


def volumes_of(engine: docker.DockerClient, project: str) -> list[str]:
    label = {"label": f"{compose.PROJECT_LABEL}={project}"}
    return [v.name for v in engine.volumes.list(filters=label)]


def kv(project: str, *commands: str) -> list[str]:
    """`lab client --kv COMMANDS` in client 1 (its LAB_SERVER names bakawali): the replies."""
    result = ok(lab(project, "exec-client", "1", "--", "lab", "client", "--kv", *commands))
    return result.stdout.splitlines()


@pytest.mark.timeout(900)
def test_the_data_volume_keeps_the_keys_across_switch_and_down_until_down_volumes(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    up = ok(lab(project, "up", "--design", "thread-pool", "--service", "kv", "--clients", "1",
                "--transcript"))  # fmt: skip
    # The client's introduction speaks kv: three GETs answered at once (an echo would have
    # waited for its timeout), nothing failed, and nothing written to the database.
    said = 'The kv command "GET intro:client-1" successfully received its reply: NOT_FOUND'
    assert up.stdout.count(said) == 3 and "failed" not in up.stdout, up.stdout
    assert kv(project, "INCR hits", "SET who thread-pool", "SCAN intro") == ["1", "OK", ""]
    ok(lab(project, "switch", "fork"))  # the service is kept, the data too
    assert status(project)["design"] == "fork"
    assert kv(project, "INCR hits", "GET who") == ["2", "thread-pool"]
    assert f"{project}_{stack.DATA_VOLUME}" in volumes_of(docker_engine, project)

    down = ok(lab(project, "down"))
    assert "data volume is kept" in down.stdout
    assert volumes_of(docker_engine, project) == [f"{project}_{stack.DATA_VOLUME}"]
    ok(lab(project, "up", "--design", "select", "--service", "kv", "--clients", "1"))
    assert kv(project, "GET hits") == ["2"]

    ok(lab(project, "down", "--volumes"))
    assert volumes_of(docker_engine, project) == []
    ok(lab(project, "up", "--design", "select", "--service", "kv", "--clients", "1"))
    assert kv(project, "GET hits") == ["NOT_FOUND"]  # a new volume: a new database


@pytest.fixture(scope="module")
def backend(
    module_project: str, lab_image: str, docker_engine: docker.DockerClient
) -> Iterator[DockerBackend]:
    """One lab (3 clients: INCRs on the same counters from three containers at once)."""
    with bench_backend(docker_engine, module_project, clients=3) as backend:
        yield backend


def kv_load() -> object:
    return make_config(
        "127.0.0.1",
        port=1,
        workload="kv",
        mix="get=40,set=10,incr=50",
        keys=20,
        concurrency=6,
        per_connection=50,
        duration=0.8,
        warmup=0.2,
    )


def one_design_per_kind() -> list[str]:
    """The first design of each (family, pool) kind in the registry: each way of holding the
    database — a process or a program per connection, a pool of processes or of threads, an
    event loop, one connection at a time — once in the containers. Every design is checked on
    loopback (tests/test_kv_load.py); here what is checked is the data volume, three client
    containers at once and the file read in the server's container, the same for a kind."""
    kinds: dict[tuple[str, str | None], str] = {}
    for name, design in DESIGNS.items():
        kinds.setdefault((design.family, design.pool_of), name)
    return list(kinds.values())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("design", one_design_per_kind())
def test_incrs_from_every_client_container_are_all_stored(
    backend: DockerBackend, design: str
) -> None:
    """A design of each kind, in the server container on the data volume, under concurrent
    INCRs on the same counters from three client containers."""
    spec = ServerSpec(design, ("--workers", "2") if DESIGNS[design].pool_of else ())
    result = bench(backend, spec, kv_load()).to_dict()  # type: ignore[arg-type]
    load, verdict = result["load"], result["kv_check"]
    # Every one of the three client containers loaded (each with at least one process).
    assert load["parts"] >= 3 and load["requests"] > 0 and load["errors_total"] == 0, load["errors"]
    assert verdict["ok"], (verdict["examples"], verdict["sources"], load["loader"])
    for source in ("server", "file"):  # through bakawali from a client; the file in the server
        assert verdict["sources"][source] == {
            "stored": verdict["acknowledged"],
            "lost": 0,
            "extra": 0,
        }, verdict


@pytest.mark.timeout(600)
def test_a_server_that_loses_updates_fails_the_check_in_the_containers(
    backend: DockerBackend,
) -> None:
    words = ["python3", str(TESTS / "user_kv.py"), "{port}", "--host", "{host}", "--lose", "5"]
    spec = ServerSpec("lossy", command=shlex.join(words), mounts=(str(TESTS),))
    verdict = bench(backend, spec, kv_load()).to_dict()["kv_check"]  # type: ignore[arg-type]
    assert not verdict["ok"] and verdict["sources"]["server"]["lost"] > 0, verdict
    assert "file" not in verdict["sources"]  # a user's server: its own storage, not ours
