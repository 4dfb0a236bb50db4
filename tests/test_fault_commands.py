"""``lab fault`` without Docker: which processes are a server's workers, which designs have
any, and the mistakes that need no lab to be told apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lab.cli.app import app
from lab.orchestration import faults
from lab.sockets.designs import DESIGNS

PS = b"""    1     0 /sbin/docker-init -- lab serve
    7     1 /opt/lab/bin/python3 /opt/lab/bin/lab serve
    8     7 /opt/lab/bin/python3 /opt/lab/bin/lab serve
    9     7 /opt/lab/bin/python3 /opt/lab/bin/lab serve
   20     0 bash -c exec 3<>/dev/tcp/127.0.0.1/12346
   21     0 ps -e -o pid=,ppid=,args=
"""


class FakeServer:
    def exec_run(self, argv: list[str], demux: bool = False) -> SimpleNamespace:
        assert argv[0] == "ps"
        return SimpleNamespace(exit_code=0, output=PS)


def test_the_workers_are_the_children_of_lab_serve_not_the_health_checks() -> None:
    assert faults.workers(FakeServer()) == [8, 9]  # type: ignore[arg-type]


def test_kill_worker_applies_to_the_designs_that_serve_in_worker_processes() -> None:
    expected = {n for n, d in DESIGNS.items() if d.pool_of == "processes" or d.family == "fork"}
    assert set(faults.WORKER_DESIGNS) == expected
    assert {"fork", "multi-accept", "sendmsg"} <= expected
    assert not {"iterative", "select", "thread", "asyncio"} & expected


def test_fault_options_are_checked_before_any_lab_is_needed() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["fault", "pause", "--for", "0"])
    assert out.exit_code == 2
    out = runner.invoke(app, ["fault", "bogus"])
    assert out.exit_code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["delay", "10", "--jitter", "20"],  # jitter above the delay
        ["delay", "0"],
        ["delay", "10", "--client", "0"],
        ["loss", "0"],
        ["loss", "101"],
        ["rate", "1"],
        ["partition", "0"],
        ["partition"],  # which client
        ["stall", "--for", "0"],
    ],
)
def test_network_fault_options_are_refused_before_any_lab_is_needed(argv: list[str]) -> None:
    out = CliRunner().invoke(app, ["fault", *argv])
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output


def test_every_network_fault_is_a_command() -> None:
    out = CliRunner().invoke(app, ["fault", "--help"])
    assert all(kind in out.output for kind in faults.NETWORK_FAULTS), out.output
