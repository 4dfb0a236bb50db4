"""Bring your own server: any echo server a user wrote, measured like a peer.

``lab bench --server-cmd 'CMD … {port}'`` and ``lab compare --peer NAME='CMD … {port}'`` give a
command line; the lab chooses the port and puts it where ``{port}`` stands (and the address to
listen on where ``{host}`` stands, if anywhere). The command is split as a shell would split it
(:func:`shlex.split`) but run without a shell, and the placeholders are replaced in each word
after the split, so a port or a host never changes the words.

* Locally (:class:`LocalCommand`): ``{port}`` is a free port on loopback, ``{host}`` is
  127.0.0.1; the server runs in a session of its own, is measured from its process tree (as a
  peer is), and is stopped with SIGTERM to that session, then SIGKILL to whatever is left.
* In the containers: ``{port}`` is 12345, ``{host}`` 0.0.0.0; the command runs in a container of
  the lab image in the server's place, as a peer does (``lab.orchestration.bench``). What it
  needs must be in the image (python3, socat, bash …) or mounted: each ``--mount PATH`` is a
  host file or folder, mounted read-only at the same absolute path; when the current folder is
  one of them (or inside one), the container starts there, so ``--mount .`` and a command
  naming ``./my_server.py`` work alike in both places.

Either way the bench waits until something accepts on the port, or fails with one line: the
command exited (with its last line on stderr), or nothing accepted in time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from lab.measure.bench import BenchError
from lab.measure.ports import quiet_port

PORT = "{port}"
HOST = "{host}"
READY_TIMEOUT = 20.0  # seconds for the user's server to accept connections
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
POLL = 0.05
#: What a user server may be called: a row in the report, part of a container's name.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
EXAMPLE = "'python3 my_echo.py --port {port}'"


class UserServerError(BenchError):
    """The user's server command cannot be run or measured: one line naming the fix."""


def parse_command(command: str, option: str = "--server-cmd") -> list[str]:
    """The command's words, checked: not empty, splittable, with a ``{port}``."""
    if not command.strip():
        raise UserServerError(
            f"{option} is empty: give the command that starts your server, e.g. {EXAMPLE}"
        )
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise UserServerError(f"{option} {command!r}: {exc}: quote it as a shell would") from None
    if not any(PORT in word for word in words):
        raise UserServerError(
            f"{option} {command!r} has no {PORT}: the lab chooses the port, so put {PORT} where "
            f"your server takes its port, e.g. {EXAMPLE}"
        )
    return words


def check_name(name: str, taken: Iterable[str], option: str = "--peer") -> str:
    """A user server's name: a plain word, none of the lab's designs, variants or peers (nor
    another user server's)."""
    if not NAME.fullmatch(name):
        raise UserServerError(
            f"{option} {name!r}: name it with letters, digits, '.', '_' or '-' (at most 63), "
            "starting with a letter or digit"
        )
    if name in set(taken):
        raise UserServerError(
            f"{option} {name!r}: that name is taken (a design, a peer or another server of "
            "yours): choose another"
        )
    return name


def parse_peer(text: str, taken: Iterable[str]) -> tuple[str, str]:
    """``NAME=CMD`` → (NAME, CMD), both checked."""
    name, sep, command = text.partition("=")
    if not sep or not name.strip():
        raise UserServerError(f"--peer {text!r}: give NAME=CMD, e.g. --peer mine={EXAMPLE}")
    name = name.strip()
    check_name(name, taken)
    parse_command(command, f"--peer {name}=")
    return name, command


def resolve_mounts(paths: Sequence[str | Path]) -> tuple[str, ...]:
    """``--mount`` paths as absolute host paths, each one existing."""
    found = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if not resolved.exists():
            raise UserServerError(
                f"--mount {path}: no such file or folder here: give a path that exists"
            )
        found.append(str(resolved))
    return tuple(dict.fromkeys(found))


def working_dir(mounts: Sequence[str], cwd: Path | None = None) -> str | None:
    """Where the server's container starts: the current folder when a mount holds it."""
    here = (cwd or Path.cwd()).resolve()
    for mount in mounts:
        if here == Path(mount) or Path(mount) in here.parents:
            return str(here)
    return None


def substitute(words: Sequence[str], port: int, host: str) -> list[str]:
    return [word.replace(PORT, str(port)).replace(HOST, host) for word in words]


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range (lab.measure.ports says why), else any free one."""
    port = quiet_port(host)
    if port:
        return port
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def check_program(program: str) -> str:
    """The local program a command starts, found as the shell would find it."""
    found = shutil.which(program)
    if found is None:
        where = "is not an executable file" if os.sep in program else "is not on PATH"
        raise UserServerError(
            f"the server command's program {program!r} {where}: install it, or give its path"
        )
    return found


def never_accepted(command: str, port: int, timeout: float) -> UserServerError:
    return UserServerError(
        f"{command!r} did not accept on port {port} within {timeout:g} s: does it listen on {PORT}?"
    )


def exited(command: str, code: int | None, last: str) -> UserServerError:
    said = f": {last}" if last else " (nothing on stderr)"
    return UserServerError(
        f"{command!r} exited at once (code {code}){said} — run it by hand to see why"
    )


def listening(tables: Iterable[str], port: int) -> str | None:
    """From ``/proc/net/tcp`` and ``tcp6`` texts: "any" if a socket listens on ``port`` on every
    address (or a non-loopback one), "loopback" if only on loopback, else None."""
    seen = None
    for text in tables:
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":
                continue
            address, _, hex_port = fields[1].rpartition(":")
            if int(hex_port, 16) != port:
                continue
            if address in ("0100007F", "00000000000000000000000001000000"):
                seen = seen or "loopback"
            else:
                return "any"
    return seen


class LocalCommand:
    """The user's server as a local process in a session of its own (its tree is measured)."""

    def __init__(self, command: str, pin: bool = False) -> None:
        self.command = command
        self.words = parse_command(command)
        self.pin = pin
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stderr: deque[str] = deque(maxlen=20)
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, host: str = "127.0.0.1", timeout: float | None = None) -> int:
        """Start it on a free port; returns the port once it accepts connections there (within
        ``timeout``, by default :data:`READY_TIMEOUT`)."""
        timeout = READY_TIMEOUT if timeout is None else timeout
        self.port = free_port(host)
        argv = substitute(self.words, self.port, host)
        argv[0] = check_program(argv[0])
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if self.pin else None,
            )
        except OSError as exc:
            raise UserServerError(
                f"cannot run {argv[0]} ({exc.strerror}): check the server command"
            ) from None
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        try:
            self._wait_accepting(host, timeout)
        except UserServerError:
            self.stop()
            raise
        return self.port

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").strip()
            if line:
                self.stderr.append(line)

    def last_stderr(self) -> str:
        if self._reader is not None:
            self._reader.join(1.0)  # the process has exited: its last lines are on their way
        return self.stderr[-1] if self.stderr else ""

    def _wait_accepting(self, host: str, timeout: float) -> None:
        assert self.proc is not None
        wait_accepting(
            lambda: _accepts(host, self.port),
            self.proc.poll,
            lambda code: exited(self.command, code, self.last_stderr()),
            never_accepted(self.command, self.port, timeout),
            timeout,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to its session, SIGKILL after ``timeout`` s (:data:`STOP_TIMEOUT`); then
        SIGKILL to whatever of the session is left (children the server left running): nothing
        stays behind."""
        if self.proc is None:
            return
        timeout = STOP_TIMEOUT if timeout is None else timeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(1.0)  # stderr's end: the session's last writer is gone


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_accepting(
    accepts: Callable[[], bool],
    exit_code: Callable[[], int | None],
    on_exit: Callable[[int | None], UserServerError],
    on_timeout: UserServerError,
    timeout: float,
) -> None:
    """Poll until ``accepts()``; the server's exit or the timeout is a :class:`UserServerError`."""
    deadline = time.monotonic() + timeout
    while True:
        code = exit_code()
        if code is not None:
            raise on_exit(code)
        if accepts():
            return
        if time.monotonic() > deadline:
            raise on_timeout
        time.sleep(POLL)
