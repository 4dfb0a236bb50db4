"""The lab over a real network: a server container (``bakawali``) and client containers that
reach it by name on a private bridge, for every design.

One topology per design serves the exchange tests (module-scoped, reused); the kill tests each
start a fresh one, since they end its server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from containers import (
    ORIGINAL_MESSAGE,
    SERVER_ALIAS,
    TIMEOUT_EXIT_CODES,
    LabClient,
    Topologies,
    Topology,
    wait_until,
)

from lab.sockets.designs import DESIGNS

ALL_DESIGNS = list(DESIGNS)
# The kill tests: every design (each costs a fresh topology and about 5 s).
KILL_DESIGNS = ALL_DESIGNS

THREADS = 20  # concurrent connections per client container
CONCURRENT_BACKLOG = 128  # ≥ every connection the clients open at once (3 × THREADS)
ROUNDS = 5  # exchanges per thread
LOAD_TIMEOUT = 20.0  # the client's own timeout per connect/send/recv: generous (a loaded host;
# the iterative server serves the 60 connections one after another)
STATS_SETTLE = 15.0  # seconds for the server to count every connection as ended

# Runs in a client container: THREADS threads, each doing ROUNDS exchanges of random bytes with
# the lab's own client (a fresh connection each, the echo compared byte for byte). Prints one
# JSON line; exit 0 only if every exchange was verified.
LOAD_SCRIPT = r"""
import json, os, random, sys, threading
from lab.sockets.client import ClientError, exchange

host, threads, rounds, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
lock = threading.Lock()
ok, errors = [0], []

def work(seed):
    rng = random.Random(seed)
    for _ in range(rounds):
        payload = os.urandom(rng.randint(1, 8192))
        try:
            result = exchange(host, message=payload, timeout=timeout)
        except ClientError as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            continue
        with lock:
            if result.received == payload:
                ok[0] += 1
            else:
                errors.append(f"unverified echo of {len(payload)} bytes")

pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
for thread in pool:
    thread.start()
for thread in pool:
    thread.join()
print(json.dumps({"ok": ok[0], "failed": len(errors), "errors": errors[:5]}))
sys.exit(0 if not errors else 1)
"""

# Runs in a client container: the lab client's exchange of the chapter's message, but sending
# only its first 20 bytes, so that it waits (with a 20 s timeout) for an echo that cannot be
# complete. It prints "in progress" once the server echoed those 20 bytes: the server is then in
# the middle of the connection. A failure ends it the way `lab client` ends: one line, exit code.
PARTIAL_SCRIPT = r"""
import socket, sys
from lab.sockets.client import ClientError, exchange

real_sendall, real_recv = socket.socket.sendall, socket.socket.recv

def sendall(self, data, *args):
    real_sendall(self, data[:20], *args)

def recv(self, *args):
    data = real_recv(self, *args)
    if data:
        print("in progress", flush=True)
    return data

socket.socket.sendall, socket.socket.recv = sendall, recv
try:
    exchange(sys.argv[1], message=sys.argv[2].encode(), nul=True, timeout=20)
except ClientError as exc:
    print(f"lab client: error: {exc}", flush=True)
    sys.exit(exc.exit_code)
print("the exchange succeeded, although only part of the message was sent")
"""

# A client whose server vanished may time out (4), be reset (5), find the name gone (6: the
# server's container no longer answers to it), see the server close mid-echo (7: a killed
# process's sockets are closed by the kernel, which sends FIN — a "short echo"), or meet another
# network error (8). What it must not do: hang, succeed, or crash with a traceback.
CLEAN_FAILURES = {4, 5, 6, 7, 8}


@pytest.fixture(scope="module", params=ALL_DESIGNS)
def topology(request: pytest.FixtureRequest, lab_image: str) -> Iterator[Topology]:
    """One server of the design and three clients, shared by this module's tests of it.

    The backlog is the pool designs' default for every design, the iterative one included (its
    own default is the chapter's 5): with 60 connections arriving at once, a backlog of 5 makes
    the kernel answer with SYN cookies, and a client whose first flight is more than one segment
    is then reset (SyncookiesFailed) — the kernel's overload behaviour, not the echo under test.
    """
    with Topologies(lab_image) as make:
        yield make(request.param, clients=3, server_options={"backlog": CONCURRENT_BACKLOG})


def _one_error_line(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("lab client: error:")]


def test_original_exchange_from_every_client(topology: Topology) -> None:
    """The chapter's session: each client container sends the 49-byte message to bakawali."""
    for number, client in enumerate(topology.clients, 1):
        code, output = client.run(["lab", "client", SERVER_ALIAS, "--nul", "-m", ORIGINAL_MESSAGE])
        assert code == 0, f"client {number} → {topology.server.design}: exit {code}\n{output}"
        assert "49 bytes sent." in output, output
        assert "49 bytes received." in output, output
        assert "successfully received" in output, output


def test_concurrent_clients_all_verified(topology: Topology) -> None:
    """Every client container at once, THREADS connections each: all echoes verified, and the
    server counts every connection accepted as completed, none failed."""
    server = topology.server
    before = server.stats()

    def load(client: LabClient) -> tuple[int, str]:
        argv = [SERVER_ALIAS, str(THREADS), str(ROUNDS), f"{LOAD_TIMEOUT:g}"]
        return client.run(["python3", "-c", LOAD_SCRIPT, *argv], bound=45)

    with ThreadPoolExecutor(len(topology.clients)) as pool:
        results = list(pool.map(load, topology.clients))

    total = 0
    for number, (code, output) in enumerate(results, 1):
        assert code not in TIMEOUT_EXIT_CODES, f"client {number} hung:\n{output}"
        report = json.loads(output.strip().splitlines()[-1])
        assert code == 0 and report["failed"] == 0, f"client {number} ({server.design}): {report}"
        assert report["ok"] == THREADS * ROUNDS, report
        total += report["ok"]
    assert total == len(topology.clients) * THREADS * ROUNDS

    # A client has its echo before the server sees it close: let the last ones be counted.
    seen: list[dict[str, Any]] = []

    def settled() -> bool:
        seen[:] = [server.stats()]
        return bool(seen[0]["in_flight"] <= 0)

    wait_until(settled, STATS_SETTLE, interval=0.5)
    stats = seen[0]
    assert stats["design"] == server.design, stats
    assert stats["accepted"] == stats["completed"], stats
    assert stats["failed"] == {}, stats
    assert stats["completed"] - before["completed"] >= total, (before, stats)
    assert stats["completed"] >= total, stats


@pytest.mark.parametrize("design", KILL_DESIGNS)
def test_killed_server_gives_clients_a_clear_error(topologies: Topologies, design: str) -> None:
    """SIGKILL the server's container while a client waits for its echo: that client ends with
    one error line and its exit code (no hang, no traceback), and so does a new client."""
    # Once the server's container is gone, nobody answers for its name on the (internal)
    # network: a 1 s resolver timeout keeps the new client's failure quick.
    topology = topologies(design, clients=2, client_dns_timeout=1)
    waiting, late = topology.clients

    running = waiting.start_exec(["python3", "-c", PARTIAL_SCRIPT, SERVER_ALIAS, ORIGINAL_MESSAGE])
    assert running.wait_for("in progress", timeout=20), (
        f"the exchange never got under way:\n{running.output}\nserver:\n{topology.server.tail()}"
    )
    topology.server.kill()

    code, output = running.result(timeout=45)
    assert code not in TIMEOUT_EXIT_CODES, f"the client hung until `timeout` ended it:\n{output}"
    assert code in CLEAN_FAILURES, f"exit {code}:\n{output}"
    assert "Traceback" not in output, output
    assert len(_one_error_line(output)) == 1, output

    # The server is gone: a new client fails as cleanly, whatever the way it fails.
    code, output = late.run(
        ["lab", "client", SERVER_ALIAS, "--timeout", "3", "-m", "anyone there?"], bound=30
    )
    assert code not in TIMEOUT_EXIT_CODES, f"the new client hung:\n{output}"
    assert code in {3, *CLEAN_FAILURES} - {7}, f"exit {code}:\n{output}"
    assert "Traceback" not in output, output
    assert len(_one_error_line(output)) == 1, output
