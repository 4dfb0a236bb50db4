"""The C peers in the lab image: /usr/local/bin/lab-cpeer (static, compiled on the host) runs in
the Debian minbase image, started the way `lab bench` starts a peer (``python3 -m
lab.measure.peers …``, locked down as the server is), and a client container gets its echo."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest
from containers import (
    ECHO_PORT,
    ORIGINAL_MESSAGE,
    READY_TIMEOUT,
    ROLE_LABEL,
    SERVER_ALIAS,
    LabClient,
    container_logs,
    run_labels,
)
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy


@pytest.fixture
def network(lab_image: str) -> Iterator[Network]:
    """A private, labelled, internal network (no route out), removed at teardown."""
    net = Network(docker_network_kw={"labels": run_labels(), "internal": True, "driver": "bridge"})
    net.create()
    try:
        yield net
    finally:
        with contextlib.suppress(Exception):
            net.remove()


@pytest.mark.parametrize("mode", ["prefork", "fork", "epoll"])
def test_c_peer_runs_in_the_lab_image_and_echoes(
    lab_image: str, network: Network, mode: str
) -> None:
    peer = DockerContainer(
        lab_image,
        hostname=SERVER_ALIAS,
        labels=run_labels(**{ROLE_LABEL: "peer"}),
        init=True,
        cap_drop=["ALL"],
        read_only=True,
        security_opt=["no-new-privileges:true"],
        pids_limit=1200,
    )
    command = ["python3", "-m", "lab.measure.peers", f"c-{mode}", "--port", str(ECHO_PORT)]
    peer.with_command([*command, "--workers", "2"])
    peer.with_network(network).with_network_aliases(SERVER_ALIAS)
    ready = re.compile(rf"^ready design=peer-c-{mode} ", re.MULTILINE)
    peer.waiting_for(LogMessageWaitStrategy(ready).with_startup_timeout(int(READY_TIMEOUT)))
    client = LabClient(lab_image).with_network(network)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_remove, peer)  # before start(): removed even if it never got ready
        cleanup.callback(_remove, client)
        peer.start()
        client.start()

        code, output = client.run(["lab", "client", SERVER_ALIAS, "--nul", "-m", ORIGINAL_MESSAGE])
        assert code == 0, output
        assert "successfully received by server" in output

        # The peers module exec'd the C program: it is what runs (no python3), with its workers.
        listed = peer.get_wrapped_container().exec_run(["ps", "-eo", "comm="]).output
        assert isinstance(listed, bytes)  # not streamed
        ps = listed.decode()
        names = ps.split()
        assert "python3" not in names, ps
        assert names.count("lab-cpeer") == (1 if mode == "fork" else 3), ps

        peer.get_wrapped_container().stop(timeout=20)  # SIGTERM through tini: a clean stop
        peer.get_wrapped_container().reload()
        assert peer.get_wrapped_container().attrs["State"]["ExitCode"] == 0
        assert '"event": "stats"' in container_logs(peer.get_wrapped_container())


def _remove(container: DockerContainer) -> None:
    # stop() is remove(force=True) in testcontainers: whatever state the container is in.
    with contextlib.suppress(Exception):
        container.stop()
