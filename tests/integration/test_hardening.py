"""Every container of the lab — the server, the clients, and a peer a bench puts in the server's
place — runs hardened: as the unprivileged user, with no capability, a read-only root and a
tmpfs /tmp, no way to gain privileges, bounded processes and memory, and ports published on
loopback only. Read from the running containers, as `docker inspect` shows them. The one listed
exception, a network fault's helper (root, with NET_ADMIN alone), is held to just that and
checked to be gone after use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from labcli import lab, ok

from lab.measure.bench import ServerSpec
from lab.orchestration import stack
from lab.orchestration.bench import DockerBackend

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

UID = "10001"  # the image's user, lab


def problems(container: Container) -> list[str]:
    """What is not hardened about ``container`` (nothing: an empty list)."""
    host: dict[str, Any] = container.attrs["HostConfig"]
    found = []
    uid = container.exec_run(["id", "-u"]).output.decode().strip()
    if uid != UID:
        found.append(f"runs as uid {uid}, not {UID}")
    if host.get("Privileged"):
        found.append("privileged")
    if [c.upper() for c in host.get("CapDrop") or []] != ["ALL"] or host.get("CapAdd"):
        found.append(f"capabilities: drop {host.get('CapDrop')}, add {host.get('CapAdd')}")
    if not host.get("ReadonlyRootfs"):
        found.append("a writable root filesystem")
    if "/tmp" not in (host.get("Tmpfs") or {}):
        found.append("no tmpfs /tmp")
    if not any(o.startswith("no-new-privileges") for o in host.get("SecurityOpt") or []):
        found.append("no no-new-privileges")
    if not (host.get("PidsLimit") or 0) > 0:
        found.append("no pids limit")
    if not (host.get("Memory") or 0) > 0:
        found.append("no memory limit")
    for port, bindings in (host.get("PortBindings") or {}).items():
        for binding in bindings or []:
            if binding.get("HostIp") != "127.0.0.1":
                found.append(f"{port} published on {binding.get('HostIp') or 'every address'}")
    # The root really is read-only, and /tmp writable (what the flags promise, tried).
    if container.exec_run(["touch", "/etc/lab-probe"]).exit_code == 0:
        found.append("could write /etc")
    if container.exec_run(["touch", "/tmp/lab-probe"]).exit_code != 0:
        found.append("could not write /tmp")
    return found


@pytest.mark.timeout(600)
def test_every_container_of_the_lab_is_hardened(
    project: str, lab_image: str, docker_engine: docker.DockerClient
) -> None:
    ok(lab(project, "up", "--design", "multi-accept", "--clients", "2"))
    found = {c.name: problems(c) for c in stack.containers(docker_engine, project)}
    assert len(found) == 3 and not any(found.values()), found
    # The server alone writes its data volume (the kv database), as its own user.
    server = stack.server_container(docker_engine, project)
    assert server.exec_run(["touch", f"{stack.DATA_DIR}/probe"]).exit_code == 0

    # The listed exception: a network fault's helper is root in a client's network namespace,
    # with NET_ADMIN (iptables, tc) as its only capability, otherwise as bounded as the rest;
    # and it is gone once the fault is cleared.
    ok(lab(project, "fault", "delay", "5", "--client", "1"))
    (helper,) = stack.fault_helpers(docker_engine, project)
    host = helper.attrs["HostConfig"]
    assert helper.exec_run(["id", "-u"]).output.decode().strip() == "0"
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_ADMIN"], host
    assert not host.get("Privileged") and host.get("ReadonlyRootfs"), host
    assert any(o.startswith("no-new-privileges") for o in host.get("SecurityOpt") or []), host
    assert host.get("PidsLimit", 0) > 0 and host.get("Memory", 0) > 0, host
    assert host["NetworkMode"].startswith("container:") and not host.get("PortBindings"), host
    ok(lab(project, "fault", "clear"))
    assert stack.fault_helpers(docker_engine, project) == []

    backend = DockerBackend(project=project, clients=2)
    try:
        backend.start(ServerSpec("peer-threading"))
        assert backend.peer is not None
        backend.peer.reload()
        assert problems(backend.peer) == []
    finally:
        backend.close()
