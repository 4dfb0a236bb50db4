"""The multi-node rehearsal (scripts/swarm_rehearsal.py): a swarm of Docker-in-Docker nodes on
this machine, the lab deployed across them by the lab CLI, tasks on two nodes, the original
exchange from a client on another node than the server's, a short bench, and nothing left.

About three minutes on a 2-core machine, beyond CI's budget beside the rest: `make test` leaves
it out (marker ``rehearsal``) and runs the single-node form (test_swarm.py); `make rehearsal`
runs this one. It touches neither the host's swarm state nor its lab."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import docker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.rehearsal, pytest.mark.timeout(1200)]


def test_the_lab_runs_across_a_swarm_of_two_nodes_and_leaves_nothing(
    lab_image: str, docker_engine: docker.DockerClient
) -> None:
    swarm_before = (docker_engine.info().get("Swarm") or {}).get("LocalNodeState")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/swarm_rehearsal.py"), "--nodes", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = json.loads(run.stdout.splitlines()[-2])  # the JSON, then "rehearsal passed"
    nodes = {task["node"] for task in found["tasks"]}
    assert nodes == {"node-1", "node-2"}, found["tasks"]
    server = next(t for t in found["tasks"] if "_server." in t["task"])
    assert server["node"] == "node-1"  # --server-node
    # A fault on a client task of the other node: its helper ran there, through that engine.
    assert found["partition"]["node"] == "node-2" and found["partition"]["cut"], found
    bench = found["bench"]
    assert bench["errors"] == 0 and bench["requests"] > 0, bench
    assert bench["served"] >= bench["requests"], bench  # the server's own count
    # Nothing of the rehearsal is left, and the host's swarm state is as it was.
    left = docker_engine.containers.list(all=True, filters={"label": "org.lab.role=swarm-node"})
    assert left == [], [c.name for c in left]
    assert not docker_engine.networks.list(names=["lab-rehearsal"])
    assert (docker_engine.info().get("Swarm") or {}).get("LocalNodeState") == swarm_before
