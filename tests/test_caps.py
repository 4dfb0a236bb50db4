"""A design that caps its connections at once (fork and spawn at --max-children, thread at
--max-threads) says so the first time it reaches the cap — one line for the server's life, not
one per wake-up — and the clients over the cap wait in the backlog and are served once room
frees up. (The pools' cap is their size; the event loops' is the descriptor limit, which
accept()'s EMFILE policy reports once an episode: tests/test_event_loops.py.)"""

from __future__ import annotations

import socket

import pytest
from harness import ServerFactory, echo_once

CAPS = {"fork": "--max-children", "spawn": "--max-children", "thread": "--max-threads"}


@pytest.mark.parametrize("design", sorted(CAPS))
def test_reaching_the_cap_is_said_once_and_the_waiting_clients_are_served(
    start_server: ServerFactory, design: str
) -> None:
    server = start_server(design, CAPS[design], "2")
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    for sock in held:  # each has its child or thread: the cap is reached
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    waiting = [socket.create_connection(("127.0.0.1", server.port), timeout=20) for _ in range(3)]
    for sock in waiting:
        sock.sendall(b"hi")
    server.wait_for_line(r"at the cap of 2 connection\(s\) at once")
    for sock in held:
        sock.close()
    for sock in waiting:  # served as room frees up
        assert sock.recv(2) == b"hi"
        sock.close()
    # At the cap a second time: not said again.
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    for sock in held:
        sock.sendall(b"y")
    assert held[0].recv(1) == b"y" and held[1].recv(1) == b"y"
    for sock in held:
        sock.close()
    assert echo_once(server.port) == b"This is a test message from a stupid client lol!\0"
    assert sum("at the cap" in line for line in server.lines) == 1, server.lines
