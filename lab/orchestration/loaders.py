"""Load services kept in the client containers for a whole sweep.

Each client container runs one ``python3 -m lab.measure.service`` (:mod:`lab.measure.service`)
started by ``docker exec`` with its stdin attached; the bench writes one request line per cell
and reads the result line back. Starting ``lab load`` per cell instead — an exec, a Python start,
the CLI's imports and fresh loader processes in every container — cost seconds per cell.

The exec's socket carries the service's stdin one way and, the other way, its stdout and stderr
*multiplexed* (no tty): frames of an 8-byte header — the stream (1 stdout, 2 stderr), three zero
bytes, the payload's length as a big-endian 32-bit number — and the payload.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from lab.measure.config import LoadConfig
from lab.orchestration.engine import LabError

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

SERVICE = ["python3", "-m", "lab.measure.service"]
STDOUT, STDERR = 1, 2
_HEADER = struct.Struct(">BxxxI")


class LateStart(LabError):
    """The shared start time had passed when a service got its request: it did not run."""


class FrameReader:
    """Demultiplexes an exec socket's frames into stdout lines (and the tail of stderr)."""

    def __init__(self, recv: Any) -> None:
        self.recv = recv  # recv(n) -> bytes
        self.pending = b""
        self.stdout = b""
        self.stderr = b""

    def line(self) -> bytes | None:
        """The next stdout line, or None at the end of the stream."""
        while b"\n" not in self.stdout:
            header = self._exactly(_HEADER.size)
            if header is None:
                return None
            stream, size = _HEADER.unpack(header)
            payload = self._exactly(size)
            if payload is None:
                return None
            if stream == STDOUT:
                self.stdout += payload
            elif stream == STDERR:
                self.stderr = (self.stderr + payload)[-4096:]
        line, self.stdout = self.stdout.split(b"\n", 1)
        return line

    def _exactly(self, n: int) -> bytes | None:
        while len(self.pending) < n:
            chunk = self.recv(65536)
            if not chunk:
                return None
            self.pending += chunk
        data, self.pending = self.pending[:n], self.pending[n:]
        return data


class LoaderSession:
    """The load service of one client container."""

    def __init__(self, engine: docker.DockerClient, container: Container) -> None:
        self.name = str(container.name)
        self.exec_id = engine.api.exec_create(
            container.id, SERVICE, stdin=True, stdout=True, stderr=True
        )["Id"]
        raw: Any = engine.api.exec_start(self.exec_id, socket=True)
        self.sock: socket.socket = getattr(raw, "_sock", raw)  # a SocketIO wraps the socket
        self.reader = FrameReader(self.sock.recv)

    def run(self, config: LoadConfig, timeout: float) -> dict[str, Any]:
        """One load; its result as a dict. LateStart, or LabError naming the container."""
        if config.start_at is not None and config.start_at < time.time():
            raise LateStart(f"the loader in {self.name} got its start time too late")
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(json.dumps({"config": config.to_dict()}).encode() + b"\n")
            line = self.reader.line()
        except OSError as exc:
            raise LabError(f"the load service in {self.name} stopped answering: {exc}") from None
        if line is None:
            tail = self.reader.stderr.decode("utf-8", "replace").strip().splitlines()
            raise LabError(
                f"the load service in {self.name} ended: {tail[-1] if tail else 'no output'}"
            )
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise LabError(f"the loader in {self.name} failed: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    def close(self) -> None:
        """End of input: the service stops its loaders and exits."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            self.sock.close()
