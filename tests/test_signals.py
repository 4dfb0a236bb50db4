"""The signal queue: a signal recorded while the loop takes the queue is never lost.

CPython runs a Python-level handler between bytecodes (when a call returns, at a backward
jump), so the handler can append to the queue at almost any point of ``pending()``. The test
plays the handler at *every* bytecode of ``pending()`` in turn (opcode tracing), which covers
each point the interpreter could pick, and checks the signal comes out of that call or the
next — never neither. (The old copy-then-``clear()`` dropped one arriving between the two: a
spawn server under a stream of SIGCHLD once did not answer a SIGUSR1.)
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from lab.sockets import signals
from lab.sockets.signals import SignalQueue


@pytest.fixture
def queue() -> Iterator[SignalQueue]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGCHLD)}
    q = SignalQueue((signal.SIGUSR1, signal.SIGCHLD))
    try:
        yield q
    finally:
        signal.set_wakeup_fd(-1)
        signals.set_owner(None)
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def pending_with_a_signal_at(queue: SignalQueue, step: int, signum: int) -> tuple[list[int], int]:
    """Call ``queue.pending()`` and, at its ``step``-th bytecode, record ``signum`` as the
    handler would. Returns what the call gave and how many bytecodes it ran."""
    code = SignalQueue.pending.__code__
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "opcode":
            if count == step:
                queue.record(signum)
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is code:
            frame.f_trace_opcodes = True
            return local
        return None

    sys.settrace(tracer)
    try:
        got = queue.pending()
    finally:
        sys.settrace(None)
    return got, count


def test_a_signal_recorded_at_any_point_of_pending_is_returned_then_or_next_time(
    queue: SignalQueue,
) -> None:
    _, steps = pending_with_a_signal_at(queue, -1, signal.SIGUSR1)  # a dry run: count them
    assert steps > 5
    for step in range(steps):
        queue.record(signal.SIGCHLD)  # something is being taken when SIGUSR1 lands
        first, ran = pending_with_a_signal_at(queue, step, signal.SIGUSR1)
        assert ran >= step + 1, f"the call ended before bytecode {step}"
        second = queue.pending()
        assert signal.SIGCHLD in first
        assert (first + second).count(signal.SIGUSR1) == 1, (
            f"SIGUSR1 recorded at bytecode {step} of pending(): {first} then {second}"
        )
        assert queue.pending() == []


def test_pending_returns_stop_requests_before_the_others_each_once(queue: SignalQueue) -> None:
    queue.record(signal.SIGCHLD)
    queue.record(signal.SIGUSR1)
    queue.record(signal.SIGCHLD)
    queue.record(signal.SIGTERM)
    assert queue.pending() == [signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD]
    assert queue.pending() == []
