"""Processes a server starts: forking a child that can never fall back into the parent's loop,
knowing when the parent is gone, and reaping with an explanation."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable

from lab.sockets import signals

# Named exit codes of the processes a server forks (gunicorn's habit: a code says what happened).
EXIT_OK = 0
EXIT_CRASHED = 1  # an unexpected exception in the child (its traceback went to stderr)
EXIT_PARENT_GONE = 4  # the parent died before the child could start

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``signum`` when the parent dies, so no worker outlives a server
    that was SIGKILLed. SIGKILL, not SIGTERM: a worker would treat SIGTERM as "finish your
    connection, then leave" and linger as an orphan holding the listening socket, so new
    clients would connect to a server that is gone. The check after it covers a parent that
    died before the prctl()."""
    _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


def fork(child: Callable[[], int], keep_fds: Iterable[int] = ()) -> int:
    """fork(); in the child run ``child()`` and end the process with its return value.

    The child keeps stdin/stdout/stderr and ``keep_fds`` and closes every other descriptor it
    inherited: a fork copies them all (close-on-exec does not apply without an exec), and a
    copy of a connection left in a long-lived worker keeps that connection open — the client
    waits for an EOF that only comes when the worker dies. A keep-list cannot forget one.

    All signals are blocked around fork() so that none is handled in the child while it still
    shares the parent's signal pipe; the child drops that pipe, takes default dispositions
    (SIGINT ignored: Ctrl-C reaches the whole process group and the parent coordinates the
    shutdown), asks to die with its parent, then unblocks. stdout is flushed first, or buffered
    output would be printed twice.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    mask = signals.block_all()
    try:
        pid = os.fork()
    except OSError:
        signals.restore(mask)
        raise
    if pid:
        signals.restore(mask)
        return pid
    code = EXIT_CRASHED
    try:
        signal.set_wakeup_fd(-1)
        close_all_but(keep_fds)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        die_with_parent(parent)
        signals.restore(mask)
        code = child()
    except BaseException:
        traceback.print_exc()
    finally:
        # os._exit, never return or sys.exit: the child must not unwind into the parent's
        # accept loop, nor run its atexit handlers or flush buffers inherited from it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def close_all_but(keep: Iterable[int]) -> None:
    """Close every descriptor from 3 up except ``keep`` (close_range(2) where available)."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def reap() -> list[tuple[int, int]]:
    """Every child that has ended, as (pid, wait status); never blocks."""
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        ended.append((pid, status))
    return ended
