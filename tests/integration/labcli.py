"""The ``lab`` command as a user runs it, on a compose project of this test run.

The CLI runs as a subprocess with ``LAB_PROJECT`` naming the project (the CLI reads it at import
time) and ``LAB_HOST_PORT`` a free loopback port, so a lab the user runs (on 12345) is no
obstacle and sees nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

CLI_TIMEOUT = 180.0  # seconds any one `lab` command may take (switch waits for health: ≤ 90 s)


def lab_command() -> str:
    """The venv's ``lab`` script (beside this interpreter), else the one on PATH."""
    beside = Path(sys.executable).with_name("lab")
    found = str(beside) if beside.is_file() else shutil.which("lab")
    assert found, "no `lab` command: install the project (make venv)"
    return found


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def free_loopback_port() -> int:
    """A port nothing listens on now, for the server's published port (not the user's 12345),
    taken *below* the kernel's ephemeral range: the loopback tests beside these (make test runs
    two workers) open thousands of connections from ephemeral ports and bind servers on them,
    and one of them may take a port chosen by bind(0) before compose publishes it — or be
    DNATed to the container by Docker's rule for it."""
    low = _ephemeral_low()
    first = 20000 if low > 21000 else 1025
    start = random.randrange(first, low)
    for port in [*range(start, low), *range(first, start)]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


HOST_PORT = free_loopback_port()


def lab_env(project: str) -> dict[str, str]:
    return {**os.environ, "LAB_PROJECT": project, "LAB_HOST_PORT": str(HOST_PORT)}


def lab(project: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``lab ARGS`` as a user runs it, on ``project`` (and its own host port: `lab switch`
    recreates the server, which publishes it again)."""
    return subprocess.run(
        [lab_command(), *args],
        env=lab_env(project),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """The command succeeded (else: fail showing everything it printed)."""
    assert result.returncode == 0, (
        f"{' '.join(result.args[1:])} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result


def status(project: str) -> dict[str, Any]:
    result = ok(lab(project, "status", "--json"))
    report: dict[str, Any] = json.loads(result.stdout)
    return report
