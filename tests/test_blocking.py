"""A supervising loop that waits in accept() (lab.sockets.blocking): what ends the wait.

Each case runs in a child interpreter: the signal queue installs process-wide handlers and the
wake-up fd, which must not leak into the test process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from harness import ServerFactory, echo_once, stats_when

GUARD = 30.0

SETUP = """
import os, signal, socket
from lab.sockets import signals
from lab.sockets.blocking import KICK, Watchman
from lab.sockets.signals import Interrupted, SignalQueue

queue = SignalQueue([signal.SIGUSR1])
signals.install((KICK,), queue.record)
health = socket.socket()
health.bind(("127.0.0.1", 0))
health.listen()
watchman = Watchman([queue.fileno(), health.fileno()])
watchman.start()
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()

def wait_in_accept():
    watchman.blocked = True
    queue.interruptible = True
    try:
        listener.accept()
        return "accepted"
    except Interrupted:
        return "interrupted " + ",".join(signal.Signals(s).name for s in queue.recorded_list)
    finally:
        queue.interruptible = False
        watchman.blocked = False
"""


def run_case(body: str) -> str:
    code = SETUP + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=GUARD
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_signal_byte_whose_handler_has_not_run_gets_the_main_thread_out_of_accept() -> None:
    # The race: the C-level handler wrote the wake-up byte just before the main thread entered
    # accept(), so no Python handler runs there. Writing the byte by hand is that moment; the
    # watchman must kick the thread out (SIGURG, whose handler raises).
    out = run_case(
        """
        import threading
        threading.Timer(0.2, lambda: os.write(queue.fds()[1], b"\\x0a")).start()
        print(wait_in_accept())
        """
    )
    assert out == "interrupted SIGURG"


def test_a_health_probe_gets_the_main_thread_out_of_accept() -> None:
    out = run_case(
        """
        import threading
        probe = socket.socket()
        threading.Timer(0.2, lambda: probe.connect(health.getsockname())).start()
        print(wait_in_accept())
        """
    )
    assert out == "interrupted SIGURG"


def test_the_watchman_leaves_a_main_thread_that_is_not_waiting_alone() -> None:
    # Nothing is blocked: a byte in the pipe is the poll loop's to take, no kick is sent.
    out = run_case(
        """
        import time
        os.write(queue.fds()[1], b"\\x0a")
        time.sleep(0.3)
        print("recorded", queue.recorded_list)
        """
    )
    assert out == "recorded []"


def test_a_connection_ends_the_wait_only_for_itself() -> None:
    out = run_case(
        """
        import threading
        client = socket.socket()
        threading.Timer(0.2, lambda: client.connect(listener.getsockname())).start()
        print(wait_in_accept(), queue.recorded_list)
        """
    )
    assert out == "accepted []"


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGCHLD"])
def test_sendmsg_parent_blocked_in_accept_takes_signals_and_goes_on_serving(
    signal_name: str, start_server: ServerFactory
) -> None:
    """Signals that end the wait (statistics, a worker's exit) are handled, and the next
    connections are accepted again from the blocking wait."""
    import os
    import signal

    server = start_server("sendmsg", "--workers", "2", "--max-workers", "2")
    assert echo_once(server.port, b"first") == b"first"
    for _ in range(3):
        os.kill(server.pid, getattr(signal, signal_name))
        stats = stats_when(server, lambda s: s["completed"] == 1)
        assert stats["workers_alive"] == 2
    # A connection held open while more come.
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as silent:
        for index in range(3):
            payload = b"after %d" % index
            assert echo_once(server.port, payload) == payload
        silent.sendall(b"late")
        assert silent.recv(4) == b"late"
    stats = stats_when(server, lambda s: s["completed"] == 5)
    assert stats["accepted"] == 5 and stats["failed"] == {}


def test_a_multi_accept_worker_blocked_in_its_errno_policys_accept_leaves_on_sigterm() -> None:
    # After an accept() error such as ECONNABORTED the policy accepts the next connection on
    # the same blocking socket; when another worker took it first, that accept() blocks like
    # the main one. Once, a stop could not end it (PEP 475 retried it): the worker waited for
    # a connection or the parent's SIGKILL.
    code = textwrap.dedent(
        """
        import errno, os, signal, socket, sys, threading
        from lab.sockets import signals
        from lab.sockets.config import parse
        from lab.sockets.designs.multi_accept import AcceptWorker
        from lab.sockets.log import Log
        from lab.sockets.stats import Counters

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        config = parse(["--design", "multi-accept"], {}, ["multi-accept"])
        worker = AcceptWorker(listener, config, Log(False), Counters(1).assign())
        signals.install((signal.SIGTERM,), worker.serving.on_signal)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        fd = worker.accept_failed(OSError(errno.ECONNABORTED, "aborted"))  # blocks: no one came
        print(fd, worker.serving.stopping)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=GUARD
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "True"]
