"""``lab fault`` on a running lab: a killed worker is replaced and the lab serves on; a paused
server answers no one until `lab fault clear` (or `--for` runs out), `lab fault show` sees it,
and `lab down` removes a paused lab too; the faults that do not apply say so in one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from containers import wait_until
from labcli import lab, ok, status

from lab.orchestration import faults, stack

if TYPE_CHECKING:
    import docker


def exchange(project: str, *extra: str) -> int:
    """One echo from client 1 to bakawali: `lab client`'s exit code."""
    result = lab(project, "exec-client", "1", "--", "lab", "client", "bakawali", "-m", "hi", *extra)
    return result.returncode


def one_line_failure(result: object, *fragments: str) -> None:
    out = result.stdout + result.stderr  # type: ignore[attr-defined]
    assert result.returncode != 0 and len(out.strip().splitlines()) == 1, out  # type: ignore[attr-defined]
    assert all(f in out for f in fragments), out


@pytest.mark.timeout(600)
def test_a_killed_worker_is_replaced_and_the_lab_serves_on(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(project, "up", "--design", "multi-accept", "--clients", "1"))
    server = stack.server_container(docker_engine, project)
    before = faults.workers(server)
    assert len(before) >= 2, before
    killed = ok(lab(project, "fault", "kill-worker"))
    pid = int(killed.stdout.split("worker ")[1].split()[0])
    assert pid in before and "nothing to undo" in killed.stdout

    def replaced() -> bool:
        now = faults.workers(server)
        return pid not in now and len(now) == len(before)

    assert wait_until(replaced, 30), faults.workers(server)
    assert exchange(project) == 0
    one_line_failure(lab(project, "fault", "kill-worker", "--signal", "HUP"), "KILL, TERM, SEGV")

    ok(lab(project, "switch", "select"))
    one_line_failure(lab(project, "fault", "kill-worker"), "serves in one process", "multi-accept")


@pytest.mark.timeout(600)
def test_a_paused_server_answers_no_one_until_cleared(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(project, "up", "--design", "thread", "--clients", "1"))
    assert "no fault in place" in ok(lab(project, "fault", "show")).stdout
    assert "undo with `lab fault clear`" in ok(lab(project, "fault", "pause")).stdout
    assert "pause:" in ok(lab(project, "fault", "show")).stdout
    assert exchange(project, "--timeout", "1") == 4  # connected (the kernel answers), no echo
    one_line_failure(lab(project, "fault", "kill-worker"), "paused", "lab fault clear")
    assert "resumed" in ok(lab(project, "fault", "clear")).stdout
    assert exchange(project) == 0
    assert "nothing to undo" in ok(lab(project, "fault", "clear")).stdout

    assert "resumed" in ok(lab(project, "fault", "pause", "--for", "1")).stdout
    assert stack.server_container(docker_engine, project).status == "running"
    assert status(project)["health"] in ("healthy", "starting")

    ok(lab(project, "fault", "pause"))  # left in place: `lab down` removes it all the same
    ok(lab(project, "down"))
    assert stack.containers(docker_engine, project) == []


HOLD = "import socket, time; s = socket.create_connection(('bakawali', 12345)); time.sleep(60)"


@pytest.mark.timeout(900)
def test_kill_worker_works_on_every_design_that_has_workers(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(project, "up", "--design", faults.WORKER_DESIGNS[0], "--clients", "1"))
    (client,) = [c for c in stack.containers(docker_engine, project) if c.name.endswith("_1")][-1:]
    for design in faults.WORKER_DESIGNS:
        ok(lab(project, "switch", design))
        # A design with a process per connection has a worker only while a connection is open.
        client.exec_run(["python3", "-c", HOLD], detach=True)
        server = stack.server_container(docker_engine, project)
        assert wait_until(lambda s=server: bool(faults.workers(s)), 30), design
        killed = ok(lab(project, "fault", "kill-worker")).stdout
        assert f"of {design}" in killed, killed
        # The held connection has done its part (a worker to kill). Let it go before checking
        # service: reuseport hashes each new connection to one worker's socket whoever is busy,
        # and one in two would queue behind the worker still holding it for its 60 s.
        client.exec_run(["pkill", "-f", "time.sleep"])
        # It serves on — once its master has replaced the worker: a connection that came in
        # the meantime may have met the dying one (reuseport hashes it to that worker's socket).
        assert wait_until(lambda: exchange(project) == 0, 30), design
