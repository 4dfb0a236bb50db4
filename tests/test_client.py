"""``lab client`` and :mod:`lab.sockets.client`: the common echo client, on loopback only.

Servers here are tiny threaded ones started per test on port 0, each with one deliberate
behaviour (faithful, byte-by-byte, corrupting, closing early, silent), plus the chapter's
original C server and client built from ``tests/c`` as oracles.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from cprograms import build
from harness import recv_exactly
from typer.testing import CliRunner, Result

from lab.cli.client import client
from lab.sockets import client as sockclient

CHAPTER_MESSAGE = "This is a test message from a stupid client lol!"
# Guards against a hang only (pytest-timeout is the backstop); never a performance assertion.
GUARD = 15.0

Handler = Callable[[socket.socket, threading.Event], None]


# --- helpers: loopback servers ----------------------------------------------------------------


def drain_until_eof(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass


class LoopbackServer:
    """Listens on ``host`` port 0; runs ``handler(conn, stop)`` in a thread per connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._handler = handler
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(8)
        # A short accept timeout lets the loop notice the stop event.
        self._listener.settimeout(0.05)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.stop = threading.Event()
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        accept_thread.start()
        self._threads.append(accept_thread)

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(GUARD)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handler(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        for thread in list(self._threads):
            thread.join(GUARD)
        self._listener.close()


def echo_handler(conn: socket.socket, stop: threading.Event) -> None:
    """A faithful echo server: everything back until the client closes."""
    while chunk := conn.recv(4096):
        conn.sendall(chunk)


def bytewise_handler(length: int) -> Handler:
    """Reads the whole message, then echoes it one byte per TCP segment."""

    def handler(conn: socket.socket, stop: threading.Event) -> None:
        data = recv_exactly(conn, length)
        # Nagle's algorithm would coalesce the tiny writes; with it off, and a pause between
        # them, each byte leaves in its own segment.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            time.sleep(0.005)
        drain_until_eof(conn)

    return handler


def corrupting_handler(length: int, index: int) -> Handler:
    def handler(conn: socket.socket, stop: threading.Event) -> None:
        data = bytearray(recv_exactly(conn, length))
        data[index] ^= 0x20
        conn.sendall(data)
        drain_until_eof(conn)

    return handler


def short_handler(length: int, keep: int) -> Handler:
    """Reads the whole message (so close() sends FIN, not RST), echoes ``keep`` bytes, closes."""

    def handler(conn: socket.socket, stop: threading.Event) -> None:
        data = recv_exactly(conn, length)
        conn.sendall(data[:keep])

    return handler


def silent_handler(conn: socket.socket, stop: threading.Event) -> None:
    """Accepts and never answers: holds the connection open until the test ends."""
    stop.wait(GUARD)


@pytest.fixture
def serve() -> Iterator[Callable[..., LoopbackServer]]:
    servers: list[LoopbackServer] = []

    def start(handler: Handler, host: str = "127.0.0.1") -> LoopbackServer:
        server = LoopbackServer(handler, host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port that was just bound and released: nothing listens there, so connect is refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- helpers: the CLI -------------------------------------------------------------------------


def run_cli(*args: str, input: str | bytes | None = None, **env: str) -> Result:
    """Invoke ``client`` through a throwaway Typer app, with the LAB_* variables cleared."""
    app = typer.Typer()
    app.command()(client)
    environment: dict[str, str | None] = {"LAB_PORT": None, "LAB_MESSAGE": None}
    environment["LAB_TIMEOUT"] = None
    environment.update(env)
    return CliRunner().invoke(app, list(args), input=input, env=environment)


def assert_one_error_line(result: Result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("lab client: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


def original_lines(message: str, nbytes: int) -> list[str]:
    return [
        f"{nbytes} bytes sent.",
        f"{nbytes} bytes received.",
        f'The sent message: "{message}" successfully received by server and echoed back to client!',
    ]


# --- helpers: the C programs ------------------------------------------------------------------


class Running:
    """A subprocess in its own session, its merged output collected by a reader thread."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.output.append(line)
                self._lines.put(line)
        finally:
            self._lines.put(None)

    def wait_for_line(self, prefix: str) -> str:
        while True:
            try:
                line = self._lines.get(timeout=GUARD)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line; output so far: {self.output}") from None
            if line is None:
                raise AssertionError(f"exited before {prefix!r}; output: {self.output}")
            if line.startswith(prefix):
                return line.rstrip("\n")

    def finish(self) -> int:
        returncode = self.proc.wait(GUARD)
        self._reader.join(GUARD)
        return returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(GUARD)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def running(*cmd: str | Path) -> Iterator[Running]:
    proc = Running([str(part) for part in cmd])
    try:
        yield proc
    finally:
        proc.kill()


@contextlib.contextmanager
def c_iterative_server(connections: int) -> Iterator[tuple[Running, int]]:
    with running(build("iterative_server"), "0", str(connections)) as server:
        port = int(server.wait_for_line("ready port=").removeprefix("ready port="))
        yield server, port


# --- the round trip ---------------------------------------------------------------------------


def test_client_echo_round_trip_prints_original_lines(
    serve: Callable[..., LoopbackServer],
) -> None:
    server = serve(echo_handler)
    result = run_cli("127.0.0.1", "--port", str(server.port), "--message", "hello, echo")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == original_lines("hello, echo", 11)
    assert result.stderr == ""


def test_exchange_returns_what_was_sent_received_and_where(
    serve: Callable[..., LoopbackServer],
) -> None:
    server = serve(echo_handler)
    result = sockclient.exchange("127.0.0.1", server.port, b"abc", timeout=5)
    assert result.sent == result.received == result.message == b"abc"
    assert result.address == ("127.0.0.1", server.port)
    assert result.family == socket.AF_INET
    assert not result.nul


def test_client_sends_terminating_nul_with_nul_flag(
    serve: Callable[..., LoopbackServer],
) -> None:
    seen: list[bytes] = []

    def recording_echo(conn: socket.socket, stop: threading.Event) -> None:
        data = recv_exactly(conn, 49)
        seen.append(data)
        conn.sendall(data)
        drain_until_eof(conn)

    server = serve(recording_echo)
    result = run_cli("127.0.0.1", "-p", str(server.port), "-m", CHAPTER_MESSAGE, "--nul")
    assert result.exit_code == 0, result.output
    assert seen == [CHAPTER_MESSAGE.encode() + b"\0"]
    # 49 bytes on the wire; the message is shown without its NUL.
    assert result.stdout.splitlines() == original_lines(CHAPTER_MESSAGE, 49)


def test_client_reassembles_an_echo_split_across_segments(
    serve: Callable[..., LoopbackServer],
) -> None:
    message = b"split me into many pieces"
    server = serve(bytewise_handler(len(message)))
    result = sockclient.exchange("127.0.0.1", server.port, message, timeout=5)
    assert result.received == message


def test_client_reads_message_from_stdin(serve: Callable[..., LoopbackServer]) -> None:
    server = serve(echo_handler)
    result = run_cli("127.0.0.1", "-p", str(server.port), input="from stdin\nignored line\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == original_lines("from stdin", 10)


def test_client_takes_port_message_and_timeout_from_environment(
    serve: Callable[..., LoopbackServer],
) -> None:
    server = serve(echo_handler)
    result = run_cli(
        "127.0.0.1", LAB_PORT=str(server.port), LAB_MESSAGE="env message", LAB_TIMEOUT="3"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == original_lines("env message", 11)


# --- addresses --------------------------------------------------------------------------------


def test_client_tries_every_address(
    serve: Callable[..., LoopbackServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "localhost" resolving to ::1 first while the server listens on 127.0.0.1 only: the
    # first address is refused and the client must go on to the next.
    server = serve(echo_handler)
    real_getaddrinfo = socket.getaddrinfo
    first_host = "::1" if ipv6_loopback_available() else "127.0.0.1"
    first_port = server.port if first_host == "::1" else closed_port()

    def fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "dual.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [
            *real_getaddrinfo(first_host, first_port, type=socket.SOCK_STREAM),
            *real_getaddrinfo("127.0.0.1", server.port, type=socket.SOCK_STREAM),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    result = sockclient.exchange("dual.test", server.port, b"which address?", timeout=5)
    assert result.address == ("127.0.0.1", server.port)
    assert result.received == b"which address?"


def test_client_names_every_address_tried_when_all_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_getaddrinfo = socket.getaddrinfo
    port = closed_port()

    def fake_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM) * 2

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(sockclient.RefusedError) as caught:
        sockclient.exchange("dual.test", port, b"x", timeout=5)
    assert "tried 2 addresses" in str(caught.value)
    assert caught.value.exit_code == sockclient.EXIT_REFUSED


def test_client_works_over_ipv6_loopback(serve: Callable[..., LoopbackServer]) -> None:
    if not ipv6_loopback_available():
        if os.environ.get("CI"):  # CI's machine has ::1: missing there is a failure
            pytest.fail("no IPv6 loopback (::1) on this host")
        pytest.skip("no IPv6 loopback (::1) on this host (under CI=true this fails)")
    server = serve(echo_handler, host="::1")
    result = run_cli("::1", "-p", str(server.port), "-m", "over six")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == original_lines("over six", 8)
    exchanged = sockclient.exchange("::1", server.port, b"v6", timeout=5)
    assert exchanged.address == ("::1", server.port)
    assert exchanged.family == socket.AF_INET6


# --- failures and their exit codes ------------------------------------------------------------


def test_client_reports_mismatch_when_server_corrupts_a_byte(
    serve: Callable[..., LoopbackServer],
) -> None:
    message = "corrupt me please"
    server = serve(corrupting_handler(len(message), index=8))
    result = run_cli("127.0.0.1", "-p", str(server.port), "-m", message)
    assert_one_error_line(result, 7, "mismatch at byte 8", "8 of 17 bytes matched")


def test_client_reports_short_echo_when_server_closes_early(
    serve: Callable[..., LoopbackServer],
) -> None:
    message = "only half of this comes back"  # 28 bytes
    server = serve(short_handler(len(message), keep=14))
    result = run_cli("127.0.0.1", "-p", str(server.port), "-m", message)
    assert_one_error_line(result, 7, "short echo", "after 14 of 28 bytes")
    with pytest.raises(sockclient.MismatchError) as caught:
        sockclient.exchange("127.0.0.1", server.port, message.encode(), timeout=5)
    assert caught.value.matched == 14
    assert caught.value.received == message.encode()[:14]


def test_client_refused_exit_code() -> None:
    port = closed_port()
    result = run_cli("127.0.0.1", "-p", str(port), "-m", "anyone there?")
    assert_one_error_line(result, 3, "refused", f"is the server running on 127.0.0.1:{port}?")


def test_client_timeout_exit_code(serve: Callable[..., LoopbackServer]) -> None:
    server = serve(silent_handler)
    result = run_cli("127.0.0.1", "-p", str(server.port), "-m", "hello?", "--timeout", "0.5")
    assert_one_error_line(result, 4, "timed out", "after 0 of 6")


def test_client_name_not_found_exit_code() -> None:
    result = run_cli("no-such-host.invalid", "-m", "hello")
    assert_one_error_line(result, 6, "cannot resolve host 'no-such-host.invalid'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-p", "0"], "--port must be between 1 and 65535, got 0"),
        (["-p", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--timeout", "0"], "--timeout must be a positive number"),
        (["--timeout", "-1"], "--timeout must be a positive number"),
    ],
)
def test_client_bad_port_is_a_one_line_usage_error(args: list[str], fragment: str) -> None:
    result = run_cli("127.0.0.1", *args, "-m", "never sent")
    assert_one_error_line(result, 2, fragment)


def test_client_empty_stdin_is_a_usage_error() -> None:
    result = run_cli("127.0.0.1", "-p", "9", input="")
    assert_one_error_line(result, 2, "stdin is empty")


def test_client_errors_are_one_line_with_a_fix() -> None:
    # Every failure class has its own exit code, and the codes are the documented ones.
    codes = {
        sockclient.RefusedError: 3,
        sockclient.TimedOutError: 4,
        sockclient.ResetError: 5,
        sockclient.NameNotFoundError: 6,
        sockclient.MismatchError: 7,
        sockclient.NetworkError: 8,
    }
    for cls, code in codes.items():
        assert issubclass(cls, sockclient.ClientError)
        assert cls.exit_code == code


# --- against the chapter's original C programs ------------------------------------------------


def test_client_against_original_c_iterative_server() -> None:
    with c_iterative_server(connections=1) as (server, port):
        result = run_cli("127.0.0.1", "-p", str(port), "-m", CHAPTER_MESSAGE, "--nul")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == original_lines(CHAPTER_MESSAGE, 49)
        assert server.finish() == 0, server.output
    assert f"The message from client: {CHAPTER_MESSAGE}\n" in server.output
    assert server.output[-1] == "send() is OK\n"


def test_client_reports_reset_when_c_server_reads_only_100_bytes() -> None:
    # The original server does ONE recv() of at most 100 bytes, echoes that and closes.
    # Closing with unread bytes queued makes the kernel send RST, not FIN: the client gets
    # the 100 echoed bytes, then "connection reset by peer".
    with c_iterative_server(connections=1) as (server, port):
        result = run_cli("127.0.0.1", "-p", str(port), "-m", "x" * 150)
        assert server.finish() == 0, server.output
    assert_one_error_line(result, 5, "reset by peer", "after 100 of 150")


def test_original_c_client_against_original_c_server() -> None:
    comclient = build("comclient")
    with c_iterative_server(connections=1) as (server, port):
        with running(comclient, "127.0.0.1", str(port)) as oracle:
            assert oracle.finish() == 0, oracle.output
        assert server.finish() == 0, server.output
    assert oracle.output[:2] == ["socket() is OK\n", "connect() is OK\n"]
    assert "49 bytes sent.\n" in oracle.output
    assert "49 bytes received.\n" in oracle.output
    assert oracle.output[-1] == original_lines(CHAPTER_MESSAGE, 49)[2] + "\n"


def test_original_c_client_fails_on_a_corrupted_echo(
    serve: Callable[..., LoopbackServer],
) -> None:
    # The oracle must be able to say no, or tests built on it prove nothing.
    server = serve(corrupting_handler(49, index=0))
    with running(build("comclient"), "127.0.0.1", str(server.port)) as oracle:
        assert oracle.finish() == 1, oracle.output
    assert "The echo does not match the sent message.\n" in oracle.output
