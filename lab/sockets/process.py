"""Processes a server starts: forking a child that can never fall back into the parent's loop,
knowing when the parent is gone, and reaping with an explanation."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable

from lab.sockets import signals

# Named exit codes of the processes a server forks (gunicorn's habit: a code says what happened).
EXIT_OK = 0  # done: told to stop, retired, or its one connection ended
EXIT_CRASHED = 1  # an unexpected exception in the child (its traceback went to stderr)
EXIT_PARENT_GONE = 4  # the parent died before the child could start

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_OPEN_MAX = os.sysconf("SC_OPEN_MAX")  # read once: sysconf() is a getrlimit() call


_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int | None, signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``signum`` when the parent dies, so no worker or child outlives a
    server that was SIGKILLed. SIGKILL, not SIGTERM: a worker would treat SIGTERM as "finish
    your connection, then leave" and linger as an orphan. Given ``parent_pid``, the check after
    it covers a parent that died before the prctl() (a long-lived worker pays that one more
    system call; a child with one connection does not: at worst it serves it and exits)."""
    _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


def fork(
    child: Callable[[], int],
    keep_fds: Iterable[int] = (),
    long_lived: bool = False,
    parent: int | None = None,
    highest_fd: int | None = None,
) -> int:
    """fork(); in the child run ``child()`` and end the process with its return value.

    The child keeps stdin/stdout/stderr and ``keep_fds`` and closes every other descriptor it
    inherited: a fork copies them all (close-on-exec does not apply without an exec), and a
    child holding the listening socket would keep it open after the parent closed it — new
    clients would queue where nobody accepts. A keep-list cannot forget one; ``close_range()``
    makes it one or two system calls.

    The child inherits the parent's signal handlers and detaches from the parent's wake-up pipe
    and queue (no system call, see :mod:`lab.sockets.signals`); ``child()`` makes itself their
    owner. Every child asks to die with its parent. stdout is flushed first, or buffered output
    would be printed twice. A caller that forks per connection passes its own ``parent`` pid
    (one getpid() less) and the ``highest_fd`` it may hold besides ``keep_fds`` (one
    close_range() less when the kept one is above it).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if parent is None:
        parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = EXIT_CRASHED
    try:
        signals.detach_after_fork()
        close_all_but(keep_fds, highest_fd)
        die_with_parent(parent if long_lived else None)
        code = child()
    except BaseException:
        import traceback  # only when a child crashed: not in every forked process's image

        traceback.print_exc()
    finally:
        # os._exit, never return or sys.exit: the child must not unwind into the parent's
        # accept loop, nor run its atexit handlers or flush buffers inherited from it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def close_all_but(keep: Iterable[int], highest_fd: int | None = None) -> None:
    """Close every descriptor from 3 up except ``keep`` (close_range(2) where available);
    nothing above ``highest_fd`` is open besides ``keep``, when given."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            if fd > low:
                os.closerange(low, fd)
            low = fd + 1
    if highest_fd is None or highest_fd >= low:
        os.closerange(low, _OPEN_MAX)


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
