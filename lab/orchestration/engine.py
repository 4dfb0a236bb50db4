"""Reaching the Docker engine, and what every object the lab makes carries.

Every image, container and network the lab creates has the label ``org.lab.managed=true``, so
``lab down`` and the test sweeps can find and remove exactly the lab's own and nothing else.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker

MANAGED_LABEL = "org.lab.managed"
LABELS = {MANAGED_LABEL: "true"}
# The compose project name (also COMPOSE_PROJECT_NAME in .env); LAB_PROJECT runs a second lab
# beside the first (the tests do).
PROJECT = os.environ.get("LAB_PROJECT") or "lab"


class LabError(Exception):
    """Something the user can fix: the message is one line naming the fix."""


def repo_root() -> Path:
    """The checkout the lab runs from (compose.yaml and images/ live there)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "compose.yaml").is_file() or not (root / "images").is_dir():
        raise LabError(
            f"compose.yaml and images/ not found beside the package ({root}): run lab from a "
            "checkout of the project (make venv installs it there)"
        )
    return root


def client() -> docker.DockerClient:
    """A docker SDK client, or a LabError saying why the engine cannot be reached."""
    import docker
    from docker.errors import DockerException

    try:
        engine = docker.from_env(timeout=120)
        engine.ping()
    except DockerException as exc:
        text = str(exc)
        if "Permission denied" in text or "PermissionError" in text:
            raise LabError(
                "no permission to use the Docker engine: add yourself to the docker group "
                "(sudo usermod -aG docker $USER, then log in again) or run as root"
            ) from None
        raise LabError(
            "cannot reach the Docker engine: is it running (systemctl start docker) and is "
            "DOCKER_HOST right? The lab needs a Linux host with Docker"
        ) from None
    return engine


#: net.ipv4.tcp_migrate_req came with Linux 5.14; Docker refuses to start a container whose
#: sysctls the kernel does not have, so the lab sets it only where the engine's kernel has it.
MIGRATE_REQ_KERNEL = (5, 14)


def has_migrate_req(kernel_version: str) -> bool:
    """Whether a kernel of this version (``uname -r``, as ``docker info`` reports it) has
    ``net.ipv4.tcp_migrate_req``; an unreadable version counts as old (the safe side)."""
    match = re.match(r"(\d+)\.(\d+)", kernel_version)
    return match is not None and (int(match[1]), int(match[2])) >= MIGRATE_REQ_KERNEL


@functools.cache
def engine_has_migrate_req() -> bool:
    """Whether the Docker engine's kernel (the containers' kernel, not necessarily this
    machine's) has ``net.ipv4.tcp_migrate_req``."""
    return has_migrate_req(str(client().info().get("KernelVersion", "")))
