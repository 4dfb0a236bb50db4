"""The peers measured beside the designs start like a design and echo like one."""

from __future__ import annotations

import os
import sys

import pytest
from harness import ORIGINAL_MESSAGE, ServerFactory, echo_once

from lab.measure.peers import PEERS


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_is_ready_echoes_and_stops_on_sigterm(start_server: ServerFactory, peer: str) -> None:
    command = [
        sys.executable,
        "-m",
        "lab.measure.peers",
        peer,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    server = start_server(f"peer-{peer}", command=command)
    payload = os.urandom(100_000) + ORIGINAL_MESSAGE
    assert echo_once(server.port) == ORIGINAL_MESSAGE
    assert echo_once(server.port, payload) == payload
    assert server.stop() == 0
    stats = server.final_stats()
    assert stats["design"] == f"peer-{peer}"
    if peer != "socat":  # socat forks and execs cat per connection: nothing of ours counts
        assert stats["accepted"] == 2
