"""Loopback ports for the servers a local bench starts: below the kernel's ephemeral range.

Why not ``bind(port 0)``: that port comes from the ephemeral range, the one the load generator's
own connections take their source ports from — tens of thousands a minute, each left in
TIME_WAIT on the client's side for a minute. A server that gets port P this way, while the
client side still holds TIME_WAIT entries for earlier connections *from* P to some port Q, is
reached by a new connection *from* Q to P: the same four numbers, so the SYN lands on the old
TIME_WAIT entry instead of the listener, is answered with a stale ACK, and the connect() stalls
in SYN retransmits (1 s, 3 s …) — a server "not answering" in one run of fifty, or a latency
outlier. A port below the range is never a source port, so no such entry can exist for it.

The port is chosen at random in :data:`FLOOR` … the range's low end and checked free by a
bind() without SO_REUSEADDR (which also refuses a port that has TIME_WAIT entries of its own);
the server binds it a moment later — a window in which only another process choosing the same
way could take it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FLOOR = 20000  # well above the well-known and registered ports most services use
DEFAULT_LOW = 32768  # Linux's default ephemeral range starts here


def ephemeral_low() -> int:
    """The lowest port the kernel hands out as a source port."""
    try:
        return int(RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_LOW


def quiet_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range (see the module docstring); 0 —
    let the kernel choose — when the range leaves no room below it."""
    low = ephemeral_low()
    floor = FLOOR if low > FLOOR + 1000 else 1024
    if low <= floor + 1:
        return 0
    start = random.randrange(floor, low)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates: list[int] = [*range(start, low), *range(floor, start)]
    for port in candidates:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    return 0
