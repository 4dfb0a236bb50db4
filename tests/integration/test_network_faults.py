"""``lab fault delay|stall|loss|rate|partition`` on a running lab: each impairs only the chosen
client's path, says by which mechanism, is undone by ``lab fault clear`` (or its ``--for``),
and leaves nothing behind — not even when its helper was killed before it could undo, nor
after ``lab down``.

Time is only ever a lower bound here (a fault that adds 0.3 s per echo cannot take less; a
slow machine only adds to it); what a fault did is otherwise read from outside the path: the
client's own TCP retransmission count, the echo's bytes, `lab fault show`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from containers import wait_until
from labcli import lab, ok

from lab.orchestration import stack

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

pytestmark = pytest.mark.timeout(600)

# N connections to bakawali, one after another, each echoing SIZE bytes of its own (checked);
# prints the elapsed time. A socket timeout makes it fail with "timed out".
PROBE = r"""
import socket, sys, threading, time
n, timeout, size = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
started = time.monotonic()
for i in range(n):
    message = (b"%07d." % i) * (size // 8 + 1)
    message = message[:size]
    s = socket.create_connection(("bakawali", 12345), timeout=timeout)
    threading.Thread(target=s.sendall, args=(message,), daemon=True).start()
    got = bytearray()
    while len(got) < size:
        data = s.recv(65536)
        if not data:
            break
        got += data
    assert bytes(got) == message, "echo %d: %d of %d bytes, or not the same" % (i, len(got), size)
    s.close()
print("elapsed=%.3f" % (time.monotonic() - started))
"""


def client(engine: docker.DockerClient, project: str, number: int) -> Container:
    found = [
        c
        for c in stack.containers(engine, project)
        if stack.member(c).service == "client" and stack.member(c).number == number
    ]
    assert found, f"no client {number} in {project}"
    return found[0]


def probe(
    engine: docker.DockerClient,
    project: str,
    number: int,
    n: int = 1,
    timeout: float = 20,
    size: int = 49,
) -> tuple[int, str]:
    """(exit code, output) of PROBE in client ``number``."""
    result = client(engine, project, number).exec_run(
        ["python3", "-c", PROBE, str(n), str(timeout), str(size)]
    )
    return result.exit_code, result.output.decode(errors="replace")


def elapsed(output: str) -> float:
    return float(output.rsplit("elapsed=", 1)[1].split()[0])


def retransmitted(engine: docker.DockerClient, project: str, number: int) -> int:
    """The client's TCP segments retransmitted so far (its own network namespace's count)."""
    text = client(engine, project, number).exec_run(["cat", "/proc/net/snmp"]).output.decode()
    header, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(values[header.index("RetransSegs")])


def one_line_failure(result: object, *fragments: str) -> None:
    out = result.stdout + result.stderr  # type: ignore[attr-defined]
    assert result.returncode != 0 and len(out.strip().splitlines()) == 1, out  # type: ignore[attr-defined]
    assert all(f in out for f in fragments), out


@pytest.fixture(scope="module")
def up(module_project: str, lab_image: str) -> str:
    ok(lab(module_project, "up", "--design", "thread", "--clients", "3"))
    return module_project


def test_a_delay_slows_the_chosen_clients_path_and_no_other(
    up: str, docker_engine: docker.DockerClient
) -> None:
    said = ok(lab(up, "fault", "delay", "150", "--client", "1")).stdout
    assert "delay 150 ms each way on" in said and "by proxy" in said, said
    shown = ok(lab(up, "fault", "show")).stdout
    assert "client_1" in shown and "client_2" not in shown, shown
    one_line_failure(lab(up, "fault", "loss", "5", "--client", "1"), "already has a delay fault")
    code, out = probe(docker_engine, up, 1, n=3)
    assert code == 0, out
    assert elapsed(out) >= 3 * 0.3, out  # 150 ms there and 150 back, per echo: a lower bound
    code, out = probe(docker_engine, up, 2, n=3)
    assert code == 0, out
    assert "removed from" in ok(lab(up, "fault", "clear")).stdout
    assert "no fault in place" in ok(lab(up, "fault", "show")).stdout
    assert probe(docker_engine, up, 1)[0] == 0


def test_a_stalled_path_holds_the_bytes_and_delivers_them_when_cleared(
    up: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(up, "fault", "stall", "--client", "2"))
    code, out = probe(docker_engine, up, 2, timeout=1)
    assert code != 0 and "timed out" in out, out  # connected (to the proxy), no echo
    waiting: list[tuple[int, str]] = []
    thread = threading.Thread(
        target=lambda: waiting.append(probe(docker_engine, up, 2, timeout=60, size=100_000))
    )
    thread.start()
    assert wait_until(lambda: "stall" in ok(lab(up, "fault", "show")).stdout)
    ok(lab(up, "fault", "clear"))
    thread.join(90)
    assert waiting and waiting[0][0] == 0, waiting  # every byte held came through, in order


def test_loss_drops_packets_and_tcp_retransmits_every_one(
    up: str, docker_engine: docker.DockerClient
) -> None:
    before = retransmitted(docker_engine, up, 3)
    said = ok(lab(up, "fault", "loss", "5", "--client", "3")).stdout
    assert "iptables statistic" in said or "netem" in said, said
    code, out = probe(docker_engine, up, 3, n=40, timeout=60)
    ok(lab(up, "fault", "clear"))
    assert code == 0, out  # every echo whole and the same, for all the drops
    # ~6 packets per connection, 5 % dropped each way: no drop at all in 240 has p < 1e-5.
    assert retransmitted(docker_engine, up, 3) > before


def test_a_rate_limit_shapes_the_clients_sending_side(
    up: str, docker_engine: docker.DockerClient
) -> None:
    assert "tbf" in ok(lab(up, "fault", "rate", "400", "--client", "1")).stdout
    code, out = probe(docker_engine, up, 1, timeout=60, size=100_000)
    ok(lab(up, "fault", "clear"))
    assert code == 0, out
    # 100 kB at 400 kbit/s, less the 16 KiB burst the bucket starts with: at least 1.6 s.
    assert elapsed(out) >= (100_000 - 16 * 1024) * 8 / 400_000, out


def test_a_partition_cuts_one_client_until_its_time_runs_out(
    up: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(up, "fault", "delay", "1", "--client", "1", "--for", "0.5"))  # ends by itself
    assert wait_until(lambda: "no fault in place" in ok(lab(up, "fault", "show")).stdout, 30)
    said = ok(lab(up, "fault", "partition", "1", "--for", "5")).stdout
    assert "undone by itself after 5 s" in said and "iptables" in said, said
    code, out = probe(docker_engine, up, 1, timeout=1)
    assert code != 0 and "timed out" in out, out  # the SYN is dropped: it hangs, as on a cut
    assert probe(docker_engine, up, 2)[0] == 0
    assert wait_until(lambda: "no fault in place" in ok(lab(up, "fault", "show")).stdout, 60)
    assert probe(docker_engine, up, 1)[0] == 0
    # An ended fault's helper stays behind, exited, as its record, until the next fault on
    # that client takes its place (the delay's went when the partition came) or a clear.
    helpers = stack.fault_helpers(docker_engine, up)
    assert [h.labels["org.lab.fault"] for h in helpers] == ["partition"], helpers


def test_clear_sweeps_the_rules_a_killed_helper_left(
    up: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(up, "fault", "partition", "2"))
    (helper,) = [h for h in stack.fault_helpers(docker_engine, up) if h.status == "running"]
    helper.kill()  # it cannot undo now: its DROP rules stay in client 2's namespace
    assert probe(docker_engine, up, 2, timeout=1)[0] != 0
    assert "its rules swept" in ok(lab(up, "fault", "clear")).stdout
    assert probe(docker_engine, up, 2)[0] == 0
    assert stack.fault_helpers(docker_engine, up) == []


def test_a_fault_names_a_client_that_exists(up: str) -> None:
    one_line_failure(lab(up, "fault", "delay", "10", "--client", "9"), "no client 9", "1, 2, 3")


def test_lab_down_takes_the_faults_with_it(up: str, docker_engine: docker.DockerClient) -> None:
    said = ok(lab(up, "fault", "delay", "10")).stdout
    assert said.count("⇄ server") == 3, said  # every client, by default
    ok(lab(up, "down"))
    assert stack.fault_helpers(docker_engine, up) == []
    assert stack.containers(docker_engine, up) == []
