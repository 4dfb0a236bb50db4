"""The running lab: one server container (hostname ``bakawali``) and N client containers on the
``labnet`` bridge, brought up from ``compose.yaml`` and inspected with the docker SDK."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lab.orchestration import compose, swarm
from lab.orchestration.engine import MANAGED_LABEL, PROJECT, LabError, client
from lab.orchestration.images import ensure_images

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

HEALTHY_TIMEOUT = 90.0  # seconds for the server to answer its health probes after a start
STATS_TIMEOUT = 5.0  # seconds to wait for the statistics line after SIGUSR1
# The services compose.yaml defines. Any other container of the project is one the lab made
# itself beside compose (a bench's peer): compose neither knows nor removes it.
COMPOSE_SERVICES = ("server", "client")
ECHO_PORT = "12345/tcp"  # the server's port inside its container, published on host loopback
# The server's working folder (compose.yaml's working_dir): the lab's data volume, where the kv
# service keeps its default database (./lab-kv.sqlite3) across `lab down` and `lab switch`.
DATA_DIR = "/data"
DATA_VOLUME = "lab-data"  # compose.yaml's name for it (the engine's: <project>_lab-data)
SERVICE_VARS = ("LAB_SERVICE", "LAB_DB")  # what a switch keeps of the server it replaces
# A network fault's helper container (lab.orchestration.faults) carries its project here, not
# in compose's label: compose would call it an orphan, and it is no member of the lab.
FAULT_PROJECT_LABEL = "org.lab.fault.project"


@dataclass(frozen=True)
class Member:
    """One container of the lab, as the status table shows it."""

    name: str
    service: str
    number: int
    state: str
    health: str
    hostname: str
    address: str
    image: str
    design: str


def containers(engine: docker.DockerClient, project: str = PROJECT) -> list[Container]:
    """The project's containers: compose's, or the running tasks of its Swarm stack (on this
    node and on every node whose engine `lab up --swarm --engine` was given)."""
    # ignore_removed: the SDK lists, then inspects each container; one removed in between (a
    # bench's peer going away, compose recreating the server) is not an error, just gone.
    found = engine.containers.list(
        all=True, filters={"label": f"{compose.PROJECT_LABEL}={project}"}, ignore_removed=True
    )
    found += swarm.task_containers(engine, project)
    return sorted(found, key=lambda c: (service_of(c) != "server", service_of(c), _number(c)))


def on_swarm(container: Container) -> bool:
    """A task of a Swarm stack (`lab up --swarm`), not a compose container."""
    return swarm.STACK_LABEL in container.labels


def service_of(container: Container) -> str:
    """Which service of compose.yaml the container is (``server``, ``client``; ``peer``)."""
    if on_swarm(container):
        return swarm.service_of(container, str(container.labels[swarm.STACK_LABEL]))
    return str(container.labels.get(compose.SERVICE_LABEL, "?"))


def _number(container: Container) -> int:
    if on_swarm(container):
        return swarm.slot_of(container)
    return int(container.labels.get(compose.NUMBER_LABEL, "0") or 0)


def _env(container: Container) -> dict[str, str]:
    pairs = container.attrs.get("Config", {}).get("Env") or []
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def member(container: Container) -> Member:
    state = container.attrs.get("State", {})
    networks = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
    addresses = [n.get("IPAddress", "") for n in networks.values() if n.get("IPAddress")]
    return Member(
        name=container.name or container.short_id,
        service=service_of(container),
        number=_number(container),
        state=str(state.get("Status", "?")),
        health=str((state.get("Health") or {}).get("Status", "-")),
        hostname=str(container.attrs.get("Config", {}).get("Hostname", "")),
        address=",".join(addresses) or "-",
        image=str(container.attrs.get("Config", {}).get("Image", "")),
        design=_env(container).get("LAB_DESIGN", "") if service_of(container) == "server" else "",
    )


def members(project: str = PROJECT) -> list[Member]:
    return [member(c) for c in containers(client(), project)]


def find_server(engine: docker.DockerClient, project: str = PROJECT) -> Container | None:
    return next((c for c in containers(engine, project) if service_of(c) == "server"), None)


def server_container(engine: docker.DockerClient, project: str = PROJECT) -> Container:
    server = find_server(engine, project)
    if server is None:
        raise LabError("the lab is not up: start it with `lab up`")
    return server


def foreign(container: Container) -> bool:
    """A container of the project that compose.yaml does not define (a bench's peer)."""
    return service_of(container) not in COMPOSE_SERVICES


def remove_foreign(engine: docker.DockerClient, project: str = PROJECT) -> list[str]:
    """Remove the project's containers that compose does not know: a peer left by a bench that
    was killed holds the name ``bakawali`` on labnet beside the server, and its endpoint keeps
    compose from removing the network. Returns their names."""
    from docker.errors import NotFound

    removed = []
    for container in containers(engine, project):
        if foreign(container):
            with contextlib.suppress(NotFound):  # already gone is fine
                container.remove(force=True)
            removed.append(container.name or container.short_id)
    return removed


def fault_helpers(engine: docker.DockerClient, project: str = PROJECT) -> list[Container]:
    """The network faults' helper containers of the project, running or exited (on Swarm, on
    every node engine of the stack: a helper runs on its client's node)."""
    label: dict[str, str | list[str] | bool] = {"label": f"{FAULT_PROJECT_LABEL}={project}"}
    found: list[Container] = []
    for each in swarm.engines_of(engine, project).values():
        found += each.containers.list(all=True, filters=label, ignore_removed=True)
    return found


def remove_fault_helpers(engine: docker.DockerClient, project: str = PROJECT) -> None:
    from docker.errors import APIError, NotFound

    for helper in fault_helpers(engine, project):
        with contextlib.suppress(NotFound, APIError):
            helper.remove(force=True)


def whole(found: Sequence[Container]) -> bool:
    """The lab is up as `lab up` leaves it: the server running (healthy, or still starting), at
    least one client, every client running, nothing else."""
    server = [c for c in found if service_of(c) == "server"]
    rest = [c for c in found if service_of(c) != "server"]
    return (
        len(server) == 1
        and server[0].status == "running"
        and member(server[0]).health in ("healthy", "starting")
        and bool(rest)
        and all(service_of(c) == "client" and c.status == "running" for c in rest)
    )


def summary(found: Sequence[Container]) -> str:
    """``server exited, 3 client(s) running, peer running`` — the state in a few words."""
    counts: dict[tuple[str, str], int] = {}
    for container in found:
        key = (service_of(container), container.status)
        counts[key] = counts.get(key, 0) + 1
    parts = [
        f"{service} {state}" if service == "server" else f"{n} {service}(s) {state}"
        for (service, state), n in counts.items()
    ]
    return ", ".join(parts) or "nothing"


def server_settings(server: Container) -> dict[str, str]:
    """What compose was given to make this server — its LAB_* variables, its image and the host
    port it publishes — so that it can be made again exactly as it was (see ``switch``)."""
    settings = {k: v for k, v in _env(server).items() if k.startswith("LAB_")}
    settings["LAB_IMAGE"] = str(server.attrs.get("Config", {}).get("Image", ""))
    settings.update(_published_port(server))
    return settings


def _published_port(server: Container) -> dict[str, str]:
    """``{"LAB_HOST_PORT": "12345"}`` from the server's configured port binding (kept in its
    HostConfig, so known while it is stopped too), or {} when it publishes none."""
    bindings = (server.attrs.get("HostConfig", {}).get("PortBindings") or {}).get(ECHO_PORT)
    port = bindings[0].get("HostPort") if bindings else None
    return {"LAB_HOST_PORT": str(port)} if port else {}


def up(
    design: str,
    clients: int,
    progress: Callable[[str], None] | None = None,
    project: str = PROJECT,
    extra_env: dict[str, str] | None = None,
    on: Swarm | None = None,
) -> list[Member]:
    """Start the lab with compose, or as a Swarm stack with ``on``."""
    engine = client()
    if on is not None:
        swarm.require_manager(engine)  # before anything is built or removed
    found = containers(engine, project)
    if whole(found) or swarm.deployed(engine, project):
        current = member(found[0]).design if found else "?"
        where = " on the swarm" if swarm.deployed(engine, project) else ""
        raise LabError(
            f"the lab is already up{where} (design {current}, {len(found)} containers): "
            "`lab switch DESIGN` changes the design, `lab down` stops it"
        )
    if found:
        # Half a lab (a server that exited, a peer a killed bench left, clients without a
        # server): compose would reuse some of it and trip over the rest. Start afresh.
        if progress:
            progress(f"removing what is left of an earlier lab ({summary(found)})")
        down(project, timeout=5)
    images = ensure_images(progress)
    env = {"LAB_IMAGE": images.lab, "LAB_DESIGN": design, **(extra_env or {})}
    try:
        if on is not None:
            _up_swarm(engine, project, clients, env, on, progress)
        else:
            if progress:
                tool = compose.version()
                progress(f"starting the server ({design}) and {clients} client(s) with {tool}")
            compose.run(["up", "-d", "--scale", f"client={clients}"], env=env, project=project)
            wait_healthy(engine, project)
    except LabError:
        # Leave nothing half-started behind (a created server, the network, a stack).
        with contextlib.suppress(LabError):
            down(project, timeout=5)
        raise
    return [member(c) for c in containers(engine, project)]


@dataclass(frozen=True)
class Swarm:
    """Where `lab up --swarm` puts the lab: the server's node (any when None) and the node
    engines the user listed (to check and load the image there, and to exec into tasks)."""

    server_node: str | None = None
    engines: tuple[str, ...] = ()
    publish: int | None = None  # the server's port at this port of its node (host mode)


def _up_swarm(
    engine: docker.DockerClient,
    project: str,
    clients: int,
    env: dict[str, str],
    on: Swarm,
    progress: Callable[[str], None] | None,
) -> None:
    engines = swarm.node_engines(engine, on.engines)
    image, design = env["LAB_IMAGE"], env["LAB_DESIGN"]
    loaded = swarm.ensure_images_on_nodes(engine, image, engines, on.server_node, progress)
    if progress:
        progress(f"deploying the stack {project}: the server ({design}), {clients} client(s)")
    swarm.deploy(
        engine,
        project,
        {**env, "LAB_CLIENTS": str(clients)},
        on.server_node,
        on.engines,
        {node: image for node in loaded},
        on.publish,
    )


def require_swarm(project: str = PROJECT, deployed: bool = True) -> None:
    """For ``--swarm``: this engine must be a swarm manager, and (``deployed``) the lab
    deployed there as a stack."""
    engine = client()
    swarm.require_manager(engine)
    if deployed and not swarm.deployed(engine, project):
        raise LabError("the lab is not up on the swarm: start it with `lab up --swarm`")


def wait_healthy(
    engine: docker.DockerClient, project: str = PROJECT, timeout: float = HEALTHY_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server = find_server(engine, project)
        if server is None:  # not "start it with `lab up`": this may be `lab up` itself
            raise LabError("the server's container went away while starting: see `lab status`")
        server.reload()
        health = member(server).health
        if health == "healthy":
            return
        if server.status in ("exited", "dead") or time.monotonic() > deadline:
            tail = server.logs(tail=5).decode("utf-8", "replace").strip().splitlines()
            last = tail[-1] if tail else "no output"
            raise LabError(
                f"the server did not become healthy ({server.status}, {health}); its last line: "
                f"{last!r} — see `lab logs server`"
            )
        time.sleep(0.5)


def wait_for_introductions(
    project: str = PROJECT, messages: int = 3, timeout: float = 60.0
) -> None:
    """Wait until every client has reported on each of its introductory exchanges (a success
    or an error line), so a transcript shows the whole first session."""
    engine = client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = []
        for container in containers(engine, project):
            if service_of(container) != "client":
                continue
            text = container.logs().decode("utf-8", "replace")
            done = text.count("successfully received") + text.count("lab client: error")
            if done < messages:
                pending.append(container.name or container.short_id)
        if not pending:
            return
        time.sleep(0.5)
    raise LabError(f"clients still busy after {timeout:g} s: {', '.join(pending)} — see `lab logs`")


def down(project: str = PROJECT, timeout: int = 20, volumes: bool = False) -> int:
    """Remove every container and network of the project — compose's and the peers a bench
    started beside them — but no image, and the data volume only with ``volumes``; returns how
    many containers went.

    ``timeout``: seconds the server may drain its connections (SIGTERM) before SIGKILL."""
    engine = client()
    found = containers(engine, project)
    count = len(found)
    for container in found:  # a fault left in place (`lab fault pause`): a paused one won't stop
        if container.status == "paused":
            with contextlib.suppress(Exception):
                container.unpause()
    remove_fault_helpers(engine, project)  # their rules go with the clients' namespaces
    remove_foreign(engine, project)  # first: a peer's endpoint would keep labnet in use
    if swarm.deployed(engine, project):
        swarm.remove(engine, project, volumes)
    failure: LabError | None = None
    args = [
        "down",
        "--remove-orphans",
        "--timeout",
        str(timeout),
        *(["--volumes"] if volumes else []),
    ]
    try:
        compose.run(args, project=project)
    except LabError as exc:
        failure = exc  # maybe only the network; sweep by label below, then judge
    left = _remove_labelled(engine, project, volumes)
    if left:
        why = f" ({failure})" if failure else ""
        raise LabError(
            f"could not remove {', '.join(left)}{why}: remove them with `docker rm -f` / "
            "`docker network rm`, then `lab down` again"
        )
    return count


def _remove_labelled(engine: docker.DockerClient, project: str, volumes: bool = False) -> list[str]:
    """Force-remove the project's containers, then its networks (and with ``volumes`` its
    volumes), that are still there (by the project label and the lab's own); returns what could
    not be removed."""
    from docker.errors import APIError, NotFound

    labels: dict[str, str | list[str] | bool] = {
        "label": [f"{compose.PROJECT_LABEL}={project}", f"{MANAGED_LABEL}=true"]
    }
    for container in engine.containers.list(all=True, filters=labels, ignore_removed=True):
        with contextlib.suppress(NotFound, APIError):  # judged by the listing below
            container.remove(force=True)
    for network in engine.networks.list(filters=labels):
        with contextlib.suppress(NotFound, APIError):
            network.remove()
    left_volumes: list[str] = []
    if volumes:
        for volume in engine.volumes.list(filters=labels):
            with contextlib.suppress(NotFound, APIError):
                volume.remove(force=True)
        left_volumes = [f"volume {v.name}" for v in engine.volumes.list(filters=labels)]
    listed = engine.containers.list(all=True, filters=labels, ignore_removed=True)
    left = [f"container {c.name}" for c in listed]
    return left + [f"network {n.name}" for n in engine.networks.list(filters=labels)] + left_volumes


def server_stats(engine: docker.DockerClient, project: str = PROJECT) -> dict[str, Any] | None:
    """The server's live statistics: SIGUSR1 to the container (its init forwards it to the
    server), then the JSON line it prints, read back from the logs."""
    server = server_container(engine, project)
    if server.status != "running":
        return None

    def stats_lines() -> list[str]:
        text = server.logs(stdout=True, stderr=False, tail=200).decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.startswith('{"event": "stats"')]

    before = stats_lines()
    server.kill(signal="SIGUSR1")
    deadline = time.monotonic() + STATS_TIMEOUT
    while time.monotonic() < deadline:
        lines = stats_lines()
        if lines and lines != before:  # a new line: the answer to this signal
            stats: dict[str, Any] = json.loads(lines[-1])
            return stats
        time.sleep(0.2)
    return None


def status(project: str = PROJECT) -> dict[str, Any]:
    engine = client()
    found = [member(c) for c in containers(engine, project)]
    if not found:
        raise LabError("the lab is not up: start it with `lab up`")
    server = next((m for m in found if m.service == "server"), None)
    on = swarm.deployed(engine, project)
    return {
        "project": project,
        "swarm": {
            "nodes": [asdict(n) for n in swarm.nodes(engine)],
            "tasks": swarm.placements(engine, project),
        }
        if on
        else None,
        "design": server.design if server else None,
        "health": server.health if server else None,
        "containers": [asdict(m) for m in found],
        "stats": server_stats(engine, project) if server else None,
    }


def _swarm_status(engine: docker.DockerClient, project: str) -> dict[str, Any]:
    return {
        "nodes": [asdict(n) for n in swarm.nodes(engine)],
        "tasks": swarm.placements(engine, project),
    }


def switch(design: str, project: str = PROJECT, extra_env: dict[str, str] | None = None) -> Member:
    """Recreate only the server with another design; clients keep running. It publishes the
    same host port as before unless LAB_HOST_PORT says otherwise."""
    engine = client()
    server = server_container(engine, project)
    remove_foreign(engine, project)  # a peer left on labnet would answer for bakawali too
    kept = {} if "LAB_HOST_PORT" in os.environ else _published_port(server)
    # The service (and its database) stay what they were unless this switch says otherwise:
    # a switch changes the design, and the keys on the data volume are there for the next one.
    settings = _env(server)
    kept.update(
        {
            name: settings[name]
            for name in SERVICE_VARS
            if settings.get(name) and name not in os.environ
        }
    )
    env = {"LAB_IMAGE": member(server).image, **kept, "LAB_DESIGN": design, **(extra_env or {})}
    if on_swarm(server):
        # The image and the published port are the service's; the rest goes in its env.
        swarm.update_server(engine, project, {k: v for k, v in env.items() if k in _SERVER_VARS})
        return member(server_container(engine, project))
    compose.run(["up", "-d", "--no-deps", "--force-recreate", "server"], env=env, project=project)
    wait_healthy(engine, project)
    return member(server_container(engine, project))


#: What a switch may change in a Swarm server's environment: the design, and the server's
#: options (a bench's LAB_TRACE=0 and --workers among them).
_SERVER_VARS = compose.SERVER_OPTION_VARS | {"LAB_DESIGN", "LAB_TRACE", *SERVICE_VARS}


def exec_client(number: int, argv: Sequence[str], project: str = PROJECT) -> int:
    """Run ``argv`` in client ``number``, streaming its output; returns its exit code."""
    engine = client()
    clients = [c for c in containers(engine, project) if service_of(c) == "client"]
    chosen = next((c for c in clients if _number(c) == number), None)
    if chosen is None or chosen.status != "running":
        have = ", ".join(str(_number(c)) for c in clients) or "none"
        raise LabError(f"no running client {number} (clients: {have}): see `lab status`")
    # the engine of the client's node (a Swarm task's may be another's)
    api = (chosen.client or engine).api
    exec_id = api.exec_create(chosen.id, list(argv), stdout=True, stderr=True)["Id"]
    for out, err in api.exec_start(exec_id, stream=True, demux=True):
        if out:
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
        if err:
            sys.stderr.buffer.write(err)
            sys.stderr.flush()
    code: int = api.exec_inspect(exec_id)["ExitCode"]
    return code


def logs(which: str, follow: bool, project: str = PROJECT) -> None:
    """Follow through compose (it interleaves live); otherwise merge every container's log by
    timestamp, so the server's trace and the clients' lines read as one transcript (compose
    1.29 prints one container after another)."""
    if follow:
        services = [] if which == "all" else [which]
        if swarm.deployed(client(), project):
            swarm.follow_logs(project, services or list(COMPOSE_SERVICES))
            return
        compose.run(["logs", "-f", *services], project=project, capture=False)
        return
    for line in transcript(which, project):
        print(line)


def transcript(which: str = "all", project: str = PROJECT) -> list[str]:
    engine = client()
    chosen = [c for c in containers(engine, project) if which in ("all", service_of(c))]
    if not chosen:
        raise LabError("the lab is not up: start it with `lab up`")
    stamped: list[tuple[str, str]] = []
    for container in chosen:
        name = service_of(container) + (
            f"-{_number(container)}" if service_of(container) == "client" else ""
        )
        text = container.logs(timestamps=True).decode("utf-8", "replace")
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            stamped.append((stamp, f"{name:<9}| {message}"))
    return [line for _, line in sorted(stamped, key=lambda pair: pair[0])]
