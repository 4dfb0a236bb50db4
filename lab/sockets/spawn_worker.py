"""The spawn design's worker program: serve one connection on descriptors 0 and 1, then exit.

Started per connection as ``python3 -I -S spawn_worker.py [--idle-timeout S] [--kv DB] [--trace]``:
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

With ``--kv DB`` it serves the kv protocol instead of the echo: it imports ``kv.py`` (standard
library only) from its own folder as a top-level module, not the ``lab`` package, and opens its
own SQLite connection — one per connection, since the program lives for one connection (the
server made the file and its WAL mode before it started any worker).
"""

import os
import sys

BUFFER_SIZE = 64 * 1024
TYPE_CHECKING = False  # typing is not imported at run time (one more import per connection)


def _abort_if_unsent() -> None:
    """As lab.sockets.echo.abort_if_unsent (not imported: this program starts bare): when the
    cut leaves echo bytes unsent, the exit's close() is a reset, not a FIN queued behind them
    that a client which stopped reading would never get. Imported here, off the echo's path."""
    import fcntl
    import socket
    import struct
    import termios

    try:
        if struct.unpack("i", fcntl.ioctl(1, termios.TIOCOUTQ, b"\0\0\0\0"))[0] > 0:
            sock = socket.socket(fileno=1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.detach()
    except OSError:
        pass


def main(argv: list[str]) -> int:
    trace = "--trace" in argv
    pid = os.getpid()
    if "--kv" in argv:
        bytes_in, bytes_out, outcome = serve_kv(argv[argv.index("--kv") + 1], trace, pid)
        report(pid, outcome, bytes_in, bytes_out)
        return 0
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
        _abort_if_unsent()
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except OSError:
        outcome = "error"
    report(pid, outcome, bytes_in, bytes_out)
    return 0


def report(pid: int, outcome: str, bytes_in: int, bytes_out: int) -> None:
    try:  # noqa: SIM105 (contextlib would cost one more import per connection)
        os.write(3, b"d %d %s %d %d\n" % (pid, outcome.encode(), bytes_in, bytes_out))
    except OSError:
        pass  # not started by the lab's server: nobody collects statistics


def serve_kv(path: str, trace: bool, pid: int) -> tuple[int, int, str]:
    """The kv protocol on descriptors 0 and 1: (bytes in, bytes out, outcome)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.basename(here) == "__pycache__":  # run as its compiled form
        here = os.path.dirname(here)
    sys.path.append(here)  # last: no module of this folder shadows the standard library's
    import sqlite3

    if TYPE_CHECKING:
        from lab.sockets import kv
    else:
        import kv  # lab/sockets/kv.py, as a module of its own (not the lab package)

    bytes_in = bytes_out = 0
    try:
        store = kv.Store(path)
    except (sqlite3.Error, kv.KvError) as exc:
        sys.stderr.write(f"[{pid}] kv: cannot open {path} ({exc}): closing the connection\n")
        return 0, 0, "error"
    session = kv.KvSession(store)
    outcome = "completed"
    try:
        while True:
            data = os.read(0, BUFFER_SIZE)
            if not data:
                break
            bytes_in += len(data)
            if trace:
                shown = data[:200].decode("utf-8", "backslashreplace").replace("\0", "\\0")
                sys.stderr.write(f"[{pid}] The message from client: {shown}\n")
                sys.stderr.flush()
            replies = session.receive(data)
            while True:
                view, sent = memoryview(replies), 0
                while sent < len(replies):
                    n = os.write(1, view[sent:])
                    sent += n
                    bytes_out += n
                if not session.unfed:
                    break
                replies = session.more()
    except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO: no progress for the idle timeout
        outcome = "idle_timeout"
        _abort_if_unsent()
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except OSError:
        outcome = "error"
    store.close()
    return bytes_in, bytes_out, outcome


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
