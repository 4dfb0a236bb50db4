"""The C reference peers (lab-cpeer: peer-c-prefork, -fork, -epoll and -sendmsg) on loopback:
they echo byte for byte, keep the process structure their design promises, stop cleanly, and
fail with one line — and they run through the same peers module and bench as the Python peers.

The binary is built with ``make cpeer`` (a no-op when it is up to date); no gcc is a failure, not
a skip: these peers are the ceilings the designs are measured against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import (
    ORIGINAL_MESSAGE,
    RunningServer,
    ServerFactory,
    children_of,
    descendants,
    echo_once,
    wait_until,
    zombies_of,
)

from lab.measure import compare
from lab.measure.bench import LocalBackend, ServerSpec, bench
from lab.measure.config import make_config
from lab.measure.peers import C_PEERS, PEERS

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "lab" / "measure" / "cpeer" / "peer.c"
MODES = ["prefork", "fork", "epoll", "sendmsg"]
POOLED = ["prefork", "epoll", "sendmsg"]
READY_LINE = re.compile(
    r"ready design=peer-c-(?P<mode>\w+) address=(?P<address>\S+) port=(?P<port>\d+) "
    r"pid=(?P<pid>\d+) backlog=(?P<backlog>\d+)"
)


@pytest.fixture(scope="module")
def cpeer() -> Path:
    """build/bin/lab-cpeer, built by `make cpeer` when missing or older than peer.c."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.fail("make and gcc are needed to build the C peers (make host-tools)")
    result = subprocess.run(
        ["make", "-s", "cpeer"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"make cpeer failed:\n{result.stdout}{result.stderr}"
    binary = ROOT / "build" / "bin" / "lab-cpeer"
    assert os.access(binary, os.X_OK)
    return binary


@pytest.fixture
def use_cpeer(cpeer: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The peers module (and the bench, which runs it) uses the binary just built."""
    monkeypatch.setenv("LAB_CPEER", str(cpeer))
    return cpeer


def start(
    start_server: ServerFactory, cpeer: Path, mode: str, *args: str, host: str = "127.0.0.1"
) -> RunningServer:
    command = [str(cpeer), mode, "--host", host, "--port", "0", *args]
    return start_server(f"peer-c-{mode}", command=command)


def echo_streaming(port: int, payload: bytes, rcvbuf: int | None = None) -> bytes:
    """Send ``payload`` from a thread while reading the echo (a large echo fills both sides'
    buffers: sending it all first would deadlock); ``rcvbuf`` shrinks the client's receive
    buffer so that the server's writes go out in parts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        while chunk := sock.recv(1024 if rcvbuf else 65536):
            received += chunk
        sender.join(30)
        return bytes(received)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] in ("Z", "X")


# --- building ----------------------------------------------------------------------------------


def test_peer_c_compiles_warning_free_and_statically(tmp_path: Path, cpeer: Path) -> None:
    output = tmp_path / "lab-cpeer"
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o", str(output), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr  # the linker's too
    with open(output, "rb") as binary:
        assert b"/ld-linux" not in binary.read()  # no program interpreter: static


def test_every_c_peer_is_registered() -> None:
    assert {f"c-{mode}" for mode in MODES} <= set(PEERS)
    assert {f"peer-c-{mode}" for mode in MODES} <= set(compare.all_servers())
    assert compare.server_spec("peer-c-prefork", 3).options == ("--workers", "3")
    assert compare.server_spec("peer-c-epoll", 3).options == ("--workers", "3")
    assert compare.server_spec("peer-c-fork", 3).options == ()
    pooled = {name for name, (_mode, pooled) in C_PEERS.items() if pooled}
    assert pooled == {"c-prefork", "c-epoll", "c-sendmsg"}


# --- the echo ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_c_peer_echoes_byte_for_byte(start_server: ServerFactory, cpeer: Path, mode: str) -> None:
    server = start(start_server, cpeer, mode, "--workers", "2")
    assert echo_once(server.port) == ORIGINAL_MESSAGE  # 49 bytes, the NUL included
    big = os.urandom(1 << 20)  # 1 MiB: many reads and writes of at most 64 KiB
    assert echo_streaming(server.port, big) == big


@pytest.mark.parametrize("mode", MODES)
def test_c_peer_finishes_partial_writes(
    start_server: ServerFactory, cpeer: Path, mode: str
) -> None:
    """A client that reads slowly through a small receive buffer: the server's writes block or
    stop short (epoll: EAGAIN, then EPOLLOUT) and every byte still comes back in order."""
    server = start(start_server, cpeer, mode)
    payload = os.urandom(2 << 20)
    assert echo_streaming(server.port, payload, rcvbuf=4096) == payload


@pytest.mark.parametrize("mode", MODES)
def test_c_peer_serves_fifty_concurrent_clients(
    start_server: ServerFactory, cpeer: Path, mode: str
) -> None:
    server = start(start_server, cpeer, mode, "--workers", "2")
    clients = 50
    connected = threading.Barrier(clients, timeout=30)

    def one(index: int) -> bool:
        payload = f"client {index:02d} ".encode() * 200 + ORIGINAL_MESSAGE
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            connected.wait()  # all 50 are connected before any sends
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := sock.recv(65536):
                received += chunk
        return bytes(received) == payload

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    assert all(results), f"{results.count(False)} of {clients} echoes did not match"
    stats = server.stats()
    assert (stats["event"], stats["design"], stats["pid"]) == (
        "stats",
        f"peer-c-{mode}",
        server.pid,
    )
    assert stats["accepted"] == clients


def test_c_peer_listens_on_ipv6(start_server: ServerFactory, cpeer: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        if os.environ.get("CI"):  # CI's machine has ::1: missing there is a failure
            pytest.fail("no IPv6 loopback (::1) on this host")
        pytest.skip("no IPv6 loopback (::1) on this host (under CI=true this fails)")
    server = start(start_server, cpeer, "epoll", host="::1")
    assert server.host == "::1"
    assert echo_once(server.port, host="::1") == ORIGINAL_MESSAGE


# --- processes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", POOLED)
def test_pool_peer_runs_n_worker_processes(
    start_server: ServerFactory, cpeer: Path, mode: str
) -> None:
    server = start(start_server, cpeer, mode, "--workers", "3")
    workers = children_of(server.pid)
    assert len(workers) == 3, workers
    assert not zombies_of(server.pid)
    for _ in range(10):
        assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert sorted(children_of(server.pid)) == sorted(workers)  # the same workers served them


def test_pool_peer_replaces_a_killed_worker(start_server: ServerFactory, cpeer: Path) -> None:
    server = start(start_server, cpeer, "prefork", "--workers", "2")
    first, second = sorted(children_of(server.pid))
    os.kill(first, signal.SIGKILL)
    assert wait_until(
        lambda: len(children_of(server.pid)) == 2 and first not in children_of(server.pid)
    )
    assert second in children_of(server.pid)
    assert echo_once(server.port) == ORIGINAL_MESSAGE


def test_fork_peer_forks_per_connection_and_leaves_no_zombies(
    start_server: ServerFactory, cpeer: Path
) -> None:
    server = start(start_server, cpeer, "fork")
    assert children_of(server.pid) == []  # idle: no children
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        assert len(children_of(server.pid)) == 1  # the child serving this connection
    with ThreadPoolExecutor(8) as pool:
        echoes = list(pool.map(lambda _i: echo_once(server.port), range(200)))
    assert echoes == [ORIGINAL_MESSAGE] * 200
    # Every child exits after its connection; the parent reaps it (a bound, not a measurement).
    assert wait_until(lambda: not children_of(server.pid), timeout=30), (
        f"children left: {children_of(server.pid)}, zombies: {zombies_of(server.pid)}"
    )
    assert server.stats()["accepted"] == 201


def test_fork_peer_at_its_child_cap_leaves_new_connections_in_the_backlog(
    start_server: ServerFactory, cpeer: Path
) -> None:
    """--max-children (default 256, as the lab's fork design): at the cap the parent accepts
    nothing, so a container's pids limit never makes fork() fail and reset a connection; the
    waiting connection is served once a child has ended."""
    server = start(start_server, cpeer, "fork", "--max-children", "2")
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    for sock in held:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as waiting:
        waiting.sendall(b"queued")  # the kernel completed the handshake: it sits in the backlog
        assert server.stats()["accepted"] == 2  # not accepted: the parent is at its cap
        assert len(children_of(server.pid)) == 2
        held.pop().close()  # a child ends; reaped, it frees a place
        assert waiting.recv(64) == b"queued"
    held.pop().close()
    assert server.stats()["accepted"] == 3


# --- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("mode", MODES)
def test_stop_signal_exits_0_and_leaves_no_process(
    start_server: ServerFactory, cpeer: Path, mode: str, signum: int
) -> None:
    server = start(start_server, cpeer, mode, "--workers", "2")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
        held.sendall(b"in flight")
        assert held.recv(64) == b"in flight"  # a worker (or child) is serving it now
        family = descendants(server.pid)
        assert len(family) == (1 if mode == "fork" else 2)
        assert server.stop(signum) == 0
    assert all(gone(pid) for pid in family), [p for p in family if not gone(p)]
    stats = server.final_stats()  # printed on the way out
    assert stats["design"] == f"peer-c-{mode}" and stats["accepted"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_workers_die_with_a_killed_parent(
    start_server: ServerFactory, cpeer: Path, mode: str
) -> None:
    server = start(start_server, cpeer, mode, "--workers", "2")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        family = descendants(server.pid)
        assert family
        os.kill(server.pid, signal.SIGKILL)  # no chance to stop them: PR_SET_PDEATHSIG does
        server.wait()
        assert wait_until(lambda: all(gone(pid) for pid in family), timeout=10)


def test_sigusr1_prints_a_stats_line_and_the_peer_goes_on(
    start_server: ServerFactory, cpeer: Path
) -> None:
    server = start(start_server, cpeer, "prefork")
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    line = server.wait_for_line(r"^ready")
    assert line == server.lines[0]
    stats = server.stats()
    assert stats == {"event": "stats", "design": "peer-c-prefork", "pid": server.pid, "accepted": 1}
    assert echo_once(server.port) == ORIGINAL_MESSAGE  # SIGUSR1 stopped nothing
    assert len(children_of(server.pid)) == 2


# --- the ready line and errors -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ready_line_is_exactly_one_line(
    start_server: ServerFactory, cpeer: Path, mode: str
) -> None:
    server = start(start_server, cpeer, mode, "--backlog", "7")
    match = READY_LINE.fullmatch(server.lines[0])
    assert match, server.lines
    assert match["mode"] == mode and match["address"] == "127.0.0.1"
    assert int(match["port"]) == server.port > 0
    assert int(match["pid"]) == server.pid and match["backlog"] == "7"
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert server.stop() == 0
    ready = [line for line in server.lines if line.startswith("ready")]
    assert ready == [server.lines[0]]


def test_port_in_use_exits_3_with_one_line(cpeer: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [str(cpeer), "prefork", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert (
        lines[0].startswith("lab-cpeer: error: ") and f"port {port} is already in use" in lines[0]
    )
    assert "--port" in lines[0]  # it names the fix


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["threads"],
        ["prefork", "--workers", "0"],
        ["prefork", "--port", "seventy"],
        ["prefork", "--port", "70000"],
        ["epoll", "--nope", "1"],
        ["fork", "--host"],
        ["fork", "--max-children", "0"],
    ],
)
def test_bad_usage_exits_2(cpeer: Path, args: list[str]) -> None:
    result = subprocess.run(
        [str(cpeer), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2, result
    assert result.stdout == "" and "lab-cpeer: error: " in result.stderr


def test_an_address_not_here_exits_3(cpeer: Path) -> None:
    result = subprocess.run(
        [str(cpeer), "fork", "--host", "192.0.2.1", "--port", "0"],  # TEST-NET-1: not ours
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        "lab-cpeer: error: 192.0.2.1 is not an address of this host: use 0.0.0.0, :: or one "
        "of its own"
    ]


# --- through the peers module and the bench ----------------------------------------------------


def peers_command(peer: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lab.measure.peers", peer, "--host", "127.0.0.1", *args]


def test_peers_module_execs_the_c_peer(start_server: ServerFactory, use_cpeer: Path) -> None:
    server = start_server(
        "peer-c-prefork", command=peers_command("c-prefork", "--port", "0", "--workers", "2")
    )
    # exec'd: the process started is the C program itself, and its ready line is the only one
    assert Path(f"/proc/{server.pid}/exe").resolve() == use_cpeer.resolve()
    assert READY_LINE.fullmatch(server.lines[0])
    assert len(children_of(server.pid)) == 2
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert server.stop() == 0


def test_peers_module_passes_no_workers_to_the_fork_peer(
    start_server: ServerFactory, use_cpeer: Path
) -> None:
    server = start_server(
        "peer-c-fork", command=peers_command("c-fork", "--port", "0", "--workers", "4")
    )
    assert Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")[1:-1] == [
        b"fork",
        b"--host",
        b"127.0.0.1",
        b"--port",
        b"0",
        b"--backlog",
        b"128",
    ]
    assert echo_once(server.port) == ORIGINAL_MESSAGE


def test_peers_module_without_the_binary_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "LAB_CPEER": str(tmp_path / "absent")}
    result = subprocess.run(
        peers_command("c-epoll", "--port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lab peers: error: the C peers are not built"), (
        lines
    )
    assert lines[0].endswith("run make cpeer")


@pytest.fixture
def tiny_config() -> Iterator[object]:
    yield make_config("127.0.0.1", port=1, concurrency=4, duration=0.5, warmup=0.2, processes=1)


@pytest.mark.parametrize("name", [f"peer-c-{mode}" for mode in MODES])
def test_local_bench_measures_a_c_peer(use_cpeer: Path, tiny_config: object, name: str) -> None:
    spec = compare.server_spec(name, 2)
    result = bench(LocalBackend(), spec, tiny_config).to_dict()  # type: ignore[arg-type]
    load, server = result["load"], result["server"]
    assert result["design"] == name and result["backend"] == "local"
    assert load["requests"] > 0 and load["errors_total"] == 0
    assert server["cpu_s_per_1000"] is not None and server["memory_peak_bytes"] > 0
    assert server["stats"] == {}  # a peer keeps no statistics of ours


def test_local_bench_of_peer_c_prefork_with_two_workers(
    use_cpeer: Path, tiny_config: object
) -> None:
    spec = ServerSpec("peer-c-prefork", ("--workers", "2"))
    result = bench(LocalBackend(), spec, tiny_config)  # type: ignore[arg-type]
    assert result.load["requests"] > 0 and result.load["errors_total"] == 0
    assert json.loads(json.dumps(result.to_dict()))["server_options"] == ["--workers", "2"]
