"""``compose.yaml`` as a Swarm stack file: one topology, two targets.

``docker stack deploy`` reads Compose files, but not every key of them, and a swarm is not one
Docker host. The stack file is therefore generated from compose.yaml every time it is deployed
(never kept by hand beside it): the same services, images, commands, environment, labels,
health check and hardening, with each change Swarm forces listed once, in :data:`DIFFERENCES`,
with what replaces the key or why nothing can. ``tests/test_stackfile.py`` checks that the two
describe the same services and environment and differ only where this list says.

Variables (``${LAB_DESIGN:-iterative}``) are left as they are: ``docker stack deploy``
substitutes them from its environment, as compose does (it does not read ``.env``; the lab
passes every variable it sets).

Why dnsrr: a service's virtual IP is routed by IPVS in the kernel, and kernels without it (this
lab's CI machine: no ``/proc/net/ip_vs``) answer a connect to a VIP with "No route to host".
With ``endpoint_mode: dnsrr`` the name ``bakawali`` resolves straight to the server task's
address on the overlay network, so a connection goes from a client task to the server task
as on compose's bridge — no load balancer in between to measure — and no port is published
through the routing mesh (which needs IPVS too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The stack file's format: 3.13 has every key used here (tmpfs mounts 3.6, init 3.7, a task's
#: pids limit 3.13: docker CLI 24 or newer).
STACK_VERSION = "3.13"
#: A client task's hostname: ``client-N`` from its slot, as compose's replicas are numbered;
#: the client's intro script takes its name from it (images/lab/client-intro.sh).
CLIENT_HOSTNAME = "client-{{.Task.Slot}}"

Service = dict[str, Any]


@dataclass(frozen=True)
class Difference:
    """One key compose.yaml has and Swarm does not take as it is."""

    key: str  # the service key in compose.yaml (or "networks" for the top level)
    swarm: str  # what the stack file has instead
    why: str
    apply: Callable[[str, Service], None]  # (service name, its stack entry) → changes it


def _drop(key: str) -> Callable[[str, Service], None]:
    def apply(_name: str, service: Service) -> None:
        service.pop(key, None)

    return apply


def _tmpfs(_name: str, service: Service) -> None:
    paths = service.pop("tmpfs", [])
    mounts = [{"type": "tmpfs", "target": path} for path in paths]
    service["volumes"] = [*service.get("volumes", []), *mounts]


def _limits(key: str, field: str) -> Callable[[str, Service], None]:
    def apply(_name: str, service: Service) -> None:
        if key in service:
            limits = service.setdefault("deploy", {}).setdefault("resources", {})
            limits.setdefault("limits", {})[field] = service.pop(key)

    return apply


def _placement(name: str, service: Service) -> None:
    deploy = service.setdefault("deploy", {})
    deploy["endpoint_mode"] = "dnsrr"
    placement = deploy.setdefault("placement", {})
    if name != "server":
        placement["preferences"] = [{"spread": "node.id"}]
        service["hostname"] = CLIENT_HOSTNAME


def _container_labels(_name: str, service: Service) -> None:
    # Container labels stay (the lab finds its containers by them); the service gets the same
    # ones, so `docker service ls --filter label=org.lab.managed=true` finds the services too.
    service.setdefault("deploy", {})["labels"] = dict(service.get("labels", {}))


#: Every change from compose.yaml to the stack file, in the order applied.
DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "security_opt",
        "nothing",
        'Swarm services take no security options (`docker stack deploy`: "Ignoring unsupported '
        "options: security_opt\"); the tasks still run as the image's unprivileged user with "
        "no capability, so there is no privilege to gain",
        _drop("security_opt"),
    ),
    Difference(
        "pids_limit",
        "deploy.resources.limits.pids",
        "Swarm reads resource limits only under deploy (engine 20.10, stack files 3.13)",
        _limits("pids_limit", "pids"),
    ),
    Difference(
        "mem_limit",
        "deploy.resources.limits.memory",
        "Swarm reads resource limits only under deploy",
        _limits("mem_limit", "memory"),
    ),
    Difference(
        "tmpfs",
        "a volumes entry of type tmpfs",
        "stack deploy ignores the short tmpfs key; a tmpfs mount is the same file system",
        _tmpfs,
    ),
    Difference(
        "ports",
        "nothing: no published port (with `lab up --swarm --publish`: the server's port in "
        "host mode, on its node)",
        "Swarm publishes on every interface of a node (no host address, so not loopback only) "
        "or through the routing mesh (IPVS, which kernels without it lack); reach the server "
        "from a client task (`lab exec-client --swarm`), or opt in to host mode",
        _drop("ports"),
    ),
    Difference(
        "depends_on",
        "the client's intro waits for the server's health port",
        "Swarm starts services in no order and has no health conditions",
        _drop("depends_on"),
    ),
    Difference(
        "deploy",
        "deploy.endpoint_mode dnsrr, placement (the server's node, clients spread over the "
        "nodes), client hostnames client-N",
        "no IPVS for a virtual IP (see the module's docstring); a client names itself from its "
        "hostname, where compose's DNS gives it its replica number",
        _placement,
    ),
    Difference(
        "labels",
        "the same labels on the service too (deploy.labels)",
        "container labels find the tasks' containers; service labels find the services",
        _container_labels,
    ),
)

#: The network: compose's bridge reaches one host; an overlay spans the swarm's nodes, and
#: attachable lets a plain container (a bench's peer, a test's probe) join it.
NETWORK_DIFFERENCE = "labnet: driver overlay, attachable (compose: bridge, one host)"


def load_compose(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # the host's venv has it (make venv); a bare install may not
        from lab.orchestration.engine import LabError

        raise LabError("the Swarm stack file needs PyYAML: pip install 'lab[swarm]'") from None

    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def stack_file(
    compose: dict[str, Any],
    server_node: str | None = None,
    overrides: tuple[dict[str, Any], ...] = (),
    server_labels: dict[str, str] | None = None,
    publish: int | None = None,
) -> dict[str, Any]:
    """compose.yaml's content (with the sysctls of ``overrides``, compose's further ``-f``
    files) → the stack file's content; ``server_node``: the node the server must run on;
    ``server_labels``: more labels for the server service (what the deploy records);
    ``publish``: publish the server's port at this port of its node, in host mode (the node's
    every interface: Swarm takes no host address; no routing mesh, which needs IPVS)."""
    stack: dict[str, Any] = {"version": STACK_VERSION}
    networks = copy.deepcopy(compose.get("networks", {}))
    for network in networks.values():
        network["driver"] = "overlay"
        network["attachable"] = True
    stack["networks"] = networks
    stack["volumes"] = copy.deepcopy(compose.get("volumes", {}))
    services: dict[str, Service] = {}
    for name, service in compose["services"].items():
        entry = copy.deepcopy(service)
        for override in overrides:
            more = override.get("services", {}).get(name, {}).get("sysctls", {})
            entry["sysctls"] = {**entry.get("sysctls", {}), **more}
        published = entry.get("ports", [])
        for difference in DIFFERENCES:
            difference.apply(name, entry)
        if name == "server" and publish and published:
            target = int(str(published[0]).rsplit(":", 1)[1])  # compose's "HOST:PORT:TARGET"
            entry["ports"] = [
                {"target": target, "published": publish, "protocol": "tcp", "mode": "host"}
            ]
        if name == "server" and server_node:
            placement = entry["deploy"]["placement"]
            placement["constraints"] = [f"node.hostname == {server_node}"]
        if name == "server" and server_labels:
            entry["deploy"]["labels"].update(server_labels)
        services[name] = entry
    stack["services"] = services
    return stack


def write_stack_file(
    root: Path,
    path: Path,
    server_node: str | None = None,
    migrate_req: bool = False,
    server_labels: dict[str, str] | None = None,
    publish: int | None = None,
) -> Path:
    """The stack file for the checkout ``root``, at ``path``; ``migrate_req``: with the
    server's tcp_migrate_req sysctl (where the kernel has it, as for compose)."""
    import yaml

    from lab.orchestration.compose import MIGRATE_REQ_FILE

    overrides = (load_compose(root / MIGRATE_REQ_FILE),) if migrate_req else ()
    compose = load_compose(root / "compose.yaml")
    content = stack_file(compose, server_node, overrides, server_labels, publish)

    header = (
        "# Generated by lab (lab/orchestration/stackfile.py) from compose.yaml for `docker stack\n"
        "# deploy`; edit compose.yaml, not this. What differs and why: DIFFERENCES there.\n"
    )
    body = yaml.safe_dump(content, sort_keys=False, width=100)
    path.write_text(header + body, encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m lab.orchestration.stackfile > stack.yaml: to read it
    import sys
    import tempfile

    from lab.orchestration.engine import repo_root

    with tempfile.TemporaryDirectory() as folder:
        written = write_stack_file(repo_root(), Path(folder) / "stack.yaml")
        sys.stdout.write(written.read_text(encoding="utf-8"))
