"""Where a load run may go, and the one address it uses.

The load generator is for the lab's own hosts only. Before any packet goes to the target, its
name is resolved **once** (``getaddrinfo``) and every address is checked against one rule:

* loopback — ``127.0.0.0/8``, ``::1`` (and ``::ffff:127.x.y.z``) — is allowed;
* an IPv4 address inside a subnet this host is *directly connected* to is allowed: a route in
  ``/proc/net/route`` that is up, has no gateway (0.0.0.0) and is not a default route
  (mask 0). In a client container of the lab, ``bakawali`` is on the container's own bridge
  subnet, so it passes;
* …except a route's *gateway*: a router is not one of the lab's hosts, even when it sits on a
  connected subnet (a container's default gateway is on its own bridge subnet);
* IPv6 beyond loopback: link-local ``fe80::/10`` only;
* anything else is refused, with one line naming the rule.

Of the allowed addresses, each is tried in ``getaddrinfo``'s order (one plain connect, then
close) until one accepts: that address is the run's target, used by every loader process and
every connection. A name is never resolved again during the run.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.measure.errors import (
    LoadError,
    NameNotFound,
    TargetNotAllowed,
    TargetRefused,
    TargetTimedOut,
    TargetUnreachable,
)
from lab.sockets.client import resolve as _resolve

__all__ = [
    "ROUTE_FILE",
    "Routes",
    "Target",
    "is_allowed",
    "parse_routes",
    "read_routes",
    "resolve_target",
]

#: The kernel's IPv4 routing table (module-level so tests can point it at a fixture).
ROUTE_FILE = Path("/proc/net/route")
_RTF_UP = 0x1
_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """The resolved, allowed, reachable address every connection of a run goes to."""

    host: str
    port: int
    family: int
    #: What ``connect()`` takes: ``(ip, port)`` or, for IPv6, ``(ip, port, flowinfo, scope)``.
    sockaddr: tuple[Any, ...]

    @property
    def address(self) -> str:
        return str(self.sockaddr[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "address": self.address,
            "family": "ipv6" if self.family == socket.AF_INET6 else "ipv4",
        }


@dataclass(frozen=True)
class Routes:
    """What the target rule needs from the IPv4 routing table."""

    #: Subnets reached directly: routes that are up, with no gateway, and not default routes.
    subnets: tuple[ipaddress.IPv4Network, ...] = ()
    #: Every route's gateway (routers, never targets).
    gateways: frozenset[ipaddress.IPv4Address] = frozenset()


def parse_routes(route_text: str) -> Routes:
    """The :class:`Routes` in ``/proc/net/route``'s text."""
    subnets: list[ipaddress.IPv4Network] = []
    gateways: set[ipaddress.IPv4Address] = set()
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest, gateway, flags, mask = (int(fields[i], 16) for i in (1, 2, 3, 7))
        except ValueError:
            continue
        if gateway != 0:
            gateways.add(ipaddress.IPv4Address(struct.pack("<I", gateway)))
            continue
        if not flags & _RTF_UP or mask == 0:
            continue
        # The kernel prints each address as a host-order (little-endian) 32-bit hex number.
        network = socket.inet_ntoa(struct.pack("<I", dest))
        netmask = socket.inet_ntoa(struct.pack("<I", mask))
        try:
            subnets.append(ipaddress.IPv4Network(f"{network}/{netmask}", strict=False))
        except ValueError:  # a non-contiguous mask: not a subnet
            continue
    return Routes(tuple(subnets), frozenset(gateways))


def read_routes() -> Routes:
    """This host's routes (none when there is no ``/proc``: loopback only)."""
    try:
        return parse_routes(ROUTE_FILE.read_text())
    except OSError:
        return Routes()


def is_allowed(address: str, routes: Routes) -> bool:
    """Whether ``address`` (an IP literal, maybe with ``%scope``) passes the target rule."""
    try:
        ip: IPAddress = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return ip.is_loopback or ip in _LINK_LOCAL_V6
    if ip.is_loopback:
        return True
    return ip not in routes.gateways and any(ip in subnet for subnet in routes.subnets)


def _rule(routes: Routes) -> str:
    local = ", ".join(str(s) for s in routes.subnets) or "none"
    return (
        "lab load targets only loopback (127.0.0.0/8, ::1), a host on an IPv4 subnet this "
        f"machine is directly connected to (gateway-less routes in {ROUTE_FILE}: {local}; "
        "routers excluded) or IPv6 link-local fe80::/10 — point it at the lab's own server "
        "(e.g. bakawali or 127.0.0.1)"
    )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_target(host: str, port: int, timeout: float) -> Target:
    """Resolve ``host`` once, refuse it unless allowed, and return the first allowed address
    that accepts a connection. Raises a :class:`~lab.measure.errors.LoadError` subclass."""
    where = _hostport(host, port)
    try:
        infos = _resolve(host, port, timeout)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise NameNotFound(
            f"cannot resolve host {host!r} ({detail}) — check the spelling, or give an "
            "address such as 127.0.0.1"
        ) from exc
    if not infos:
        raise NameNotFound(f"host {host!r} resolved to no address — check the spelling")

    routes = read_routes()
    candidates = [info for info in infos if is_allowed(str(info[4][0]), routes)]
    if not candidates:
        addresses = ", ".join(dict.fromkeys(str(info[4][0]) for info in infos))
        raise TargetNotAllowed(f"refusing to load {host} ({addresses}): {_rule(routes)}")

    last: LoadError | None = None
    for family, kind, proto, _canon, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
        except OSError as exc:
            last = _connect_error(exc, where, str(sockaddr[0]), timeout)
            continue
        return Target(host=host, port=port, family=int(family), sockaddr=tuple(sockaddr))
    assert last is not None
    raise last


def _connect_error(exc: OSError, where: str, address: str, timeout: float) -> LoadError:
    if isinstance(exc, ConnectionRefusedError):
        return TargetRefused(
            f"connection refused by {where} ({address}) — is the server running on that port?"
        )
    if isinstance(exc, TimeoutError):
        return TargetTimedOut(
            f"no answer from {where} ({address}) within {timeout:g} s — is the server up? "
            "(or raise --timeout)"
        )
    return TargetUnreachable(
        f"cannot connect to {where} ({address}): {exc.strerror or exc} — check the address"
    )
