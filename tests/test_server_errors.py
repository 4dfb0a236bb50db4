"""Every error a user can cause when starting a server: one line on stderr that names the fix,
the documented exit code (2: a bad option, 3: cannot bind), and never a traceback.

Each case runs both ways a user starts a server: ``python -m lab.sockets …`` and the console
script ``lab serve …`` (which validates, then execs the former). Loopback only: the one
foreign address, 192.0.2.1 (TEST-NET-1), fails in bind() before any packet could be sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import ALL_DESIGNS

EXIT_USAGE = 2
EXIT_BIND = 3
GUARD = 30.0  # a bound against a server that starts instead of failing; not a timing check


def lab_script() -> str:
    beside = Path(sys.executable).with_name("lab")
    if beside.exists():
        return str(beside)
    found = shutil.which("lab")
    assert found, "the `lab` console script is not installed (pip install -e .)"
    return found


RUNNERS = {
    "python-m": [sys.executable, "-m", "lab.sockets"],
    "lab-serve": [lab_script(), "serve"],
}


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    lines: list[str] = field(default_factory=list)


def run(runner: str, *args: str, env: dict[str, str] | None = None) -> Outcome:
    """Run to completion in its own session; whatever it started dies with it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LAB_")}
    proc = subprocess.Popen(
        [*RUNNERS[runner], *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**environ, **(env or {})},
    )
    try:
        stdout, stderr = proc.communicate(timeout=GUARD)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Outcome(proc.returncode, stdout, stderr, stderr.splitlines())


def assert_one_error_line(result: Outcome, code: int, *fragments: str) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.code == code, (result.code, result.stdout, result.stderr)
    assert len(result.lines) == 1, result.stderr
    line = result.lines[0]
    assert line.startswith("lab serve: error:"), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert result.stdout.strip() == "", result.stdout  # no ready line, nothing half-started
    return line


LOOPBACK = ("--host", "127.0.0.1", "--port", "0")

# id → (arguments after LOOPBACK, environment, exit code, fragments the line must contain)
USAGE_ERRORS: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
    "workers-zero": (["--design", "multi-accept", "--workers", "0"], {}, ["--workers 0", "1 to"]),
    "workers-not-a-number": (["--workers", "abc"], {}, ["--workers", "'abc'", "int"]),
    "port-out-of-range": (["--port", "70000"], {}, ["--port 70000", "65535"]),
    "grace-negative": (["--grace", "-1"], {}, ["--grace", "0 or more"]),
    "idle-timeout-zero": (["--idle-timeout", "0"], {}, ["--idle-timeout", "above 0"]),
    "backlog-zero": (["--backlog", "0"], {}, ["--backlog 0", "at least 1"]),
    "env-workers-not-a-number": ([], {"LAB_WORKERS": "abc"}, ["LAB_WORKERS", "'abc'"]),
    "connections-with-multi-accept": (
        ["--design", "multi-accept", "--connections", "2"],
        {},
        ["--connections", "multi-accept"],
    ),
    "worker-cmd-with-fork": (
        ["--design", "fork", "--worker-cmd", "cat"],
        {},
        ["--worker-cmd", "--design spawn"],
    ),
    "worker-cmd-not-on-path": (
        ["--design", "spawn", "--worker-cmd", "no-such-program-lab-test -x"],
        {},
        ["no-such-program-lab-test", "PATH"],
    ),
    "unknown-option": (["--bogus"], {}, ["--bogus", "--help"]),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_bad_option_is_one_line_naming_the_fix_exit_2(runner: str, case: str) -> None:
    args, env, fragments = USAGE_ERRORS[case]
    result = run(runner, *LOOPBACK, *args, env=env)
    assert_one_error_line(result, EXIT_USAGE, *fragments)


@pytest.mark.parametrize("runner", RUNNERS)
def test_unknown_design_lists_the_valid_ones_exit_2(runner: str) -> None:
    result = run(runner, *LOOPBACK, "--design", "no-such-design")
    line = assert_one_error_line(result, EXIT_USAGE, "'no-such-design'")
    for design in ALL_DESIGNS:
        assert design in line


@pytest.mark.parametrize("runner", RUNNERS)
def test_unknown_design_from_the_environment_exit_2(runner: str) -> None:
    result = run(runner, *LOOPBACK, env={"LAB_DESIGN": "no-such-design"})
    assert_one_error_line(result, EXIT_USAGE, "'no-such-design'", *ALL_DESIGNS)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other socket is listening on (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


@pytest.mark.parametrize("design", ["iterative", "multi-accept", "reuseport"])  # bind paths
@pytest.mark.parametrize("runner", RUNNERS)
def test_port_in_use_says_so_and_names_port_option_exit_3(
    runner: str, design: str, busy_port: int
) -> None:
    result = run(runner, "--design", design, "--host", "127.0.0.1", "--port", str(busy_port))
    assert_one_error_line(result, EXIT_BIND, "in use", "--port", str(busy_port))


@pytest.mark.parametrize("runner", RUNNERS)
def test_host_not_of_this_machine_exit_3(runner: str) -> None:
    # TEST-NET-1 is on no interface here: bind() fails with EADDRNOTAVAIL; nothing is sent.
    result = run(runner, "--host", "192.0.2.1", "--port", "0")
    assert_one_error_line(result, EXIT_BIND, "192.0.2.1", "0.0.0.0")


@pytest.mark.parametrize("runner", RUNNERS)
def test_help_lists_options_and_their_environment_variables(runner: str) -> None:
    result = run(runner, "--help")
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    for text in ("--design", "LAB_DESIGN", "--port", "LAB_PORT", "--grace", "LAB_GRACE"):
        assert text in result.stdout


@pytest.mark.parametrize("design", ALL_DESIGNS)
def test_an_accept_lock_the_design_does_not_declare_is_refused_exit_2(design: str) -> None:
    """No design ignores --accept-lock: a value it does not declare is a one-line error."""
    from lab.sockets.designs import DESIGNS

    taken = DESIGNS[design].accept_locks
    foreign = next(lock for lock in ("flock", "mutex", "sem") if lock not in taken)
    result = run("python-m", *LOOPBACK, "--design", design, "--accept-lock", foreign)
    line = assert_one_error_line(result, EXIT_USAGE, f"--accept-lock {foreign}", design)
    assert "none" in line
