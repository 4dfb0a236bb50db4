"""The spawn design's worker program: echo one connection on descriptors 0 and 1, then exit.

Started per connection as ``python3 -I -S spawn_worker.py [--idle-timeout S] [--trace]``:
``-I`` ignores the environment and the user's site directory, ``-S`` skips ``site`` (no scan of
site-packages). It imports nothing from the ``lab`` package, so what a connection costs is a real
interpreter start-up, not a package import. The socket is blocking; its idle timeout is the
kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO``, inherited from the server's listening socket), so a
message costs one read and one write. It writes one statistics record to descriptor 3 (the
server's report pipe) when its connection ends; trace lines go to stderr. The server starts it
with SIGTERM blocked: the server coordinates a stop (its grace period, then SIGKILL), so a
signal sent to every process of the server's cgroup does not cut the connection short. The
server runs its compiled form (``__pycache__/…pyc``): a script named on the command line is
otherwise compiled anew on every start.
"""

import os
import sys

BUFFER_SIZE = 64 * 1024


def main(argv: list[str]) -> int:
    trace = "--trace" in argv
    pid = os.getpid()
    buffers = [bytearray(BUFFER_SIZE)]
    view = memoryview(buffers[0])
    bytes_in = bytes_out = 0
    outcome = "completed"
    try:
        while True:
            n = os.readv(0, buffers)
            if not n:
                break
            bytes_in += n
            if trace:
                shown = bytes(view[: min(n, 200)]).decode("utf-8", "backslashreplace")
                shown = shown.replace("\0", "\\0")
                sys.stderr.write(f"[{pid}] The message from client: {shown}\n")
                sys.stderr.flush()
            sent = 0
            while sent < n:
                sent += os.write(1, view[sent:n])
            bytes_out += sent
            if trace:
                sys.stderr.write(f"[{pid}] send() is OK\n")
                sys.stderr.flush()
    except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO: no progress for the idle timeout
        outcome = "idle_timeout"
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except OSError:
        outcome = "error"
    try:  # noqa: SIM105 (contextlib would cost one more import per connection)
        os.write(3, b"d %d %s %d %d\n" % (pid, outcome.encode(), bytes_in, bytes_out))
    except OSError:
        pass  # not started by the lab's server: nobody collects statistics
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
