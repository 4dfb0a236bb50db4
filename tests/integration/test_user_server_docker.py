"""A user's own server in the containers (``lab bench --server-cmd … --mount PATH``): its
command in a container of the lab image, in the server's place as ``bakawali``, the mounted
program run from the folder it was named in; the bench's count of messages against what the
server itself echoed. And peer-asyncio in the containers, and the mistakes only a container
shows (a program the image lacks, a server on loopback only, one that exits at once)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from containers import bench_backend

from lab.measure import usercmd
from lab.measure.bench import ServerSpec, bench
from lab.measure.config import make_config
from lab.orchestration import stack
from lab.orchestration.bench import SERVER_HOST, DockerBackend

if TYPE_CHECKING:
    import docker

TESTS = Path(__file__).resolve().parents[1]  # holds user_echo.py, mounted into the container
SIZE = 49


@pytest.fixture(scope="module")
def backend(
    module_project: str, lab_image: str, docker_engine: docker.DockerClient
) -> Iterator[DockerBackend]:
    """One lab for the module (2 clients), its bench backend; all of it removed at the end."""
    with bench_backend(docker_engine, module_project, clients=2) as backend:
        yield backend


def fixed_load(requests: int) -> object:
    # No warm-up and a fixed count: every message of the run is in the measured window.
    return make_config(
        SERVER_HOST,
        workload="persistent",
        per_connection=50,
        requests=requests,
        size=SIZE,
        concurrency=4,
        duration=60.0,
        warmup=0.0,
        processes=1,
    )


@pytest.mark.timeout(600)
def test_a_users_server_runs_in_the_servers_place_and_is_counted_exactly(
    backend: DockerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Named relative to the current folder, which --mount holds: the container starts there.
    monkeypatch.chdir(TESTS)
    command = "python3 user_echo.py {port} --host {host}"
    spec = ServerSpec("mine", command=command, mounts=usercmd.resolve_mounts(["."]))
    requests = 2000
    result = bench(backend, spec, fixed_load(requests)).to_dict()  # type: ignore[arg-type]

    container = backend.peer
    assert container is not None
    container.reload()
    # the lab's image, on the lab's network as bakawali, the mount read-only at the same path
    assert (
        container.attrs["Config"]["Image"]
        == stack.server_container(backend.engine, backend.project).attrs["Config"]["Image"]
    )
    assert container.attrs["Config"]["WorkingDir"] == str(TESTS)
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts[str(TESTS)]["RW"] is False
    (network,) = container.attrs["NetworkSettings"]["Networks"].values()
    assert SERVER_HOST in (network.get("Aliases") or [])

    # What the server counted itself, printed when it is stopped (SIGTERM through tini).
    container.stop(timeout=10)
    lines = container.logs(stdout=True, stderr=False).decode().splitlines()
    own = json.loads(next(line for line in lines if line.startswith("count "))[6:])

    load, cost = result["load"], result["server"]
    assert result["design"] == "mine" and result["server_command"] == command
    assert result["server_mounts"] == [str(TESTS)]
    assert load["parts"] == 2 and load["errors_total"] == 0 and load["unfinished"] == 0
    echoed, remainder = divmod(own["bytes"], SIZE)
    assert remainder == 0
    assert echoed == requests == load["requests"] == cost["requests"]
    assert own["connections"] >= load["connections"]
    assert cost["cpu_s"] > 0 and cost["memory_peak_bytes"] > 0  # from its container's cgroup
    assert cost["stats"] == {}


@pytest.mark.timeout(600)
def test_peer_asyncio_runs_in_the_containers(backend: DockerBackend) -> None:
    config = make_config(SERVER_HOST, concurrency=4, duration=0.5, warmup=0.2, processes=1)
    result = bench(backend, ServerSpec("peer-asyncio"), config).to_dict()
    assert result["design"] == "peer-asyncio"
    assert result["load"]["requests"] > 0 and result["load"]["errors_total"] == 0
    assert result["server"]["cpu_s_per_1000"] > 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("command", "mounted", "fragments"),
    [
        ("no-such-program {port}", False, ["'no-such-program' is not in the lab image", "--mount"]),
        (
            shlex.join(["python3", "-c", "import sys; sys.exit('no config file')", "{port}"]),
            False,
            ["exited at once (code 1)", "no config file"],
        ),
        # no --host {host}: it listens on the container's loopback, out of the clients' reach
        (f"python3 {TESTS / 'user_echo.py'} {{port}}", True, ["loopback only", "{host}"]),
    ],
)
def test_a_users_server_that_cannot_serve_the_clients_is_one_line(
    backend: DockerBackend, command: str, mounted: bool, fragments: list[str]
) -> None:
    mounts = (str(TESTS),) if mounted else ()
    config = make_config(SERVER_HOST, concurrency=1, duration=0.2, warmup=0.0, processes=1)
    with pytest.raises(usercmd.UserServerError) as caught:
        bench(backend, ServerSpec("mine", command=command, mounts=mounts), config)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert backend.peer is None  # its container is gone
    assert not [c for c in stack.containers(backend.engine, backend.project) if stack.foreign(c)]
