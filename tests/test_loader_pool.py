"""Loaders kept between runs: a pool's processes, and the load service that holds one."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import ServerFactory, descendants

from lab.measure.config import make_config
from lab.measure.load import LoaderPool, run_load


def test_a_pool_serves_consecutive_runs_with_the_same_loader_processes(
    start_server: ServerFactory,
) -> None:
    server = start_server("multi-accept", "--workers", "2")
    pool = LoaderPool()
    try:
        results, pids = [], []
        for workload in ("connect-per-request", "persistent"):
            config = make_config(
                "127.0.0.1", port=server.port, workload=workload, concurrency=4, processes=2,
                requests=200, duration=10, warmup=0,
            )  # fmt: skip
            results.append(run_load(config, pool=pool))
            pids.append(sorted(loader.proc.pid for loader in pool.idle))
        assert pids[0] == pids[1] and len(pids[0]) == 2  # no new process for the second run
        for result in results:
            assert (result.requests, result.errors_total) == (200, 0), result.to_dict()["errors"]
        assert results[0].connections >= 200 > results[1].connections  # each its own workload
    finally:
        pool.close()


def test_the_load_service_answers_each_request_and_keeps_its_loaders(
    start_server: ServerFactory,
) -> None:
    server = start_server("iterative")
    config = make_config(
        "127.0.0.1", port=server.port, concurrency=2, processes=2, requests=50, duration=10,
        warmup=0,
    ).to_dict()  # fmt: skip
    service = subprocess.Popen(
        [sys.executable, "-m", "lab.measure.service"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert service.stdin is not None and service.stdout is not None
    try:
        children = []
        for _ in range(2):
            service.stdin.write(json.dumps({"config": config}) + "\n")
            service.stdin.flush()
            answer = json.loads(service.stdout.readline())
            assert answer["result"]["requests"] == 50, answer
            children.append(sorted(descendants(service.pid)))
        assert children[0] == children[1] and len(children[0]) == 2
        service.stdin.write('{"config": {"port": "nonsense"}}\n')
        service.stdin.flush()
        assert "error" in json.loads(service.stdout.readline())  # one line, and it goes on
    finally:
        service.stdin.close()
        assert service.wait(30) == 0
    assert not descendants(service.pid)


def test_the_load_service_keeps_a_target_only_while_its_name_resolves_to_it() -> None:
    """On Swarm a switch gives the server task a new address under the same name: the service
    resolves afresh when the name no longer points at the address it kept."""
    import socket

    from lab.measure.service import _still
    from lab.measure.target import Target

    here = Target("localhost", 12345, socket.AF_INET, ("127.0.0.1", 12345))
    moved = Target("localhost", 12345, socket.AF_INET, ("127.0.0.9", 12345))
    gone = Target("no-such-host.invalid", 12345, socket.AF_INET, ("127.0.0.1", 12345))
    assert _still(here, 2.0)
    assert not _still(moved, 2.0)
    assert not _still(gone, 2.0)
