"""The spawn design's worker program: echo one connection on descriptors 0 and 1, then exit.

Started per connection as ``python3 -I -S spawn_worker.py [--idle-timeout S] [--trace]``:
``-I`` ignores the environment and the user's site directory, ``-S`` skips ``site`` (no scan of
site-packages). It imports nothing from the ``lab`` package, so what a connection costs is a real
interpreter start-up, not a package import. If descriptor 3 is open it writes one statistics
record there (the server's report pipe); trace lines go to stderr.
"""

import os
import select
import sys

BUFFER_SIZE = 64 * 1024


def main(argv: list[str]) -> int:
    idle_timeout = 60.0
    if "--idle-timeout" in argv:
        idle_timeout = float(argv[argv.index("--idle-timeout") + 1])
    trace = "--trace" in argv
    pid = os.getpid()
    # 0 and 1 are the same socket; non-blocking so that a client that stops reading cannot
    # hold us in write() past the idle timeout.
    os.set_blocking(0, False)
    readable = select.poll()
    readable.register(0, select.POLLIN)
    writable = select.poll()
    writable.register(1, select.POLLOUT)
    bytes_in = bytes_out = 0
    outcome = "completed"
    try:
        while True:
            if not readable.poll(idle_timeout * 1000):
                outcome = "idle_timeout"
                break
            try:
                data = os.read(0, BUFFER_SIZE)
            except BlockingIOError:
                continue
            if not data:
                break
            bytes_in += len(data)
            if trace:
                shown = data[:200].decode("utf-8", "backslashreplace").replace("\0", "\\0")
                sys.stderr.write(f"[{pid}] The message from client: {shown}\n")
                sys.stderr.flush()
            view = memoryview(data)
            while view:
                if not writable.poll(idle_timeout * 1000):
                    raise TimeoutError
                try:
                    n = os.write(1, view)
                except BlockingIOError:
                    continue
                bytes_out += n
                view = view[n:]
            if trace:
                sys.stderr.write(f"[{pid}] send() is OK\n")
                sys.stderr.flush()
    except TimeoutError:
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
