"""Signals: who reacts, and when.

Every process installs one Python-level handler, :func:`_dispatch`, for the signals it cares
about; the handler calls the process's current *owner* (:func:`set_owner`). A forked child
inherits the installed handlers, so making itself the owner costs no system call.

Two kinds of owner:

* A supervising loop (a parent that waits in ``poll()``) owns a :class:`SignalQueue`: the
  handler only records the signal (gunicorn's habit: handlers queue, the loop acts), and
  ``signal.set_wakeup_fd`` makes the C-level handler write a byte into a pipe the loop polls,
  so the wait ends. The *record* is the truth, the byte only a wake-up: a forked child that gets
  a signal before it dropped the wakeup fd writes a byte to its parent's pipe, which then wakes
  for nothing and goes back to sleep.
* A process that serves connections in blocking system calls (``lab.sockets.serving``) reacts in
  the handler itself: PEP 475 retries an interrupted ``recv``/``accept`` *after running the
  handler*, so the handler is the only code that runs while the process waits.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from types import FrameType

# Signals whose dispositions a spawned program must get back as SIG_DFL: Python ignores
# SIGPIPE, we ignore SIGINT in workers, and ignored dispositions survive exec().
RESET_ON_EXEC = frozenset(
    {
        signal.SIGPIPE,
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGCHLD,
        signal.SIGUSR1,
        signal.SIGHUP,
        signal.SIGALRM,
    }
)
# The order a loop handles what arrived together: stop requests before child exits, so a
# worker that left because the whole process group was told to stop is not taken for news.
PRIORITY: dict[int, int] = {
    signal.SIGTERM: 0,
    signal.SIGINT: 0,
    signal.SIGALRM: 1,
    signal.SIGUSR1: 2,
}

_owner: Callable[[int], None] | None = None


class Interrupted(Exception):
    """Raised by a signal handler, only inside a wait marked interruptible: it aborts a
    blocking call that PEP 475 would otherwise retry after the handler."""


def _dispatch(signum: int, frame: FrameType | None) -> None:
    if _owner is not None:
        _owner(signum)


def install(signums: Iterable[int], owner: Callable[[int], None]) -> None:
    """Route ``signums`` to ``owner`` (one sigaction each: once per process, not per fork)."""
    set_owner(owner)
    for signum in signums:
        signal.signal(signum, _dispatch)


def set_owner(owner: Callable[[int], None] | None) -> None:
    """Who reacts to the installed signals from now on (no system call)."""
    global _owner
    _owner = owner


class SignalQueue:
    """A supervising loop's signals: recorded by the handler, handled by the loop."""

    def __init__(self, signums: Iterable[int]) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A full pipe would drop a byte, not block a handler: fine, the loop is already awake.
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self.signums = tuple(signums)
        self._pending: list[int] = []
        # Set by a loop that waits in a blocking call instead of poll() (lab.sockets.blocking):
        # then the handler also raises Interrupted, to end that wait.
        self.interruptible = False
        install(self.signums, self.record)

    def record(self, signum: int) -> None:
        if signum not in self._pending:
            self._pending.append(signum)
        if self.interruptible:
            self.interruptible = False
            raise Interrupted

    @property
    def recorded_list(self) -> list[int]:
        """The list the handler appends to (the same object for the queue's life): a loop may
        test it for emptiness with no call."""
        return self._pending

    def fileno(self) -> int:
        return self._read

    def recorded(self) -> bool:
        """Whether a signal was recorded and not yet taken (no system call): for a loop whose
        wake-up byte may have gone to another pipe (uvloop's, before the lab's took it back)."""
        return bool(self._pending)

    def fds(self) -> tuple[int, int]:
        """Both ends of the pipe (the descriptors the server holds, for fork's close_range)."""
        return self._read, self._write

    def pending(self) -> list[int]:
        """Signals received since the last call, each once, stop requests first."""
        while True:  # empty the wake-up pipe: the bytes were only there to end the poll()
            try:
                if len(os.read(self._read, 512)) < 512:
                    break  # a short read emptied it: no second read to hear EAGAIN
            except BlockingIOError:
                break
        # Take what is recorded without losing what lands meanwhile: the Python handler can run
        # after any call here (CPython checks for signals when a call returns), so a copy then
        # ``clear()`` would drop a signal recorded between the two — spawn's stream of SIGCHLD
        # once swallowed a SIGUSR1 that way. Deleting only the copied prefix keeps anything the
        # handler appended after the copy, for the next call (its byte is in the pipe still).
        pending = self._pending
        taken = pending[:]
        del pending[: len(taken)]
        return sorted(taken, key=lambda s: PRIORITY.get(s, 3))


def detach_after_fork() -> None:
    """In a forked child: stop writing the parent's wake-up pipe and stop feeding its queue.
    (No system call: the wakeup fd is a variable of the signal module.)"""
    signal.set_wakeup_fd(-1)
    set_owner(None)


def handler_name(signum: int) -> str:
    """``SIGTERM`` → ``handle_term``: the method a loop dispatches to."""
    return "handle_" + signal.Signals(signum).name.removeprefix("SIG").lower()


def block_all() -> set[int]:
    """Block every signal; returns the previous mask for :func:`restore`."""
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
