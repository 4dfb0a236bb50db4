"""``lab client --kv``: commands as arguments or one a line from stdin, replies printed, and the
mistakes (an echo server, nothing listening, echo options) one line with the fix."""

from __future__ import annotations

import socket
from pathlib import Path

from harness import ServerFactory
from typer.testing import CliRunner

from lab.cli.app import app

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kv_server(start_server: ServerFactory, tmp_path: Path) -> int:
    server = start_server("select", "--service", "kv", "--db", str(tmp_path / "kv.sqlite"))
    return server.port


def test_commands_as_arguments_print_one_reply_each(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    port = kv_server(start_server, tmp_path)
    out = runner.invoke(
        app,
        ["client", "127.0.0.1", "-p", str(port), "--kv", "INCR hits", "INCR hits 5", "GET hits"],
    )
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ["1", "6", "6"]


def test_the_data_outlives_the_connection_and_an_err_reply_exits_9(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    port = kv_server(start_server, tmp_path)
    base = ["client", "127.0.0.1", "-p", str(port), "--kv"]
    assert runner.invoke(app, [*base, "SET greeting hello there"]).stdout == "OK\n"
    again = runner.invoke(app, [*base, "GET greeting", "INCR greeting"])
    assert again.exit_code == 9
    assert again.stdout.splitlines() == ["hello there", "ERR not an integer"]


def test_without_commands_stdin_is_read_one_command_a_line(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    port = kv_server(start_server, tmp_path)
    out = runner.invoke(
        app,
        ["client", "127.0.0.1", "-p", str(port), "--kv"],
        input="SET a 1\n\nINCR a\nBOGUS\nSCAN a\n",
    )
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ["OK", "2", "ERR unknown command", "a"]


def test_an_echo_server_is_named_as_such_with_the_fix(start_server: ServerFactory) -> None:
    server = start_server("select")
    out = runner.invoke(app, ["client", "127.0.0.1", "-p", str(server.port), "--kv", "GET x"])
    assert out.exit_code == 7
    (line,) = out.output.splitlines()
    assert "it is an echo server" in line and "--service kv" in line


def test_kv_mistakes_are_one_line_usage_errors() -> None:
    refused = runner.invoke(app, ["client", "127.0.0.1", "-p", str(free_port()), "--kv", "GET x"])
    assert refused.exit_code == 3 and len(refused.output.splitlines()) == 1
    mixed = runner.invoke(app, ["client", "127.0.0.1", "--kv", "-m", "hi", "GET x"])
    assert mixed.exit_code == 2 and "give kv commands as arguments" in mixed.output
    stray = runner.invoke(app, ["client", "127.0.0.1", "GET x"])
    assert stray.exit_code == 2 and "need --kv" in stray.output


def test_without_a_host_the_commands_go_to_lab_server(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """In a client container LAB_SERVER names bakawali: `lab client --kv "INCR hits"`."""
    port = kv_server(start_server, tmp_path)
    args = ["client", "--kv", "-p", str(port), "INCR hits", "GET hits"]
    out = runner.invoke(app, args, env={"LAB_SERVER": "127.0.0.1"})
    assert out.exit_code == 0 and out.stdout.splitlines() == ["1", "1"], out.output
    alone = runner.invoke(app, args, env={"LAB_SERVER": ""})
    assert alone.exit_code == 2 and "give it before the commands" in alone.output
