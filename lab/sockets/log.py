"""Output of a server process: the ready line, trace lines, notices, statistics.

Every line is written whole and flushed at once (stdout may be a pipe, and a process that forks
with unflushed output would print it twice). ``--trace`` lines read like the original programs'
("accept() is OK") with the pid in front, so interleaved processes stay readable.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import TextIO


class Log:
    def __init__(self, trace: bool, stream: TextIO | None = None) -> None:
        self.tracing = trace
        self.stream = stream if stream is not None else sys.stdout

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def trace(self, text: str) -> None:
        if self.tracing:
            self.line(f"[{os.getpid()}] {text}")

    def line_now(self, text: str) -> None:
        """A line from a signal handler: one write() straight to the descriptor, so it can
        never re-enter a buffered write that the interrupted code was in the middle of."""
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.line(text)  # no descriptor (a test's StringIO): nothing to interrupt
            return
        data = (text + "\n").encode()
        while data:
            data = data[os.write(fd, data) :]

    def notice(self, text: str) -> None:
        """Something an operator should know (a worker died, descriptors ran out)."""
        self.line(f"[{os.getpid()}] lab: {text}")

    def error(self, text: str) -> None:
        sys.stderr.write(f"lab serve: error: {text}\n")
        sys.stderr.flush()

    def flush(self) -> None:
        self.stream.flush()
        sys.stderr.flush()


def printable(data: bytes, limit: int = 200) -> str:
    """A received message as text for the trace: the original prints it with %s, which stops at
    the terminating NUL; we show the NUL as \\0 and escape other control bytes."""
    text = data[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text).replace("\\x00", "\\0")
    return text + (f"… ({len(data)} bytes)" if len(data) > limit else "")
