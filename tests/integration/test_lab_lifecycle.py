"""Every command leaves the lab in a state the next one accepts: a bench (or a compare) puts back
what ran before it, `lab down` removes all of the project (a peer a bench left included), and
`lab up` starts the lab from whatever half of one it finds.

Driven through the ``lab`` CLI as a user drives it, on this run's own compose projects.
"""

from __future__ import annotations

import signal
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from containers import SERVER_ALIAS, wait_until
from labcli import HOST_PORT, lab, lab_command, lab_env, ok, status

from lab.measure.bench import ServerSpec
from lab.measure.compare import Matrix, compare
from lab.orchestration import compose, stack
from lab.orchestration.bench import DockerBackend
from lab.orchestration.engine import LabError

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

PEER_START_TIMEOUT = 120.0  # seconds for a bench to have its peer serving (it may start the lab)


def project_objects(engine: docker.DockerClient, project: str) -> list[str]:
    """Every container and network carrying the project's label."""
    label: dict[str, str | list[str] | bool] = {"label": f"{compose.PROJECT_LABEL}={project}"}
    return [f"container {c.name}" for c in engine.containers.list(all=True, filters=label)] + [
        f"network {n.name}" for n in engine.networks.list(filters=label)
    ]


def server_of(engine: docker.DockerClient, project: str) -> Container:
    server = stack.find_server(engine, project)
    assert server is not None, f"no server container in {project}"
    return server


def assert_whole(report: dict[str, Any], design: str, clients: int) -> None:
    """The lab as `lab up` leaves it: a healthy server of ``design``, the clients, nothing else."""
    assert report["design"] == design and report["health"] == "healthy", report
    services = sorted(m["service"] for m in report["containers"])
    assert services == ["client"] * clients + ["server"], report["containers"]
    assert all(m["state"] == "running" for m in report["containers"]), report["containers"]


def kill_a_bench_of_a_peer(project: str, engine: docker.DockerClient) -> None:
    """`lab bench` of a peer, SIGKILLed while its peer serves: what a bench cut short leaves (the
    peer running in the server's place, the compose server stopped)."""
    bench = subprocess.Popen(
        [lab_command(), "bench", "--design", "peer-threading", "--duration", "60"],
        env=lab_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def peer_serving() -> bool:
            peers = [c for c in stack.containers(engine, project) if stack.foreign(c)]
            return bool(peers) and b"ready design=" in peers[0].logs()

        assert wait_until(peer_serving, PEER_START_TIMEOUT, interval=0.5), "no peer started"
    finally:
        bench.send_signal(signal.SIGKILL)
        bench.wait(30)


@pytest.mark.timeout(600)
def test_a_bench_of_a_peer_leaves_the_lab_as_it_found_it(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    """The issue's session: `lab up`, `lab bench --design peer-threading`, `lab down`."""
    ok(lab(project, "up", "--design", "fork", "--clients", "2"))
    before = server_of(docker_engine, project)
    settings = stack.server_settings(before)
    clients = {m["name"] for m in status(project)["containers"] if m["service"] == "client"}

    bench = ok(lab(project, "bench", "--design", "peer-threading", "--duration", "1", "--json"))
    assert "could not put the lab back" not in bench.stderr, bench.stderr

    # The design that ran before is back, healthy, made as it was (trace on, the same host
    # port); the clients are the same containers; the peer is gone.
    report = status(project)
    assert_whole(report, "fork", clients=2)
    assert {m["name"] for m in report["containers"] if m["service"] == "client"} == clients
    after = server_of(docker_engine, project)
    assert stack.server_settings(after) == settings
    assert settings["LAB_TRACE"] == "1" and settings["LAB_HOST_PORT"] == str(HOST_PORT)

    result = ok(lab(project, "down"))
    assert "removed 3 container(s)" in result.stdout, result.stdout
    assert project_objects(docker_engine, project) == []
    assert docker_engine.images.get(lab_image)  # images are not the lab's to remove


@pytest.mark.timeout(600)
def test_lab_down_removes_the_peer_a_killed_bench_left_and_the_network(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(project, "up", "--clients", "1"))
    kill_a_bench_of_a_peer(project, docker_engine)
    left = project_objects(docker_engine, project)
    assert any("peer" in name for name in left), left

    result = ok(lab(project, "down"))
    assert "removed 3 container(s)" in result.stdout, result.stdout  # server, client, peer
    assert project_objects(docker_engine, project) == []
    assert docker_engine.images.get(lab_image)


@pytest.mark.timeout(900)
def test_lab_up_starts_the_lab_from_whatever_half_of_one_it_finds(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    """Never "start it with `lab up`" from `lab up` itself: half a lab is cleared, then up."""
    ok(lab(project, "up", "--clients", "1"))

    def up_from(state: str) -> None:
        result = lab(project, "up", "--clients", "1")
        assert result.returncode == 0, f"lab up on {state}:\n{result.stdout}{result.stderr}"
        assert "lab up" not in result.stderr, result.stderr
        assert_whole(status(project), "iterative", clients=1)

    # A bench killed while its peer served: the peer running, the compose server exited.
    kill_a_bench_of_a_peer(project, docker_engine)
    up_from("a killed bench's peer and a stopped server")

    # What a `lab down` that failed on the peer's endpoint used to leave: the peer alone.
    kill_a_bench_of_a_peer(project, docker_engine)
    for container in stack.containers(docker_engine, project):
        if not stack.foreign(container):
            container.remove(force=True)
    up_from("a peer alone")

    # The server exited (stopped by hand, or it crashed), the client still running.
    server_of(docker_engine, project).stop(timeout=0)
    up_from("an exited server")


@pytest.mark.timeout(600)
def test_a_peer_joins_only_labnet_and_a_failed_restore_says_what_it_left(
    project: str,
    lab_image: str,
    docker_engine: docker.DockerClient,
    capfd: pytest.CaptureFixture[str],
) -> None:
    ok(lab(project, "up", "--clients", "1"))
    backend = DockerBackend(project=project, clients=1)
    backend.start(ServerSpec("peer-threading"))
    assert backend.peer is not None
    backend.peer.reload()
    networks = backend.peer.attrs["NetworkSettings"]["Networks"]
    assert set(networks) == {f"{project}_labnet"}, set(networks)  # not Docker's default bridge
    assert SERVER_ALIAS in (networks[f"{project}_labnet"]["Aliases"] or [])
    result = ok(lab(project, "exec-client", "1", "--", "lab", "client", SERVER_ALIAS, "-m", "hi"))
    assert '"hi" successfully received' in result.stdout, result.stdout

    # Putting the server back fails (here: on purpose): one line says what is left, and how
    # to put it right; the peer is gone all the same.
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise LabError("the engine said no")

    capfd.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stack, "switch", refuse)
        backend.close()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "could not put the lab back" in lines[0] and "the engine said no" in lines[0]
    assert "server exited, 1 client(s) running" in lines[0] and "lab switch iterative" in lines[0]
    assert not [c for c in stack.containers(docker_engine, project) if stack.foreign(c)]

    # … and the next command accepts that state.
    ok(lab(project, "up", "--clients", "1"))
    assert_whole(status(project), "iterative", clients=1)


@pytest.mark.timeout(600)
def test_a_compare_puts_back_the_design_that_ran_before_it(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(project, "up", "--design", "sendmsg", "--clients", "1"))
    ok(lab(project, "switch", "multi-accept"))  # the design now is not the one `up` started
    settings = stack.server_settings(server_of(docker_engine, project))
    matrix = Matrix(
        ["peer-threading", "fork"],
        workloads=["connect-per-request"],
        concurrency=[1],
        repeats=1,
        duration=0.3,
        warmup=0.1,
    )
    results = compare(lambda: DockerBackend(project=project, clients=1), matrix)
    assert [run.get("error") for run in results["runs"]] == [None, None], results["runs"]
    assert_whole(status(project), "multi-accept", clients=1)
    assert stack.server_settings(server_of(docker_engine, project)) == settings


@pytest.mark.timeout(600)
def test_a_bench_on_no_lab_removes_the_lab_it_started(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    result = lab(project, "bench", "--design", "fork", "--duration", "0.5", "--concurrency", "1")
    assert project_objects(docker_engine, project) == []  # whether the bench succeeded or not
    ok(result)
