"""The lab on a single-node Docker Swarm, driven through the ``lab`` CLI as a user drives it: deploy
as a stack (the server's port published in host mode, ``--publish``); the original client's
exchange from a client task to ``bakawali`` (seen by ``lab logs -f --swarm`` as it happens) and
one from the host; ``lab switch`` to another design; a short ``lab bench --swarm`` and
``lab compare --swarm``; faults (a client partitioned, the server paused); teardown with nothing
left.

The swarm is the test's own when the engine is in none (``docker swarm init`` on loopback, left
again at the end); an engine that already manages one is used as it is and left so.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from labcli import HOST_PORT, lab, lab_command, lab_env, ok

from lab.orchestration import swarm

if TYPE_CHECKING:
    import docker

pytestmark = pytest.mark.timeout(600)


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def a_swarm(docker_engine: docker.DockerClient) -> Iterator[None]:
    """A swarm this engine manages, for the module; the engine's swarm state is as found after."""
    state = (docker_engine.info().get("Swarm") or {}).get("LocalNodeState")
    if state == "active" and not swarm.is_manager(docker_engine):
        pytest.fail("this engine is a swarm worker: run the tests on a manager", pytrace=False)
    ours = state != "active"
    if ours:
        init = _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        assert init.returncode == 0, init.stderr
    try:
        yield
    finally:
        if ours:
            _docker("swarm", "leave", "--force")
            after = (docker_engine.info().get("Swarm") or {}).get("LocalNodeState")
            assert after == "inactive", f"the swarm this test made is still {after}"


def stack_objects(engine: docker.DockerClient, project: str) -> list[str]:
    """Every service, container, network and volume of the project's stack."""
    label: dict[str, str | list[str] | bool] = {"label": f"{swarm.STACK_LABEL}={project}"}
    found = [f"service {s.name}" for s in engine.services.list(filters=label)]
    found += [f"container {c.name}" for c in engine.containers.list(all=True, filters=label)]
    found += [f"network {n.name}" for n in engine.networks.list(filters=label)]
    return found + [f"volume {v.name}" for v in engine.volumes.list(filters=label)]


@pytest.fixture
def on_swarm(
    a_swarm: None, compose_project: str, lab_image: str, docker_engine: docker.DockerClient
) -> Iterator[str]:
    """A project of this run to deploy on the swarm; whatever the test did, its stack goes."""
    try:
        yield compose_project
    finally:
        if stack_objects(docker_engine, compose_project):
            lab(compose_project, "down", "--swarm", "--volumes")
            _docker("stack", "rm", compose_project)


def swarm_status(project: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(ok(lab(project, "status", "--swarm", "--json")).stdout)
    return report


def test_the_lab_deploys_on_a_swarm_follows_switches_benches_compares_and_leaves_nothing(
    on_swarm: str, docker_engine: docker.DockerClient, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    project = on_swarm
    ok(lab(project, "up", "--swarm", "--clients", "2", "--design", "thread", "--publish"))
    report = swarm_status(project)
    assert report["design"] == "thread" and report["health"] == "healthy", report
    tasks = {t["task"]: t for t in report["swarm"]["tasks"]}
    assert set(tasks) == {f"{project}_server.1", f"{project}_client.1", f"{project}_client.2"}
    assert all(t["state"] == "running" for t in tasks.values()), tasks
    own = next(n for n in report["swarm"]["nodes"] if n["self"])
    assert {t["node"] for t in tasks.values()} == {own["hostname"]}  # one node: all here
    assert sorted(m["hostname"] for m in report["containers"]) == [
        "bakawali",
        "client-1",
        "client-2",
    ]
    # A second `lab up` (either kind) is refused while the stack is deployed.
    again = lab(project, "up")
    assert again.returncode != 0 and "already up on the swarm" in again.stderr, again.stderr

    # `lab logs -f --swarm` follows the server task's log (docker service logs --follow): the
    # exchange below shows up in it while it runs, and it ends when the user stops it.
    follow = subprocess.Popen(
        [lab_command(), "logs", "-f", "--swarm", "server"],
        env=lab_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    followed: list[str] = []
    seen = threading.Event()

    def read_follow() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            followed.append(line)
            if "The message from client: over the swarm" in line:
                seen.set()

    reader = threading.Thread(target=read_follow, daemon=True)
    reader.start()

    # The original exchange, from a client task to bakawali over the overlay network (dnsrr).
    exchange = ok(
        lab(
            project,
            "exec-client",
            "--swarm",
            "2",
            "--",
            "lab",
            "client",
            "bakawali",
            "--message",
            "over the swarm",
        )
    )
    assert 'The sent message: "over the swarm" successfully received' in exchange.stdout
    try:
        assert seen.wait(60), "".join(followed[-40:]) or "`lab logs -f --swarm` printed nothing"
        assert follow.poll() is None, "`lab logs -f` ended by itself: it should follow"
    finally:
        follow.terminate()
        follow.wait(30)
    reader.join(30)
    # --publish: the server's port on this node, in host mode (no routing mesh), from the host.
    here = ok(lab(project, "client", "127.0.0.1", "-p", str(HOST_PORT), "-m", "from the host"))
    assert 'The sent message: "from the host" successfully received' in here.stdout
    # ... and the server's own trace says it got it (the server task's log, not the client's).
    trace = ok(lab(project, "logs", "--swarm", "server")).stdout
    assert "The message from client: over the swarm" in trace, trace[-2000:]

    # lab switch: a rolling update of the server service; the clients' tasks stay.
    clients_before = {m["name"] for m in report["containers"] if m["service"] == "client"}
    ok(lab(project, "switch", "--swarm", "fork"))
    switched = swarm_status(project)
    assert switched["design"] == "fork" and switched["health"] == "healthy", switched
    assert {m["name"] for m in switched["containers"] if m["service"] == "client"} == clients_before
    exchange = ok(
        lab(
            project,
            "exec-client",
            "1",
            "--",
            "lab",
            "client",
            "bakawali",
            "--message",
            "after the switch",
        )
    )
    assert "successfully received" in exchange.stdout

    # A short bench from every client task; the server's own count of what it served is the
    # independent figure (it served the warm-up too, so at least as many).
    bench = ok(
        lab(
            project,
            "bench",
            "--swarm",
            "--design",
            "select",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--concurrency",
            "4",
            "--json",
        )
    )
    result = json.loads(bench.stdout)
    load = result["load"]
    assert load["errors_total"] == 0 and load["requests"] > 0, load
    assert result["server"]["stats"]["completed"] >= load["requests"], result["server"]
    assert result["swarm"]["tasks"].count(f"{project}_client.") == 2, result["swarm"]
    # ... and the bench put back the design it found.
    assert swarm_status(project)["design"] == "fork"

    # A short compare on the swarm: every design's run measured from the client tasks, the
    # server's count as the independent figure again, and the design it found put back.
    ok(
        lab(
            project,
            "compare",
            "--swarm",
            "--designs",
            "select,fork",
            "--workload",
            "connect-per-request",
            "--concurrency",
            "2",
            "--repeats",
            "1",
            "--duration",
            "0.5",
            "--out",
            str(results),
        )
    )
    (results_json,) = results.glob("*/results.json")
    runs = json.loads(results_json.read_text())["runs"]
    assert [(r["design"], r.get("error")) for r in runs] == [("select", None), ("fork", None)]
    for run in runs:
        load = run["load"]
        assert load["errors_total"] == 0 and load["requests"] > 0, load
        assert run["server"]["stats"]["completed"] >= load["requests"], run["server"]
    report = (results_json.parent / "report.md").read_text()
    assert f"{project}_client.2 on" in report  # where each task ran, in the environment
    assert swarm_status(project)["design"] == "fork"

    # Faults act through the engine of each container's node: a partition cuts client 1 only
    # (its exchange fails, client 2's does not) until `lab fault clear`; a pause on Swarm says
    # that Swarm replaces a server paused too long, and one for a second is resumed.
    members = swarm_status(project)["containers"]
    client_1 = next(m["name"] for m in members if m["service"] == "client" and m["number"] == 1)
    ok(lab(project, "fault", "partition", "1"))
    assert f"partition: {client_1}" in ok(lab(project, "fault", "show")).stdout
    cut = lab(project, "exec-client", "1", "--", "lab", "client", "bakawali", "-m", "x",
              "--timeout", "1")  # fmt: skip
    assert cut.returncode != 0, cut.stdout
    exchange = ok(lab(project, "exec-client", "2", "--", "lab", "client", "bakawali", "-m", "y"))
    assert "successfully received" in exchange.stdout
    assert f"partition removed from {client_1}" in ok(lab(project, "fault", "clear")).stdout
    exchange = ok(lab(project, "exec-client", "1", "--", "lab", "client", "bakawali", "-m", "z"))
    assert "successfully received" in exchange.stdout
    paused = ok(lab(project, "fault", "pause")).stdout
    assert "Swarm replaces the task" in paused, paused
    assert "resumed" in ok(lab(project, "fault", "clear")).stdout
    assert "resumed" in ok(lab(project, "fault", "pause", "--for", "1")).stdout
    assert "no fault in place" in ok(lab(project, "fault", "show")).stdout

    # Teardown: the stack, its network and (with --volumes) its data volume; then nothing.
    ok(lab(project, "down", "--swarm", "--volumes"))
    assert stack_objects(docker_engine, project) == []
    gone = lab(project, "status", "--swarm")
    assert gone.returncode != 0 and "not up on the swarm" in gone.stderr
    assert ok(lab(project, "down", "--swarm")).returncode == 0  # again: nothing to do
