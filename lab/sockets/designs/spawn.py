"""spawn — start a new process running a worker *program* for every connection.

posix_spawn() creates the process and execs the program in one call (no copy of the server is
ever made, unlike fork-and-continue). The connection becomes the program's stdin and stdout
(descriptors 0 and 1, the inetd convention), so any filter — ``cat`` — is an echo worker. The
server closes its copy at once and goes back to accept(); the program's exit is reaped on
SIGCHLD. The default worker is ``spawn_worker.py`` started with ``python3 -I -S``: interpreter
start-up per connection is the cost this design shows.

The lab's own worker gets the statistics pipe as descriptor 3 and reports one record per
connection; the socket's idle timeout (``SO_RCVTIMEO``, inherited from the listening socket)
makes its blocking reads give up. A ``--worker-cmd`` program gets neither: only descriptors 0,
1 and 2, and a socket with the timeouts cleared (its own business), and its exit status is all
the server learns.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import py_compile
import signal
import socket
import sys
from pathlib import Path

from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.serving import set_timeouts
from lab.sockets.signals import RESET_ON_EXEC
from lab.sockets.stats import COMPLETED, ERROR, SPAWN_FAILED, STOPPED, WORKER_DIED, ReportPipe
from lab.sockets.supervise import ChildProcesses

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

WORKER = Path(__file__).resolve().parent.parent / "spawn_worker.py"
REPORT_FD = 3  # where a spawned worker finds the statistics pipe (an extra inherited descriptor)


def compiled_worker() -> str:
    """The worker's .pyc (compiled now if it is missing or stale and its folder is writable),
    else the source: a script named on the command line is compiled on every start."""
    cached = importlib.util.cache_from_source(str(WORKER))
    try:
        if os.stat(cached).st_mtime >= os.stat(WORKER).st_mtime:
            return cached
    except OSError:
        pass
    try:
        return str(py_compile.compile(str(WORKER), cached, doraise=True))
    except (OSError, py_compile.PyCompileError):
        return str(WORKER)


class SpawnServer(ChildProcesses):
    name = "spawn"
    takes_worker_cmd = True
    summary = "posix_spawn() a worker program per connection, the socket as its stdin/stdout"
    origin = "the chapter's spawn() server (inetd style)"
    family = "fork"
    model = "a program started per connection"
    serial_options = ("--max-children", "1")
    # Per connection with one message (tests/test_syscall_budget.py): the parent's accept4,
    # posix_spawn and wait4, and a whole interpreter start in the child (≈ 290 calls for
    # `python3 -I -S -c pass`; the test also holds the worker to that plus 200).
    syscalls_per_connection: ClassVar[dict[str, int]] = {"total": 500}

    def counter_slots(self) -> int:
        return 0  # spawned programs are not forks of ours: they report on a pipe

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        config.worker_argv()  # raises when the program is not on PATH
        if config.worker_cmd is not None and config.service != "echo":
            raise ConfigError(
                f"--service {config.service} does not apply with --worker-cmd (the program "
                "serves the connection): drop one of them"
            )

    def start(self) -> None:
        custom = self.config.worker_argv()
        self.custom = custom is not None
        if custom is not None:
            self.argv = custom
            self.log.notice(
                "--worker-cmd: the worker program owns each connection; "
                "--idle-timeout does not apply"
            )
        else:
            self.argv = [
                sys.executable,
                "-I",
                "-S",
                compiled_worker(),
                "--idle-timeout",
                str(self.config.idle_timeout),
            ]
            if self.config.service == "kv":
                # The worker program opens the Store itself, one per connection (it serves one
                # connection and exits: that start-up, now with sqlite3's, is the design).
                self.argv += ["--kv", self.config.db_path]
            if self.config.trace:
                self.argv.append("--trace")
            self.report = ReportPipe()

    def ready_details(self) -> dict[str, object]:
        return {"worker": repr(" ".join(self.argv))}

    def accepting(self) -> bool:
        if len(self.children) < self.config.max_children:
            return True
        return self.at_cap(self.config.max_children, "--max-children")

    def process_request(self, fd: int) -> None:
        actions = [(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)]
        if self.report is not None:
            actions.append((os.POSIX_SPAWN_DUP2, self.report.write_fd, REPORT_FD))
        else:
            with socket.socket(self.listener.family, socket.SOCK_STREAM, 0, fileno=fd) as sock:
                set_timeouts(sock, None)
                sock.detach()
        try:
            pid = os.posix_spawn(
                self.argv[0],
                self.argv,
                os.environ,
                file_actions=actions,
                # The child starts with default dispositions (an ignored SIGPIPE, Python's
                # default, or SIGINT would otherwise survive the exec) and no blocked signals —
                # but our worker with SIGTERM blocked: the server coordinates a stop.
                setsigmask=() if self.report is None else (signal.SIGTERM,),
                setsigdef=RESET_ON_EXEC,
                # Its own process group: Ctrl-C at a terminal signals the foreground group,
                # and a program with default SIGINT would die mid-connection; the server
                # coordinates the stop (grace, then SIGKILL) instead.
                setpgroup=0,
            )
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise
            self.stats.failed[SPAWN_FAILED] += 1
            self.log.notice(
                f"posix_spawn() failed ({exc.strerror}): closing the connection, backing off"
            )
            self.acceptor.pause()
            return
        self.children[pid] = "child"
        if self.report is not None:
            self.report.opened(pid)
        if self.tracing:
            self.log.trace(f"posix_spawn() is OK: process {pid} serves the connection")

    def close(self) -> None:
        super().close()
        if self.report is not None:
            self.report.close()

    def child_exited(self, pid: int, status: int, role: str) -> None:
        # Our worker reports how its connection ended; another program (--worker-cmd) does not,
        # and then its exit status is all we know.
        if self.report is not None and self.report.open.pop(pid, 0) <= 0:
            return
        if self.killing:
            outcome = STOPPED
        elif os.WIFEXITED(status):
            outcome = COMPLETED if os.WEXITSTATUS(status) == 0 else ERROR
        else:
            outcome = WORKER_DIED
            if os.WTERMSIG(status) != signal.SIGPIPE:
                self.log.notice(f"worker process {pid} killed by signal {os.WTERMSIG(status)}")
        self.stats.ended(outcome, 0, 0, worker=None)
