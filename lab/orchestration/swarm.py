"""The lab on Docker Swarm: compose.yaml's topology deployed as a stack (``lab up --swarm``).

The engine the lab talks to (``DOCKER_HOST``, or the local one) must be a swarm manager; the lab
never initialises or joins a swarm itself. The stack file is generated from compose.yaml
(:mod:`lab.orchestration.stackfile`) and deployed with ``docker stack deploy`` — the CLI, since
the SDK has no notion of stacks. Its services are ``<project>_server`` and ``<project>_client``
on the attachable overlay network ``<project>_labnet``; the server answers as ``bakawali``.

A manager's API sees every service and task, but containers only on its own node: to exec into
a task elsewhere (``lab exec-client``, a bench's loaders) or to load the image there, the lab
needs that node's engine, which the user lists (``--engine tcp://…`` or a ``unix://`` socket);
the list is kept on the server service as a label, so later commands find it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.orchestration.engine import LabError, engine_has_migrate_req, repo_root

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container
    from docker.models.services import Service

STACK_LABEL = "com.docker.stack.namespace"
SERVICE_NAME_LABEL = "com.docker.swarm.service.name"
TASK_NAME_LABEL = "com.docker.swarm.task.name"
NODE_LABEL = "com.docker.swarm.node.id"
#: On the server service: the node engines the user listed (JSON list of URLs).
ENGINES_LABEL = "org.lab.swarm.engines"
#: On an image the lab loaded onto a node's engine (``lab down --swarm`` removes it there).
LOADED_LABEL = "org.lab.swarm.loaded"
DEPLOY_TIMEOUT = 120.0  # seconds for every task to run (the server: healthy) after a deploy
REMOVE_TIMEOUT = 60.0  # seconds for the stack's containers and network to go


@dataclass(frozen=True)
class Node:
    id: str
    hostname: str
    role: str
    state: str  # ready, down
    availability: str  # active, pause, drain
    self: bool


def _cli(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """``docker ARGS`` against the same engine as the SDK (both follow DOCKER_HOST)."""
    result = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise LabError(f"docker {args[0]} {args[1]} failed: {lines[-1] if lines else '?'}")
    return result.stdout


def is_manager(engine: docker.DockerClient) -> bool:
    swarm = engine.info().get("Swarm") or {}
    return swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))


def require_manager(engine: docker.DockerClient) -> None:
    if not is_manager(engine):
        raise LabError(
            "this Docker engine is not a swarm manager: run `docker swarm init` (or point "
            "DOCKER_HOST at a manager), then `lab up --swarm` again"
        )


def services(engine: docker.DockerClient, project: str) -> list[Service]:
    """The stack's services, or [] when there are none (or the engine is in no swarm)."""
    from docker.errors import APIError

    if not is_manager(engine):
        return []
    try:
        return list(engine.services.list(filters={"label": f"{STACK_LABEL}={project}"}))
    except APIError:
        return []


def deployed(engine: docker.DockerClient, project: str) -> bool:
    return bool(services(engine, project))


def service_of(container: Container, project: str) -> str:
    """``server`` from a task container's ``lab_server`` service label ('' if not a task)."""
    name = str(container.labels.get(SERVICE_NAME_LABEL, ""))
    return name.removeprefix(f"{project}_") if name else ""


def slot_of(container: Container) -> int:
    """The task's slot (``lab_client.2.<task id>`` → 2): compose's container number."""
    parts = str(container.labels.get(TASK_NAME_LABEL, "")).split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def nodes(engine: docker.DockerClient) -> list[Node]:
    own = (engine.info().get("Swarm") or {}).get("NodeID", "")
    found = []
    for node in engine.nodes.list():
        attrs = node.attrs
        found.append(
            Node(
                id=str(node.id),
                hostname=attrs.get("Description", {}).get("Hostname", "?"),
                role=attrs.get("Spec", {}).get("Role", "?"),
                state=attrs.get("Status", {}).get("State", "?"),
                availability=attrs.get("Spec", {}).get("Availability", "?"),
                self=node.id == own,
            )
        )
    return sorted(found, key=lambda n: (not n.self, n.hostname))


# -- the nodes' engines ---------------------------------------------------------------------------
@functools.cache
def connect(url: str) -> docker.DockerClient:
    import docker
    from docker.errors import DockerException

    try:
        # ssh://: through the system's ssh client (its keys and config), as the docker CLI does
        ssh = url.startswith("ssh://")
        other = docker.DockerClient(base_url=url, timeout=120, use_ssh_client=ssh)
        other.ping()
    except DockerException:
        raise LabError(f"--engine {url}: cannot reach a Docker engine there: fix the URL") from None
    return other


def node_engines(
    engine: docker.DockerClient, urls: Iterable[str]
) -> dict[str, docker.DockerClient]:
    """Node id → its engine: the manager's own, and each listed one (by the node id it reports)."""
    own = (engine.info().get("Swarm") or {}).get("NodeID", "")
    found: dict[str, docker.DockerClient] = {own: engine}
    for url in urls:
        other = connect(url)
        node_id = (other.info().get("Swarm") or {}).get("NodeID", "")
        if not node_id:
            raise LabError(f"--engine {url}: that engine is in no swarm: join it to this one")
        found[node_id] = other
    return found


@functools.cache
def _recorded(project: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """What the deploy recorded on the server service (cached for the process): the engine
    URLs the user listed, and the images it loaded (node id, image)."""
    from lab.orchestration.engine import client

    for service in services(client(), project):
        labels = service.attrs.get("Spec", {}).get("Labels", {}) or {}
        if ENGINES_LABEL in labels:
            loaded = json.loads(labels.get(LOADED_LABEL) or "{}")
            return tuple(json.loads(labels[ENGINES_LABEL])), tuple(sorted(loaded.items()))
    return (), ()


def engines_of(engine: docker.DockerClient, project: str) -> dict[str, docker.DockerClient]:
    """Node id → engine for the deployed stack: the manager's and the ones listed at deploy."""
    return node_engines(engine, _recorded(project)[0])


def task_containers(engine: docker.DockerClient, project: str) -> list[Container]:
    """The stack's task containers that are not over (an ended task's container stays until
    the swarm's task history drops it), on this node and every node whose engine was listed."""
    found: list[Container] = []
    for each in engines_of(engine, project).values():
        found += [
            c
            for c in each.containers.list(
                all=True, filters={"label": f"{STACK_LABEL}={project}"}, ignore_removed=True
            )
            if c.status in ("running", "paused", "restarting")
        ]
    return found


# -- images ----------------------------------------------------------------------------------------
def ensure_images_on_nodes(
    engine: docker.DockerClient,
    image: str,
    engines: dict[str, docker.DockerClient],
    server_node: str | None,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Every node that may run a task has ``image``: loaded (``docker save | docker load``) on
    each listed engine that lacks it; a node whose engine is not listed cannot be checked, so
    the deploy stops and says which. Returns the ids of the nodes it was loaded onto."""
    from docker.errors import ImageNotFound

    every = nodes(engine)
    if server_node and server_node not in {n.hostname for n in every}:
        have = ", ".join(n.hostname for n in every)
        raise LabError(f"--server-node {server_node}: no such node (nodes: {have})")
    usable = [n for n in every if n.availability == "active" and n.state == "ready"]
    unknown = [n.hostname for n in usable if n.id not in engines]
    if unknown:
        raise LabError(
            f"cannot tell whether node(s) {', '.join(unknown)} have {image}: list each one's "
            "engine with --engine URL (lab loads the image there), or drain them "
            "(docker node update --availability drain NODE)"
        )
    loaded = []
    for node in usable:
        other = engines[node.id]
        try:
            other.images.get(image)
        except ImageNotFound:
            if progress:
                progress(f"loading {image} onto node {node.hostname}")
            # Streamed: the saved image's chunks go straight into the other engine's load.
            chunks = engine.images.get(image).save(named=True)
            other.images.load(chunks)  # type: ignore[arg-type]  # requests streams an iterator
            loaded.append(node.id)
    return loaded


def _remove_loaded_images(engines: dict[str, docker.DockerClient], loaded: dict[str, str]) -> None:
    """Remove the images the deploy loaded onto other nodes (node id → image)."""
    from docker.errors import APIError, NotFound

    for node_id, image in loaded.items():
        if node_id in engines:
            with contextlib.suppress(APIError, NotFound):
                engines[node_id].images.remove(image, force=True)


# -- deploy, switch, remove ----------------------------------------------------------------------
def deploy(
    engine: docker.DockerClient,
    project: str,
    env: dict[str, str],
    server_node: str | None = None,
    engine_urls: Sequence[str] = (),
    loaded: dict[str, str] | None = None,
    publish: int | None = None,
) -> None:
    """``docker stack deploy`` of the generated stack file with ``env`` (LAB_IMAGE, LAB_DESIGN,
    LAB_CLIENTS, server options), then wait until every task runs and the server is healthy.
    The listed engines and the images loaded onto nodes are recorded on the server service;
    ``publish``: the server's port published there, in host mode on its node."""
    from lab.orchestration import compose, stackfile

    root = repo_root()
    labels = {ENGINES_LABEL: json.dumps(list(engine_urls)), LOADED_LABEL: json.dumps(loaded or {})}
    with tempfile.TemporaryDirectory(prefix="lab-stack-") as folder:
        path = stackfile.write_stack_file(
            root,
            Path(folder) / "stack.yaml",
            server_node,
            engine_has_migrate_req(),
            labels,
            publish,
        )
        full_env = {**os.environ, **env}
        with compose.server_env_file(full_env) as env_path:
            _cli(
                [
                    "stack",
                    "deploy",
                    "--resolve-image",
                    "never",
                    "--prune",
                    "-c",
                    str(path),
                    project,
                ],
                env={**full_env, compose.SERVER_ENV: env_path},
            )
    _recorded.cache_clear()
    wait_running(engine, project)


def wait_running(
    engine: docker.DockerClient, project: str, timeout: float = DEPLOY_TIMEOUT
) -> None:
    """Until each service has as many running tasks as replicas (a task with a health check
    counts as running only once healthy) and no task of an older spec still runs."""
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        for service in services(engine, project):
            service.reload()
            want = service.attrs["Spec"].get("Mode", {}).get("Replicated", {}).get("Replicas", 1)
            tasks = service.tasks(filters={"desired-state": "running"})  # type: ignore[no-untyped-call]
            running = [t for t in tasks if t["Status"]["State"] == "running"]
            if len(running) != want or len(tasks) != want:
                errors = {t["Status"].get("Err", "") for t in tasks} - {""}
                pending.append(
                    f"{service.name} {len(running)}/{want}"
                    + (f" ({'; '.join(errors)})" if errors else "")
                )
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LabError(
                f"the stack's tasks did not all run within {timeout:g} s: {', '.join(pending)} — "
                f"see `docker service ps --no-trunc {project}_server`"
            )
        time.sleep(0.5)


def update_server(engine: docker.DockerClient, project: str, env: dict[str, str]) -> None:
    """A rolling update of the server service with ``env`` changed: Swarm stops the old task
    (SIGTERM: it drains, up to its grace) and then starts the new one (stop-first, the
    default: one server at a time answers as bakawali)."""
    adds = [arg for name, value in sorted(env.items()) for arg in ("--env-add", f"{name}={value}")]
    _cli(["service", "update", "--detach", *adds, f"{project}_server"])
    wait_running(engine, project)


def remove(engine: docker.DockerClient, project: str, volumes: bool = False) -> int:
    """``docker stack rm``, then wait until its containers and network are gone (the command
    returns before), then remove the images it loaded onto other nodes (and with ``volumes``
    the data volume on every node); returns how many task containers there were."""
    from docker.errors import APIError, NotFound

    count = len(task_containers(engine, project))
    engines = engines_of(engine, project)
    loaded = dict(_recorded(project)[1])
    _cli(["stack", "rm", project])
    _recorded.cache_clear()
    deadline = time.monotonic() + REMOVE_TIMEOUT
    label: dict[str, str | list[str] | bool] = {"label": f"{STACK_LABEL}={project}"}
    while any(e.containers.list(all=True, filters=label) for e in engines.values()) or (
        engine.networks.list(filters=label)
    ):
        if time.monotonic() > deadline:
            raise LabError(
                f"the stack {project} is not gone after {REMOVE_TIMEOUT:g} s: see "
                f"`docker stack ps {project}`, then `lab down` again"
            )
        time.sleep(0.5)
    _remove_loaded_images(engines, loaded)
    if volumes:
        for each in engines.values():
            for volume in each.volumes.list(filters=label):
                with contextlib.suppress(APIError, NotFound):
                    volume.remove(force=True)
    return count


def placements(engine: docker.DockerClient, project: str) -> list[dict[str, Any]]:
    """Where each running task runs: ``{"task": "lab_client.2", "node": "vm", ...}``."""
    names = {n.id: n.hostname for n in nodes(engine)}
    found = []
    for service in services(engine, project):
        tasks = service.tasks(filters={"desired-state": "running"})  # type: ignore[no-untyped-call]
        for task in tasks:
            found.append(
                {
                    "task": f"{service.name}.{task.get('Slot', '?')}",
                    "node": names.get(task.get("NodeID", ""), task.get("NodeID", "?")),
                    "state": task["Status"]["State"],
                }
            )
    return sorted(found, key=lambda t: str(t["task"]))


def follow_logs(project: str, which: Sequence[str]) -> None:
    """``docker service logs -f`` of the chosen services, one process each, until interrupted
    (they gather every node's task logs through the manager)."""
    procs = [
        subprocess.Popen(["docker", "service", "logs", "-f", "--raw", f"{project}_{name}"])
        for name in which
    ]
    try:
        for proc in procs:
            proc.wait()
    finally:
        for proc in procs:
            proc.terminate()
