"""Loader processes: each a fresh ``python -m lab.measure.process``, spoken to in JSON lines.

A loader is a separate program rather than a ``multiprocessing`` child so that it inherits
nothing from its caller — no threads, no locks, no re-import of the caller's ``__main__`` (which
``spawn`` needs guarded) — and so that it runs the same way under ``lab load``, a test, or a
script. The conversation, one JSON object per line:

1. parent → child: the :class:`~lab.measure.loader.LoaderPlan`;
2. child → parent: ``{"ready": true}`` once its buffers are set up;
3. parent → child: ``{"start_at": UNIX_TIME}`` (or end of input: stand down);
4. child → parent: ``{"result": …}`` (a :class:`~lab.measure.result.LoadResult` as a dict), or
   ``{"error": "one line"}``.

After a result the child waits for its next plan (1. again): a :class:`~lab.measure.load.LoaderPool`
keeps loader processes between runs, so a sweep of many short runs does not pay a Python start
per loader per run. End of input at any point: the child exits.

The child ignores SIGINT (Ctrl-C reaches the whole process group; the parent decides) and its
run is bounded by the plan's duration, so it ends by itself even if the parent is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import IO, Any

from lab.measure.config import KV
from lab.measure.errors import LoaderFailed
from lab.measure.loader import Loader, LoaderPlan, raise_descriptor_limit

__all__ = ["LoaderProcess", "gather", "main"]

#: Most bytes a child's message may have (a result with two encoded histograms is a few KiB).
MAX_MESSAGE = 16 * 1024 * 1024


class LoaderProcess:
    """The parent's handle on one loader process."""

    def __init__(self, plan: LoaderPlan | None = None) -> None:
        self.index = plan.index if plan is not None else 0
        # Closed in close(): it outlives this method.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lab.measure.process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            close_fds=True,
        )
        self._buffer = b""
        if plan is not None:
            self.send(plan.to_dict())

    def assign(self, plan: LoaderPlan) -> None:
        """The next run's plan (a process kept by a pool)."""
        self.index = plan.index
        self.send(plan.to_dict())

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise self.failure("stopped reading its input") from None

    def read_available(self) -> dict[str, Any] | None:
        """Read what is there; the next complete message, or None if none is complete yet."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            raise self.failure("exited before reporting")
        self._buffer += chunk
        if len(self._buffer) > MAX_MESSAGE:
            raise self.failure("sent an oversized message")
        if b"\n" not in self._buffer:
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise self.failure(f"sent garbage: {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise self.failure(f"sent garbage: {line[:80]!r}")
        if "error" in message:
            raise LoaderFailed(f"loader process {self.index} failed: {message['error']}")
        return message

    def failure(self, what: str) -> LoaderFailed:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1.0)
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
        code = self.proc.returncode
        return LoaderFailed(
            f"loader process {self.index} {what} (exit code {code}){detail} — "
            "was it killed, or out of memory?"
        )

    def close(self, *, kill: bool = False) -> None:
        """Release the process: give it a moment to exit by itself (it has reported, or sees
        its input end while waiting to start), or with ``kill`` end it at once."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1.0)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        self._stderr.close()


def gather(loaders: list[LoaderProcess], key: str, deadline: float) -> list[Any]:
    """The value of ``key`` in the next message of every loader, in order, by ``deadline``
    (monotonic); :class:`LoaderFailed` if one fails, exits or is late."""
    got: dict[int, Any] = {}
    with selectors.DefaultSelector() as selector:
        for i, loader in enumerate(loaders):
            selector.register(loader.fd, selectors.EVENT_READ, i)
        while len(got) < len(loaders):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = ", ".join(str(i) for i in range(len(loaders)) if i not in got)
                raise LoaderFailed(
                    f"loader process(es) {late} did not report {key!r} in time — the machine "
                    "may be overloaded; try fewer --processes"
                )
            for selected, _ in selector.select(remaining):
                i = selected.data
                message = loaders[i].read_available()
                if message is None:
                    continue
                if key not in message:
                    raise LoaderFailed(f"loader process {i} sent {sorted(message)}, not {key!r}")
                got[i] = message[key]
                selector.unregister(loaders[i].fd)
    return [got[i] for i in range(len(loaders))]


def loader_for(plan: LoaderPlan) -> Loader:
    """The loader for the plan's workload: kv commands, or echoes."""
    if plan.config.workload == KV:
        from lab.measure.kvload import KvLoader

        return KvLoader(plan)
    return Loader(plan)


def main() -> int:
    """The child: ``python -m lab.measure.process`` (reads its plan on stdin)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout

    def say(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        while True:
            line = sys.stdin.readline()
            if not line:
                return 0  # no more plans
            plan = LoaderPlan.from_dict(json.loads(line))
            raise_descriptor_limit(plan.connections + 32)
            loader = loader_for(plan)
            say({"ready": True})
            line = sys.stdin.readline()
            if not line:
                return 0  # the parent stood us down
            start_at = float(json.loads(line)["start_at"])
            say({"result": loader.run(start_at).to_dict()})
    except BrokenPipeError:
        return 1
    except Exception as exc:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            say({"error": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
