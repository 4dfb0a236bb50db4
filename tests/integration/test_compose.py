"""compose.yaml, brought up with the installed compose tool, then driven with the ``lab`` CLI.

The project is this run's own (``labtest-<run>-<n>``), beside any lab the user runs; the CLI runs
as a subprocess with ``LAB_PROJECT`` naming it (see labcli.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from containers import SERVER_ALIAS, request_stats, wait_until
from labcli import HOST_PORT, lab, status

from lab.orchestration import compose, stack

if TYPE_CHECKING:
    import docker

CLIENTS = 3
INTRO_MESSAGES = 3
TRANSCRIPT_TIMEOUT = 60.0  # seconds for every client's intro messages to show in the logs


def expected_transcript() -> tuple[list[str], list[str]]:
    """What the server traces and what each client prints for the intro messages."""
    server, clients = [], []
    for number in range(1, CLIENTS + 1):
        for n in range(1, INTRO_MESSAGES + 1):
            message = f"Test message #{n} from client-{number}"
            server.append(f"The message from client: {message}")
            clients.append(f'client-{number} | The sent message: "{message}" successfully received')
    return server, clients


@pytest.mark.timeout(420)
def test_compose_lab_end_to_end(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    env = {
        "LAB_IMAGE": lab_image,
        "LAB_DESIGN": "iterative",
        # Pinned: the runner's environment must not change what the test expects.
        "LAB_CLIENTS": str(CLIENTS),
        "LAB_INTRO_MESSAGES": str(INTRO_MESSAGES),
        "LAB_TRACE": "1",
        # The server's port published on the host's loopback (when compose.yaml publishes it):
        # a free one, so that a lab the user runs (on 12345) is no obstacle and sees nothing.
        "LAB_HOST_PORT": str(HOST_PORT),
    }
    compose.run(["up", "-d"], env=env, project=project)
    stack.wait_healthy(docker_engine, project)

    # -- the transcript: the clients start once the server is healthy, so poll (bounded) -------
    want_server, want_clients = expected_transcript()
    lines: list[str] = []

    def complete() -> bool:
        lines[:] = stack.transcript("all", project)
        text = "\n".join(lines)
        return all(line in text for line in want_server + want_clients)

    if not wait_until(complete, TRANSCRIPT_TIMEOUT, interval=1.0):
        text = "\n".join(lines)
        missing = [line for line in want_server + want_clients if line not in text]
        pytest.fail(f"missing from the transcript: {missing}\n--- transcript ---\n{text}")
    server_lines = [line for line in lines if line.startswith("server ")]
    for want in want_server:
        assert any(want in line for line in server_lines), (want, server_lines)
    # Health probes have their own port and are never traced: only the clients' connections are.
    assert "12346" not in "\n".join(server_lines)

    # -- lab status: the design, a healthy server, every container, the live statistics --------
    report = status(project)
    assert report["project"] == project
    assert report["design"] == "iterative", report
    assert report["health"] == "healthy", report
    members = report["containers"]
    assert len(members) >= 1 + CLIENTS, members
    services = sorted(m["service"] for m in members)
    assert services == ["client"] * CLIENTS + ["server"], members
    assert all(m["state"] == "running" for m in members), members
    server = next(m for m in members if m["service"] == "server")
    assert server["hostname"] == SERVER_ALIAS, server
    stats = report["stats"]
    assert stats is not None, "no statistics: the server did not answer SIGUSR1"
    assert stats["design"] == "iterative", stats
    # Only the real connections count: 3 clients × 3 messages. The health checks (every 2 s, and
    # the server is healthy, so at least one was answered) are counted apart.
    assert stats["accepted"] == CLIENTS * INTRO_MESSAGES, stats
    assert stats["health_probes"] >= 1, stats
    assert stats["failed"] == {}, stats

    # -- lab up on a lab that is up: one line naming the fix, nothing touched ------------------
    again = lab(project, "up")
    assert again.returncode == 1, again
    assert again.stderr.count("\n") == 1 and "already up" in again.stderr, again.stderr
    assert "lab switch" in again.stderr and "Traceback" not in again.stderr + again.stdout

    # -- lab switch: only the server is recreated, with the new design ------------------------
    clients_before = {m["name"] for m in members if m["service"] == "client"}
    result = lab(project, "switch", "sendmsg")
    assert result.returncode == 0, f"lab switch failed:\n{result.stdout}{result.stderr}"
    assert "sendmsg" in result.stdout, result.stdout
    report = status(project)
    assert report["design"] == "sendmsg", report
    assert report["health"] == "healthy", report
    assert report["stats"] is not None and report["stats"]["design"] == "sendmsg", report
    clients_after = {m["name"] for m in report["containers"] if m["service"] == "client"}
    assert clients_after == clients_before, (clients_before, clients_after)

    # -- lab exec-client: client 2 reaches the new server by name ------------------------------
    result = lab(project, "exec-client", "2", "--", "lab", "client", SERVER_ALIAS, "-m", "hi")
    assert result.returncode == 0, f"exec-client failed:\n{result.stdout}{result.stderr}"
    assert '"hi" successfully received' in result.stdout, result.stdout
    server_container = stack.server_container(docker_engine, project)
    seen: list[dict[str, Any]] = []

    def counted() -> bool:
        seen[:] = [request_stats(server_container)]
        return bool(seen[0]["completed"] >= 1)

    assert wait_until(counted, 15.0, interval=0.5), seen
    assert seen[0]["design"] == "sendmsg" and seen[0]["accepted"] == 1, seen

    # -- from the host, through the published port (loopback only), when compose publishes it --
    published = (server_container.attrs["NetworkSettings"].get("Ports") or {}).get("12345/tcp")
    if published:
        assert {b["HostIp"] for b in published} == {"127.0.0.1"}, published
        assert {int(b["HostPort"]) for b in published} == {HOST_PORT}, published
        result = lab(project, "client", "127.0.0.1", "--port", str(HOST_PORT), "-m", "from host")
        assert result.returncode == 0, f"lab client from the host:\n{result.stdout}{result.stderr}"
        assert '"from host" successfully received' in result.stdout, result.stdout

    # -- lab down: nothing of the project remains ---------------------------------------------
    result = lab(project, "down")
    assert result.returncode == 0, f"lab down failed:\n{result.stdout}{result.stderr}"
    label: dict[str, str | list[str] | bool] = {"label": f"{compose.PROJECT_LABEL}={project}"}
    assert docker_engine.containers.list(all=True, filters=label) == []
    assert docker_engine.networks.list(filters=label) == []
