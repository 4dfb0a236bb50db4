"""The common echo client: the chapter's ``comclient``, without its bugs.

The original C client makes one ``connect()`` to an IPv4 address, one ``send()`` and one
``recv()``, and assumes both moved the whole message. TCP promises neither: it is a byte
stream, so ``send()`` may accept only part of a buffer and ``recv()`` returns whatever has
arrived so far (the echo can come back in several pieces). This client:

* resolves the host with ``getaddrinfo`` (a name, an IPv4 or an IPv6 literal) and tries
  every address in order until one connects — ``localhost`` may resolve to ``::1`` first
  while the server listens on ``127.0.0.1`` only;
* sends with ``sendall`` (which loops over partial sends for us);
* loops on ``recv`` until the whole echo is back, or the server closes, and compares it
  byte for byte;
* bounds the connect and every I/O call by one timeout, so a silent server cannot hang it.

With ``nul=True`` it appends the terminating ``b"\\0"`` the original sends (its
``strlen(msg) + 1``): the chapter's message is then 49 bytes.

:class:`KvSession` speaks the kv service instead (``--service kv``, lab.sockets.kv): one
connection, a command line out, its reply line back, as many times as asked.

Exit codes (each :class:`ClientError` subclass carries its own as ``exit_code``):

* 0 ``EXIT_OK`` — the echo matched what was sent;
* 2 ``EXIT_USAGE`` — bad command-line usage (reported by the CLI, never raised here);
* 3 ``EXIT_REFUSED`` — connection refused: nothing listens on HOST:PORT;
* 4 ``EXIT_TIMEOUT`` — the connect, or a send/recv, outlasted the timeout;
* 5 ``EXIT_RESET`` — the peer reset (or had closed) the connection mid-exchange;
* 6 ``EXIT_NAME_NOT_FOUND`` — the host did not resolve (``getaddrinfo`` failed);
* 7 ``EXIT_MISMATCH`` — the echo differs, or is short (the server closed after N of M bytes);
* 8 ``EXIT_NETWORK`` — any other network error (unreachable host or network, …).
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, TextIO

__all__ = [
    "DEFAULT_MESSAGE",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "EXIT_MISMATCH",
    "EXIT_NAME_NOT_FOUND",
    "EXIT_NETWORK",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_RESET",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "ClientError",
    "Exchange",
    "KvSession",
    "MismatchError",
    "NameNotFoundError",
    "NetworkError",
    "RefusedError",
    "ResetError",
    "TimedOutError",
    "exchange",
    "print_exchange",
    "report_lines",
    "resolve",
]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4
EXIT_RESET = 5
EXIT_NAME_NOT_FOUND = 6
EXIT_MISMATCH = 7
EXIT_NETWORK = 8

DEFAULT_PORT = 12345
DEFAULT_TIMEOUT = 5.0
#: The chapter's message; with its terminating NUL it is 49 bytes.
DEFAULT_MESSAGE = b"This is a test message from a stupid client lol!"

# recv() asks for at most this much at a time; the kernel hands back what it has.
_RECV_CHUNK = 65536


class ClientError(Exception):
    """A failed exchange. ``str(error)`` is one line naming the problem and the likely fix."""

    exit_code: ClassVar[int] = EXIT_NETWORK


class RefusedError(ClientError):
    """The host answered the SYN with a RST: no process listens on that port."""

    exit_code: ClassVar[int] = EXIT_REFUSED


class TimedOutError(ClientError):
    """Connect, send or recv did not complete within the timeout."""

    exit_code: ClassVar[int] = EXIT_TIMEOUT


class ResetError(ClientError):
    """The peer reset the connection (or had closed it when we sent)."""

    exit_code: ClassVar[int] = EXIT_RESET


class NameNotFoundError(ClientError):
    """``getaddrinfo`` could not resolve the host."""

    exit_code: ClassVar[int] = EXIT_NAME_NOT_FOUND


class MismatchError(ClientError):
    """The echo differs from what was sent, or is shorter (the server closed early)."""

    exit_code: ClassVar[int] = EXIT_MISMATCH

    def __init__(self, message: str, *, expected: bytes, received: bytes) -> None:
        super().__init__(message)
        self.expected = expected
        self.received = received
        self.matched = _common_prefix(expected, received)


class NetworkError(ClientError):
    """Any other socket error: unreachable host or network, address not available, …"""

    exit_code: ClassVar[int] = EXIT_NETWORK


@dataclass(frozen=True)
class Exchange:
    """A successful exchange: what went out, what came back, and where."""

    host: str
    port: int
    #: The address actually connected to: ``(ip, port)`` (IPv6 sockaddrs trimmed to 2 items).
    address: tuple[str, int]
    family: socket.AddressFamily
    #: The message as given, without the terminating NUL.
    message: bytes
    #: The bytes sent: the message, plus ``b"\\0"`` when ``nul`` was asked for.
    sent: bytes
    received: bytes

    @property
    def nul(self) -> bool:
        return len(self.sent) == len(self.message) + 1


def exchange(
    host: str,
    port: int = DEFAULT_PORT,
    message: bytes = DEFAULT_MESSAGE,
    *,
    nul: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Exchange:
    """Connect to ``host:port``, send ``message``, read the whole echo back and verify it.

    Raises a :class:`ClientError` subclass on any failure, and :class:`ValueError` for
    arguments that cannot make sense (port outside 1–65535, timeout ≤ 0, nothing to send).
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1–65535, got {port}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    payload = message + b"\0" if nul else message
    if not payload:
        # Sending nothing would "succeed" without testing anything.
        raise ValueError("nothing to send: the message is empty")

    where = _hostport(host, port)
    sock, address = _connect(host, port, timeout, where)
    family = socket.AddressFamily(sock.family)
    with sock:
        try:
            sock.sendall(payload)
        except OSError as exc:
            raise _io_error(exc, where, timeout, "sending", 0, len(payload)) from exc
        received = _receive_echo(sock, payload, where, timeout)
    return Exchange(
        host=host,
        port=port,
        address=address,
        family=family,
        message=message,
        sent=payload,
        received=received,
    )


class KvSession:
    """One connection to a kv server: :meth:`command` sends a line and returns its reply line
    (without the newline). Every failure is a :class:`ClientError` naming the fix; a server
    that sends the command back is an echo server, and says so."""

    #: A reply line longer than this is no kv reply (SCAN's longest is ~251 KB).
    MAX_REPLY = 1 << 20

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT):
        self.where = _hostport(host, port)
        self.timeout = timeout
        self.sock, self.address = _connect(host, port, timeout, self.where)
        self.buffer = bytearray()

    def command(self, line: bytes) -> bytes:
        request = line.rstrip(b"\r\n") + b"\n"
        try:
            self.sock.sendall(request)
        except OSError as exc:
            raise _io_error(exc, self.where, self.timeout, "sending", 0, len(request)) from exc
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > self.MAX_REPLY:
                raise MismatchError(
                    f"no reply line from {self.where} within {self.MAX_REPLY:,} bytes — is it "
                    "a kv server (--service kv)?",
                    expected=b"",
                    received=bytes(self.buffer[:100]),
                )
            try:
                chunk = self.sock.recv(_RECV_CHUNK)
            except OSError as exc:
                raise _io_error(exc, self.where, self.timeout, "receiving", 0, 0) from exc
            if not chunk:
                raise ResetError(
                    f"{self.where} closed the connection before replying — is it a kv server "
                    "(--service kv) that is still running?"
                )
            self.buffer += chunk
        reply = bytes(self.buffer[:end]).rstrip(b"\r")
        del self.buffer[: end + 1]
        if reply == request[:-1] and not reply.startswith(b"ERR"):
            raise MismatchError(
                f"{self.where} sent the command back: it is an echo server — start it with "
                "--service kv (in the lab: lab switch DESIGN --service kv)",
                expected=b"",
                received=reply,
            )
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KvSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def report_lines(result: Exchange) -> list[str]:
    """The lines the original client prints after a good exchange (message without the NUL)."""
    shown = result.message.decode("utf-8", errors="replace")
    return [
        f"{len(result.sent)} bytes sent.",
        f"{len(result.received)} bytes received.",
        f'The sent message: "{shown}" successfully received by server and echoed back to client!',
    ]


def print_exchange(result: Exchange, file: TextIO | None = None) -> None:
    """Print :func:`report_lines` to ``file`` (default: standard output)."""
    out = sys.stdout if file is None else file
    for line in report_lines(result):
        print(line, file=out)


# --- internals -------------------------------------------------------------------------------


def _hostport(host: str, port: int) -> str:
    # An IPv6 literal needs brackets, or its colons run into the port's.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, port: int, timeout: float) -> list[Any]:
    """getaddrinfo bounded by ``timeout``: the resolver's own retries can take ten seconds
    for a name that has gone (a stopped container), and getaddrinfo takes no timeout. It runs
    in a daemon thread; a lookup still running past the timeout is abandoned."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if failure:
        raise failure[0]
    if worker.is_alive():
        raise socket.gaierror(socket.EAI_AGAIN, f"no answer within {timeout:g} s")
    return result


def _connect(
    host: str, port: int, timeout: float, where: str
) -> tuple[socket.socket, tuple[str, int]]:
    """Try every address ``getaddrinfo`` gives, in its order; return the first that connects."""
    try:
        infos = resolve(host, port, timeout)
    except socket.gaierror as exc:
        raise NameNotFoundError(
            f"cannot resolve host {host!r} ({exc.strerror}) — check the spelling, "
            "or give an IP address such as 127.0.0.1 or ::1"
        ) from exc
    except (UnicodeError, ValueError) as exc:
        # Not even a well-formed name (e.g. an over-long label, an embedded NUL).
        raise NameNotFoundError(
            f"cannot resolve host {host!r} ({exc}) — check the spelling, "
            "or give an IP address such as 127.0.0.1 or ::1"
        ) from exc

    last: OSError | None = None
    tried: list[str] = []
    for family, kind, proto, _canonname, sockaddr in infos:
        tried.append(str(sockaddr[0]))
        sock = socket.socket(family, kind, proto)
        # A timeout puts the socket in "timeout mode": connect, send and recv each raise
        # TimeoutError instead of blocking forever.
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock, (str(sockaddr[0]), int(sockaddr[1]))

    if last is None:  # getaddrinfo never returns an empty list, but be sure
        raise NameNotFoundError(f"host {host!r} resolved to no address — check the spelling")
    # Report the last failure (like socket.create_connection), naming every address tried.
    addresses = ", ".join(tried)
    suffix = f" (tried {len(tried)} addresses: {addresses})" if len(tried) > 1 else ""
    raise _connect_error(last, where, timeout, suffix) from last


def _connect_error(exc: OSError, where: str, timeout: float, suffix: str) -> ClientError:
    if isinstance(exc, ConnectionRefusedError):
        # The host answered our SYN with a RST: it is up, but nothing listens on the port.
        return RefusedError(f"connection refused{suffix} — is the server running on {where}?")
    if isinstance(exc, TimeoutError):
        # No answer at all: a firewall dropping packets, a dead host, or a full backlog.
        return TimedOutError(
            f"timed out after {timeout:g} s connecting to {where}{suffix} — is the host up "
            "and the port not firewalled? (or raise --timeout)"
        )
    if isinstance(exc, ConnectionError):
        return ResetError(
            f"connection to {where} reset while connecting{suffix} ({exc.strerror}) — "
            "the server dropped it; try again, or check its backlog"
        )
    return NetworkError(
        f"cannot connect to {where}{suffix}: {exc.strerror or exc} — "
        "check the address and that the host is reachable from here"
    )


def _io_error(
    exc: OSError, where: str, timeout: float, doing: str, got: int, want: int
) -> ClientError:
    progress = f"after {got} of {want} echoed bytes"
    if isinstance(exc, TimeoutError):
        return TimedOutError(
            f"timed out after {timeout:g} s {doing} ({progress}) — is the server on {where} "
            "an echo server (a kv one waits for a whole line: lab client --kv), and not "
            "stuck? (or raise --timeout)"
        )
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        # A RST from the peer: it crashed, or closed while data it never read was still
        # queued (e.g. a server that reads at most 100 bytes, given more).
        return ResetError(
            f"connection reset by peer {where} while {doing} ({progress}) — the server "
            "closed abruptly; does it read the whole message?"
        )
    return NetworkError(
        f"network error with {where} while {doing} ({progress}): {exc.strerror or exc} — "
        "check the network path to the server"
    )


def _receive_echo(sock: socket.socket, expected: bytes, where: str, timeout: float) -> bytes:
    """Read until ``len(expected)`` bytes are back, the server closes, or they differ."""
    received = bytearray()
    while len(received) < len(expected):
        try:
            chunk = sock.recv(min(_RECV_CHUNK, len(expected) - len(received)))
        except OSError as exc:
            raise _io_error(exc, where, timeout, "receiving", len(received), len(expected)) from exc
        if not chunk:
            # recv() returning b"" is end of stream: the server closed its side (FIN).
            break
        received += chunk
        if not expected.startswith(received):
            # Stop at the first wrong byte: waiting for the rest could only end in a timeout.
            break

    got = bytes(received)
    if got == expected:
        return got
    matched = _common_prefix(expected, got)
    if expected.startswith(got):
        raise MismatchError(
            f"short echo: the server closed the connection after {len(got)} of "
            f"{len(expected)} bytes (all {matched} matched) — it stopped or crashed, or it "
            "does not echo the whole message (the original C server reads at most 100 bytes)",
            expected=expected,
            received=got,
        )
    raise MismatchError(
        f"echo mismatch at byte {matched}: sent {expected[matched : matched + 1]!r}, got "
        f"{got[matched : matched + 1]!r}; {matched} of {len(expected)} bytes matched — "
        f"the server on {where} does not echo faithfully",
        expected=expected,
        received=got,
    )


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
