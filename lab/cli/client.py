"""``lab client``: send one message to an echo server and check the echo (the chapter's comclient),
or, with ``--kv``, commands to a kv server (``--service kv``) and print its replies.

The socket work lives in :mod:`lab.sockets.client`; this module only turns options into a call
and a failure into one line on stderr and an exit code (see that module for the codes).
"""

from __future__ import annotations

import math
import os
from typing import Annotated

import typer

from lab.sockets import client as sockclient

# Read at most this much from stdin: one line is a message, not a file to stream.
MAX_STDIN_MESSAGE = 64 * 1024

_PROG = "lab client"


def client(
    host: Annotated[
        str,
        typer.Argument(
            help="Server host: a name, an IPv4 or an IPv6 address (e.g. 127.0.0.1); in a lab "
            "client container LAB_SERVER (bakawali).",
            envvar="LAB_SERVER",
        ),
    ],
    commands: Annotated[
        list[str] | None,
        typer.Argument(
            help='--kv: commands to send, each one argument ("INCR hits" "GET hits"); none: '
            "one a line from stdin, each reply printed as it comes (interactive).",
            show_default=False,
        ),
    ] = None,
    kv: Annotated[
        bool,
        typer.Option("--kv", help="Speak the kv service (GET, SET, INCR, DEL, SCAN; docs/kv.md)."),
    ] = False,
    port: Annotated[
        int,
        typer.Option("--port", "-p", help="Server TCP port (1–65535).", envvar="LAB_PORT"),
    ] = sockclient.DEFAULT_PORT,
    message: Annotated[
        str | None,
        typer.Option(
            "--message",
            "-m",
            help="Message to send; without it, one line is read from stdin.",
            envvar="LAB_MESSAGE",
            show_default=False,
        ),
    ] = None,
    nul: Annotated[
        bool,
        typer.Option(
            "--nul",
            help='Append the terminating NUL byte, as the original C client does ("\\0").',
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds allowed for the connect and for each send/receive.",
            envvar="LAB_TIMEOUT",
        ),
    ] = sockclient.DEFAULT_TIMEOUT,
) -> None:
    """Send one message to an echo server, read the whole echo back and verify it.

    Exit codes: 0 echo matched, 2 usage, 3 refused, 4 timed out, 5 reset by peer,
    6 host not found, 7 echo mismatch or short, 8 other network error; --kv: 9 a command
    given as an argument was answered ERR.
    """
    if kv:
        if message is not None or nul:
            _error("--message and --nul are for echo: give kv commands as arguments with --kv")
            raise typer.Exit(sockclient.EXIT_USAGE)
        commands = commands or []
        if len(host.split()) > 1:
            # A kv command always has an argument, so a space; a host never does: the command
            # line named no host (`lab client --kv "INCR hits"` in a client container).
            commands, host = [host, *commands], os.environ.get("LAB_SERVER", "")
            if not host:
                _error("no HOST: give it before the commands (lab client HOST --kv 'GET k')")
                raise typer.Exit(sockclient.EXIT_USAGE)
        code = _kv(host, port, commands, timeout=timeout)
    elif commands:
        _error(f"unexpected argument {commands[0]!r}: kv commands need --kv; a message, -m TEXT")
        raise typer.Exit(sockclient.EXIT_USAGE)
    else:
        code = _client(host, port, message, nul=nul, timeout=timeout)
    if code != sockclient.EXIT_OK:
        raise typer.Exit(code)


def _error(text: str) -> None:
    typer.echo(f"{_PROG}: error: {text}", err=True)


def _usable(host: str, port: int, timeout: float) -> bool:
    """Whether the address and timeout can make sense (else one error line said why)."""
    if not 1 <= port <= 65535:
        _error(f"--port must be between 1 and 65535, got {port}")
        return False
    # "not > 0" also rejects NaN, which compares false with everything.
    if not timeout > 0 or math.isinf(timeout):
        _error(f"--timeout must be a positive number of seconds, got {timeout}")
        return False
    if not host:
        _error("HOST is empty — give a name or an address such as 127.0.0.1")
        return False
    return True


def _client(host: str, port: int, message: str | None, *, nul: bool, timeout: float) -> int:
    """Run the exchange; print the original's lines or one error line. Return the exit code."""
    if not _usable(host, port, timeout):
        return sockclient.EXIT_USAGE

    if message is None:
        payload = _read_stdin_line()
        if payload is None:
            return sockclient.EXIT_USAGE
    else:
        # surrogateescape gives back the exact bytes of an argument that was not valid UTF-8.
        payload = message.encode("utf-8", errors="surrogateescape")
    if not payload and not nul:
        _error("the message is empty — give --message TEXT (or --nul to send only the NUL)")
        return sockclient.EXIT_USAGE

    try:
        result = sockclient.exchange(host, port, payload, nul=nul, timeout=timeout)
    except sockclient.ClientError as exc:
        _error(str(exc))
        return exc.exit_code
    for line in sockclient.report_lines(result):
        typer.echo(line)
    return sockclient.EXIT_OK


#: ``lab client --kv``'s exit code when a command given as an argument was answered ``ERR``.
EXIT_KV_ERROR = 9


def _kv(host: str, port: int, commands: list[str], *, timeout: float) -> int:
    """Each command, its reply printed; without commands, stdin's lines (interactive)."""
    if not _usable(host, port, timeout):
        return sockclient.EXIT_USAGE
    stdin = typer.get_binary_stream("stdin")
    interactive = not commands
    if interactive and stdin.isatty():
        typer.echo(
            "kv: one command a line — GET key, SET key value, INCR key [n], DEL key, "
            "SCAN prefix [limit]; Ctrl-D ends",
            err=True,
        )
    try:
        with sockclient.KvSession(host, port, timeout) as session:
            if not interactive:
                failed = False
                for command in commands:
                    reply = session.command(command.encode("utf-8", errors="surrogateescape"))
                    typer.echo(reply.decode("utf-8", errors="replace"))
                    failed = failed or reply.startswith(b"ERR")
                return EXIT_KV_ERROR if failed else sockclient.EXIT_OK
            while line := stdin.readline(MAX_STDIN_MESSAGE + 2):
                if not line.strip():
                    continue
                reply = session.command(line)
                typer.echo(reply.decode("utf-8", errors="replace"))
    except sockclient.ClientError as exc:
        _error(str(exc))
        return exc.exit_code
    return sockclient.EXIT_OK


def _read_stdin_line() -> bytes | None:
    """One line of stdin as bytes, without its line ending; ``None`` (reported) if unusable."""
    stdin = typer.get_binary_stream("stdin")
    if stdin.isatty():
        typer.echo(f"{_PROG}: type the message and press Enter (Ctrl-D to cancel)", err=True)
    # readline(limit) never reads past the limit, so a newline-less flood cannot eat memory;
    # +2 leaves room for a full-size message's "\r\n".
    line = stdin.readline(MAX_STDIN_MESSAGE + 2)
    if not line:
        _error("no message: stdin is empty — give --message TEXT or pipe one line in")
        return None
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    if len(line) > MAX_STDIN_MESSAGE:
        _error(f"the line on stdin is longer than {MAX_STDIN_MESSAGE} bytes — send less")
        return None
    return line
