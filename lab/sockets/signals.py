"""Signals as data: the handler only queues, the loop that owns the process dispatches.

Why not a handler that sets a flag? Since PEP 475 (Python 3.5) a blocking ``accept()``,
``recv()`` or ``recvmsg()`` interrupted by a signal is *retried* after the handler runs, so a
flag set by the handler is not looked at until the next client arrives. Instead every blocking
loop waits in ``poll()`` on its sockets *and* on a pipe: ``signal.set_wakeup_fd`` makes the C-level
handler write the signal number into that pipe, which wakes the poll. The bytes in the pipe are
the queue; :meth:`SignalQueue.pending` reads them and the owner calls ``handle_<name>``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from types import FrameType

# Signals whose dispositions a spawned program must get back as SIG_DFL: Python ignores
# SIGPIPE, we ignore SIGINT in workers, and ignored dispositions survive exec().
RESET_ON_EXEC = frozenset(
    {signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGHUP}
)


def _queue_only(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler does nothing: the wakeup fd already carries the signal number."""


class SignalQueue:
    def __init__(self, signums: Iterable[int]) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A full pipe would drop a byte, not block a handler: fine, the loop is already awake.
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self.signums = tuple(signums)
        for signum in self.signums:
            signal.signal(signum, _queue_only)

    def fileno(self) -> int:
        return self._read

    def fds(self) -> tuple[int, int]:
        """Both ends of the pipe: a forked child closes them (it must not wake its parent)."""
        return self._read, self._write

    def pending(self) -> list[int]:
        """Signal numbers received since the last call, in order, each once."""
        received: list[int] = []
        while True:
            try:
                data = os.read(self._read, 512)
            except BlockingIOError:
                break
            if not data:
                break
            received += [n for n in data if n not in received]
        return received

    def close(self) -> None:
        """Detach from the process (a forked child calls this before making its own queue)."""
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def handler_name(signum: int) -> str:
    """``SIGTERM`` → ``handle_term``: the method a loop dispatches to."""
    return "handle_" + signal.Signals(signum).name.removeprefix("SIG").lower()


def block_all() -> set[int]:
    """Block every signal (around fork(), so none lands in a child still holding the parent's
    wakeup pipe); returns the previous mask for :func:`restore`."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals()))


def restore(mask: Iterable[int]) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def explain_status(status: int) -> str:
    """A wait status in words, e.g. ``killed by SIGKILL — out of memory?``."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        hint = {
            signal.SIGKILL: " — out of memory, or killed by hand?",
            signal.SIGSEGV: " — a crash in native code",
            signal.SIGTERM: " — asked to stop",
        }.get(signal.Signals(signum), "")
        return f"killed by {name}{hint}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"wait status {status}"
