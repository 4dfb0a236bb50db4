"""Driving ``compose.yaml`` with whichever compose tool is installed.

``docker compose`` (v2, a docker CLI plugin) and ``docker-compose`` (1.29, Python) read the same
file the same way here; 1.29 rejects a top-level ``name:``, so the project name is always given
with ``-p``. Containers are found afterwards by the labels both versions set
(``com.docker.compose.project``, ``…service``, ``…container-number``), never by name: v1 names
them ``lab_server_1`` and v2 ``lab-server-1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from lab.orchestration.engine import PROJECT, LabError, engine_has_migrate_req, repo_root
from lab.sockets.config import OPTIONS, env_name

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"


@functools.cache
def tool() -> tuple[str, ...]:
    """The compose command line prefix: ``docker compose`` if the plugin works, else
    ``docker-compose``."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    raise LabError(
        "no compose tool found: install Docker's compose plugin or docker-compose "
        "(Debian: apt-get install docker-compose)"
    )


#: compose.yaml's server reads its options from the file this variable names (``env_file``),
#: so every ``lab serve`` option reaches the container as LAB_<NAME> — a new option too, with
#: no line added to compose.yaml. Unset, compose reads an empty file kept in the repository.
SERVER_ENV = "LAB_SERVER_ENV"
SERVER_OPTION_VARS = frozenset(env_name(option.name) for option in OPTIONS)


@contextlib.contextmanager
def server_env_file(env: Mapping[str, str]) -> Iterator[str]:
    """A file of the server options set in ``env`` (LAB_<NAME>=value lines), for as long as
    compose runs; the user's own LAB_SERVER_ENV file comes first when there is one."""
    lines = []
    own = env.get(SERVER_ENV)
    if own:
        try:
            with open(own, encoding="utf-8") as file:
                lines.append(file.read().rstrip("\n"))
        except OSError as exc:
            raise LabError(
                f"{SERVER_ENV}={own}: cannot read it ({exc.strerror}): fix the path"
            ) from None
    for name in sorted(SERVER_OPTION_VARS & env.keys()):
        value = env[name]
        if "\n" in value:
            raise LabError(f"{name}: a value on one line, please (it has a newline)")
        lines.append(f"{name}={value}")
    with tempfile.NamedTemporaryFile("w", prefix="lab-server-", suffix=".env") as file:
        file.write("\n".join(lines) + "\n")
        file.flush()
        yield file.name


def version() -> str:
    result = subprocess.run([*tool(), "version"], capture_output=True, text=True, check=False)
    return (result.stdout.splitlines() or ["?"])[0].strip()


#: The server's net.ipv4.tcp_migrate_req=1, in a file of its own: added only when the engine's
#: kernel has that sysctl (Linux 5.14), since Docker refuses to start a container with one it
#: does not know.
MIGRATE_REQ_FILE = "images/compose.migrate-req.yaml"


def files(root: Path) -> list[str]:
    """``-f`` options: compose.yaml, and the tcp_migrate_req override where the kernel has it."""
    chosen = ["-f", str(root / "compose.yaml")]
    if engine_has_migrate_req():
        chosen += ["-f", str(root / MIGRATE_REQ_FILE)]
    return chosen


def run(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    project: str = PROJECT,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``compose -p PROJECT -f compose.yaml ARGS``; raises LabError with compose's own last
    error line when it fails."""
    root = repo_root()
    command = [*tool(), "-p", project, *files(root), *args]
    full_env = {**os.environ, **(env or {})}
    with server_env_file(full_env) as path:
        result = subprocess.run(
            command,
            cwd=root,
            env={**full_env, SERVER_ENV: path},
            capture_output=capture,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise LabError(explain_failure(result.stderr or result.stdout or ""))
    return result


def explain_failure(output: str) -> str:
    """compose's error output → one line naming the fix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else "compose failed"
    text = output.lower()
    if "port is already allocated" in text or "address already in use" in text:
        return (
            "a host port the lab publishes is already in use: stop what holds it, or set "
            "LAB_HOST_PORT to a free port"
        )
    if "no such image" in text or "pull access denied" in text or "not found: manifest" in text:
        return "the lab image is missing: run `lab up` (it builds it) or `make images`"
    if "permission denied" in text and "docker.sock" in text:
        return "no permission to use the Docker engine: run as root or join the docker group"
    return f"compose failed: {last}"
