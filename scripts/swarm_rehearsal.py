#!/usr/bin/env python3
"""A multi-node Docker Swarm on one machine, and the lab on it: the rehearsal for a real one.

    .venv/bin/python scripts/swarm_rehearsal.py [--nodes 2] [--clients 2] [--keep]
    make rehearsal                 # the same, through its test (tests/integration/…rehearsal.py)

1. Builds ``lab-node`` (the lab's base image with Debian's docker.io; images/node/) if missing.
2. Starts N Docker-in-Docker containers (the host engine's capabilities, not
   ``--privileged``) on a bridge network of its own; each runs a Docker engine (its own
   /var/lib/docker on a volume). Node 1 runs ``docker swarm init``, the others join it as
   workers. The host's own engine and swarm state are not touched.
3. Loads the lab's images into node 1 only (``docker save | docker load``), then runs the lab
   CLI against node 1 (``DOCKER_HOST``) as a user of a real swarm would:
   ``lab up --swarm --server-node node-1 --engine tcp://<node 2>:2375 …`` — the lab itself finds
   that the other nodes lack the image and loads it there.
4. Checks: tasks on at least two nodes; the original client's exchange from a client task on
   another node than the server's; a partition of that client (``lab fault``: its helper on
   the client's node, the exchange cut, then cleared); a short ``lab bench --swarm`` with no
   error, the server's own count of what it served at least the loaders' count.
5. ``lab down --swarm`` (the images it loaded go from the other nodes), then removes the nodes,
   their volumes and the network — also when a step failed (``--keep`` leaves them for a look).

Prints one line per step and ``rehearsal passed`` at the end; exits 1 with the failing step's
line otherwise. Needs root on the host (containers with every capability the engine holds) and
about 3 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.orchestration.engine import LABELS, LabError, client  # noqa: E402
from lab.orchestration.images import ensure_images  # noqa: E402
from lab.orchestration.stack import FAULT_PROJECT_LABEL  # noqa: E402

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

NODE_REPO = "lab-node"
ROLE_LABEL = "org.lab.role"
REHEARSAL_LABEL = "org.lab.rehearsal"  # on everything the rehearsal makes (its run's name)
NETWORK = "lab-rehearsal"
ENGINE_PORT = 2375
PROJECT = "lab"
NODE_READY_TIMEOUT = 90.0


#: What a Docker engine inside a container needs: `privileged: true` would do, but it asks for
#: every capability, and an engine that itself runs without one (CAP_SYS_RESOURCE, on some
#: hosted machines) refuses to start such a container ("unable to apply caps"). So: every
#: capability the host's engine holds (read from its own status), no seccomp or AppArmor
#: profile, no masked /proc paths (the inner engine mounts a fresh /proc per container), all
#: devices, and a cgroup namespace of its own (see images/node/dind.sh).
CAPABILITIES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
]  # in the kernel's order: capability number i is CAPABILITIES[i]


def held_capabilities() -> list[str]:
    """The capabilities in this process's bounding set (the host's engine runs with the
    same on such machines), of those Docker 20.10 knows."""
    bounding = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
    return [name for i, name in enumerate(CAPABILITIES) if bounding >> i & 1]


def node_host_config(engine: docker.DockerClient) -> dict[str, Any]:
    """The node's HostConfig: the privileges above (the SDK has no option for the masked
    paths, so they are set in the dict it builds)."""
    config: dict[str, Any] = engine.api.create_host_config(
        cap_add=held_capabilities(),
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        device_cgroup_rules=["a *:* rwm"],
        cgroupns="private",
        network_mode=NETWORK,
    )
    config["MaskedPaths"], config["ReadonlyPaths"] = (
        [],
        [],
    )  # `--security-opt systempaths=unconfined`
    # /var/lib/docker: the image's VOLUME, an anonymous volume removed with the node (v=True)
    return config


class Failed(Exception):
    """A step of the rehearsal failed (the message says which and why)."""


def say(line: str) -> None:
    print(f"rehearsal: {line}", flush=True)


def node_image(engine: docker.DockerClient, base: str) -> str:
    """``lab-node:<hash>``, built from images/node/ on top of the base image if missing (the
    tag hashes the base's tag and the folder's files, as the lab's own images do)."""
    from docker.errors import BuildError, ImageNotFound

    sha = hashlib.sha256(base.encode())
    for path in sorted((ROOT / "images/node").iterdir()):
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"{NODE_REPO}:{sha.hexdigest()[:12]}"
    with contextlib.suppress(ImageNotFound):
        engine.images.get(tag)
        return tag
    say(f"building {tag} (Debian's docker.io on {base}, about a minute)")
    try:
        engine.images.build(
            path=str(ROOT / "images/node"), tag=tag, buildargs={"BASE": base}, rm=True
        )
    except BuildError as exc:
        raise Failed(f"building {tag} failed: {exc}") from None
    return tag


def start_nodes(engine: docker.DockerClient, image: str, count: int, run: str) -> list[Container]:
    labels = {**LABELS, ROLE_LABEL: "swarm-node", REHEARSAL_LABEL: run}
    engine.networks.create(NETWORK, driver="bridge", labels=labels)
    nodes = []
    for number in range(1, count + 1):
        created = engine.api.create_container(
            image,
            name=f"lab-node-{number}",
            hostname=f"node-{number}",
            labels=labels,
            host_config=node_host_config(engine),
        )
        node = engine.containers.get(created["Id"])
        node.start()
        nodes.append(node)
    return nodes


def address(node: Container) -> str:
    node.reload()
    return str(node.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"])


def node_engine(node: Container) -> docker.DockerClient:
    import docker as sdk
    from docker.errors import DockerException

    url = f"tcp://{address(node)}:{ENGINE_PORT}"
    deadline = time.monotonic() + NODE_READY_TIMEOUT
    while True:
        try:
            other = sdk.DockerClient(base_url=url, timeout=120)
            other.ping()
            return other
        except DockerException:
            node.reload()
            if node.status != "running" or time.monotonic() > deadline:
                tail = node.logs(tail=5).decode("utf-8", "replace").strip()
                why = f"{node.name}: its engine did not start ({node.status}): {tail}"
                raise Failed(why) from None
            time.sleep(1)


def form_swarm(nodes: list[Container], engines: list[docker.DockerClient]) -> None:
    manager = engines[0]
    manager.swarm.init(advertise_addr=address(nodes[0]), listen_addr=f"{address(nodes[0])}:2377")
    token = manager.swarm.attrs["JoinTokens"]["Worker"]
    for node, other in zip(nodes[1:], engines[1:], strict=True):
        other.swarm.join(
            remote_addrs=[f"{address(nodes[0])}:2377"],
            join_token=token,
            advertise_addr=address(node),
            listen_addr=f"{address(node)}:2377",
        )
    deadline = time.monotonic() + NODE_READY_TIMEOUT
    while len([n for n in manager.nodes.list() if n.attrs["Status"]["State"] == "ready"]) < len(
        nodes
    ):
        if time.monotonic() > deadline:
            raise Failed("the nodes did not all become ready in the swarm")
        time.sleep(1)


def load_images(engine: docker.DockerClient, into: docker.DockerClient, refs: list[str]) -> None:
    for ref in refs:
        into.images.load(engine.images.get(ref).save(named=True))  # type: ignore[arg-type]


def lab(manager_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("lab")), *args]
    env = {**os.environ, "DOCKER_HOST": manager_url, "LAB_PROJECT": PROJECT}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        out = (result.stderr or result.stdout).strip().splitlines()
        raise Failed(f"`lab {' '.join(args)}` exited {result.returncode}: {out[-1] if out else ''}")
    return result


def rehearse(nodes: int, clients: int, keep: bool) -> dict[str, Any]:
    engine = client()
    images = ensure_images(lambda line: say(line))
    image = node_image(engine, images.base)
    run = f"rehearsal-{os.getpid()}"
    teardown(engine)  # what an earlier rehearsal left
    found: dict[str, Any] = {}
    try:
        say(f"starting {nodes} Docker-in-Docker nodes on the bridge {NETWORK}")
        started = start_nodes(engine, image, nodes, run)
        engines = [node_engine(node) for node in started]
        form_swarm(started, engines)
        say(f"swarm formed: node-1 manages, {nodes - 1} worker(s) joined")
        load_images(engine, engines[0], [images.base, images.lab])
        say(f"loaded {images.lab} into node-1 only (the lab loads it onto the others)")
        manager = f"tcp://{address(started[0])}:{ENGINE_PORT}"
        others = [f"--engine=tcp://{address(n)}:{ENGINE_PORT}" for n in started[1:]]
        lab(manager, "up", "--swarm", "--clients", str(clients), "--server-node", "node-1",
            *others, "--design", "thread")  # fmt: skip
        status = json.loads(lab(manager, "status", "--swarm", "--json").stdout)
        tasks = status["swarm"]["tasks"]
        on = {t["node"] for t in tasks}
        found["tasks"] = tasks
        say("tasks: " + ", ".join(f"{t['task']} on {t['node']}" for t in tasks))
        if len(on) < 2:
            raise Failed(f"every task runs on {', '.join(on)}: no spread over the nodes")
        for other in engines[1:]:
            if not other.images.list(name=images.lab.split(":")[0]):
                raise Failed("a worker node has no lab image: the lab did not load it")
        away = next(
            t for t in tasks if "_client." in t["task"] and t["node"] != "node-1"
        )  # a client task on another node than the server's
        number = away["task"].rsplit(".", 1)[1]
        exchange = lab(manager, "exec-client", "--swarm", number, "--", "lab", "client",
                       "bakawali", "--message", "across the nodes").stdout  # fmt: skip
        if "successfully received" not in exchange:
            raise Failed(f"client {number} on {away['node']}: no echo: {exchange.strip()}")
        say(f"client {number} on {away['node']} exchanged with bakawali on node-1")
        # A fault on that client: its helper runs on the client's node, through that engine.
        lab(manager, "fault", "partition", number)
        node = engines[int(away["node"].rsplit("-", 1)[1]) - 1]
        helpers = node.containers.list(filters={"label": f"{FAULT_PROJECT_LABEL}={PROJECT}"})
        if len(helpers) != 1:
            raise Failed(f"the partition's helper is not on {away['node']}: {helpers}")
        cut = lab(manager, "exec-client", number, "--", "lab", "client", "bakawali",
                  "--message", "cut off", "--timeout", "1", check=False)  # fmt: skip
        if cut.returncode == 0:
            raise Failed(f"client {number} exchanged through its partition: {cut.stdout.strip()}")
        lab(manager, "fault", "clear")
        again = lab(manager, "exec-client", number, "--", "lab", "client", "bakawali",
                    "--message", "healed").stdout  # fmt: skip
        if "successfully received" not in again or node.containers.list(all=True, filters={
                "label": f"{FAULT_PROJECT_LABEL}={PROJECT}"}):  # fmt: skip
            raise Failed(f"after `lab fault clear`: {again.strip()} (or its helper is left)")
        # (the script stopped above unless the helper ran on that node and the exchange failed)
        found["partition"] = {"client": number, "node": away["node"], "cut": cut.returncode != 0}
        say(f"partition of client {number}: its helper on {away['node']}, cut, then cleared")
        bench = json.loads(
            lab(
                manager,
                "bench",
                "--swarm",
                "--design",
                "select",
                "--duration",
                "1",
                "--warmup",
                "0.3",
                "--concurrency",
                "4",
                "--json",
            ).stdout
        )
        load, served = bench["load"], bench["server"]["stats"]["completed"]
        found["bench"] = {"requests": load["requests"], "errors": load["errors_total"],
                          "served": served, "rps": load["throughput_rps"]}  # fmt: skip
        if load["errors_total"] or not load["requests"] or served < load["requests"]:
            raise Failed(f"the bench: {found['bench']}")
        say(f"bench: {load['throughput_rps']:,.0f} req/s, {load['requests']} verified, "
            f"{served} served by the server's count, no error")  # fmt: skip
        lab(manager, "down", "--swarm", "--volumes")
        for other in engines[1:]:
            if other.images.list(name=images.lab.split(":")[0]):
                raise Failed("`lab down --swarm` left the image it loaded on a worker node")
        say("lab down --swarm: the stack and the images it loaded are gone")
    finally:
        if not keep:
            teardown(engine)
    return found


def teardown(engine: docker.DockerClient) -> None:
    """Remove the rehearsal's nodes (and their /var/lib/docker volumes) and its network."""
    from docker.errors import APIError, NotFound

    label = {"label": f"{ROLE_LABEL}=swarm-node"}
    for node in engine.containers.list(all=True, filters=label):
        with contextlib.suppress(APIError, NotFound):
            node.remove(force=True, v=True)
    for network in engine.networks.list(names=[NETWORK]):
        with contextlib.suppress(APIError, NotFound):
            network.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="swarm nodes (2 or more)")
    parser.add_argument("--clients", type=int, default=2, help="client tasks")
    parser.add_argument("--keep", action="store_true", help="leave the nodes for a look")
    parser.add_argument("--json", action="store_true", help="print what was found as JSON")
    options = parser.parse_args()
    if options.nodes < 2 or options.clients < 1:
        parser.error("--nodes must be 2 or more and --clients 1 or more")
    try:
        found = rehearse(options.nodes, options.clients, options.keep)
    except (Failed, LabError) as exc:
        print(f"rehearsal failed: {exc}", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(found))
    say("rehearsal passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
