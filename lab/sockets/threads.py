"""Threads that serve connections inside one process: what the thread designs share.

``thread``, ``prethread-accept`` and ``thread-pool`` serve each connection in a thread of the one
server process, with the same blocking echo as every other design (:mod:`lab.sockets.echo`).
What differs from a process that serves (:mod:`lab.sockets.serving`), and why:

* **Signals go to the main thread, and only there.** The kernel delivers a process-directed
  signal to any thread that does not block it, and CPython runs Python handlers in the main
  thread only. A signal taken by a serving thread would interrupt *its* ``readv()`` for nothing
  (PEP 475 retries it) and leave the main thread asleep in ``poll()``. So every thread is started
  with all signals blocked (:func:`start_thread`: the new thread inherits the mask, the main
  thread restores its own — two ``rt_sigprocmask`` per start). The main thread keeps the
  supervising loop of :class:`~lab.sockets.base.Server`: the signal pipe, the health port, the
  listening socket where it accepts, and a *wake pipe* (below).
* **A thread cannot be killed, nor interrupted by a signal.** So the grace period is not a timer
  in each serving thread: the main thread watches the deadline in its own ``poll()`` and, when it
  passes, ``shutdown(SHUT_RDWR)``s every connection still in flight (:meth:`ThreadServer.cut`).
  The blocked ``readv()`` returns 0, or a blocked ``write()`` fails; the echo sees the thread's
  ``cut`` flag and counts the connection *stopped*. ``cut`` is set before the descriptor in hand
  is read, and the echo sets its descriptor before it looks at ``cut``, so either the thread sees
  the flag or the main thread sees the descriptor.
* **Each thread has its own serving state** (:class:`ThreadServing`): its own 64 KiB buffer,
  made once when the state is made (never per message; ``thread`` recycles the states of
  threads that ended), its own slot of the shared :class:`~lab.sockets.stats.Counters` (written
  by that thread only, read by the main thread for SIGUSR1 and the final line: counting is a
  store to memory, as in the process designs), and its own log, whose trace lines carry the
  thread's id (the kernel's tid, as ``ps -L`` and strace show it).
* **The wake pipe.** A thread that ends, or frees room the main thread is waiting for, writes
  one byte to a non-blocking pipe in the main thread's ``poll()``. It does so only when the main
  thread asked (it is at a cap, or stopping) or when a thread raised: in the steady state the
  wake pipe costs no system call.
* **Supervision.** A thread that raises is caught at the bottom of its stack: the descriptor it
  owned is closed (its connection counts as ``worker_died``), the main thread prints one notice
  line (the exception and where it was raised) and, for a pool, starts a replacement — after a
  delay when threads keep dying (the process pools' rule: 5 deaths within 5 s).

**The GIL.** One thread at a time runs Python code. A thread blocked in ``accept()``,
``readv()`` or ``write()`` has released it (CPython releases it around every blocking system
call), so I/O overlaps freely: a thousand idle connections cost a thousand sleeping threads and
no CPU. CPU-bound work does not overlap: two threads that compute take turns on one core, however
many cores there are. The echo computes almost nothing per message, so what the GIL costs here is
hand-offs: when a thread wakes from a system call while another holds the GIL, it waits on a
futex. With one client at a time there is no contention and a message costs one ``readv`` and
one ``write``, as everywhere.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import threading
import time
from collections import deque

from lab.sockets import services, signals
from lab.sockets.config import ServerConfig
from lab.sockets.log import Log
from lab.sockets.respawn import Respawning
from lab.sockets.serving import Serving, shutdown_fd
from lab.sockets.stats import STOPPED, WORKER_DIED, Slot

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import ClassVar


class ThreadLog(Log):
    """A thread's log: the same stream, trace lines prefixed with the thread's id."""

    def __init__(self, log: Log) -> None:
        super().__init__(log.tracing, log.stream)
        self.tid = 0  # set by the thread itself when it starts (only when tracing)

    def trace(self, text: str) -> None:
        if self.tracing:
            self.line(f"[{self.tid}] {text}")


class ThreadServing(Serving):
    """One thread's serving state: what :func:`lab.sockets.echo.echo` needs (``buffers``,
    ``view``, ``tracing``, ``log``, ``current``, ``cut``), its slot, and what the supervisor
    needs. The signal methods of :class:`Serving` are not used: the main thread owns signals."""

    log: ThreadLog

    def __init__(self, config: ServerConfig, log: Log, slot: Slot, key: int) -> None:
        super().__init__(config, ThreadLog(log), slot)
        self.key = key  # the slot's key in Counters.by_pid (a pool thread's tid)
        self.held = -1  # the descriptor this thread owns: closed for it if it raises
        self.crash: str | None = None  # what it raised, for the main thread's notice
        self.tid = 0  # the kernel's id of the thread (pool threads; others only when needed)


def start_thread(body: Callable[[], None], name: str | None = None) -> int:
    """Run ``body`` in a new thread that has every signal blocked; returns its tid, or 0.

    Without a name: ``_thread.start_new_thread`` — no handshake, the caller goes on at once (the
    ``thread`` design pays this per connection: ``clone3`` and two ``rt_sigprocmask``). With a
    name: a ``threading.Thread``, whose ``start()`` waits until the thread runs, so its native id
    is known (pool threads, started once). Raises RuntimeError when no thread can be started
    (EAGAIN: a pids limit, memory)."""
    mask = signals.block_all()
    try:
        if name is None:
            _thread.start_new_thread(body, ())
            return 0
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread.native_id or 0
    finally:
        signals.restore(mask)


def describe(exc: BaseException) -> str:
    """An exception in one line: its type, message and where it was raised."""
    tb = exc.__traceback__
    where = ""
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = f" (at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


class WakePipe:
    """A non-blocking pipe a thread writes a byte to, to end the main thread's ``poll()``."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        fd = self.write_fd
        if fd < 0:
            return  # closed: the server is exiting, a thread that outlived the cut wakes nobody
        # BlockingIOError: full, the main thread is awake already; EBADF: closed just now.
        with contextlib.suppress(OSError):
            os.write(fd, b"w")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self.read_fd, 512)) == 512:
                pass

    def close(self) -> None:
        # The write end is marked closed before it is: a straggler thread's wake() then writes
        # nothing, rather than into whatever descriptor might reuse the number.
        write_fd, self.write_fd = self.write_fd, -1
        os.close(self.read_fd)
        os.close(write_fd)


class ThreadServer(Respawning):
    """The main thread supervises and (except in ``prethread-accept``) accepts; threads serve.

    A design overrides :meth:`busy` (whether connections are still in flight), :meth:`stop_threads`
    (what a stop asks of the threads), and for a pool :meth:`thread_main` (a pool thread's life),
    then calls :meth:`maintain_pool` from ``start``."""

    pool_of: ClassVar[str | None] = "threads"
    per_worker_stats = True
    family = "prefork"
    # Whether each serving thread serves one connection and ends (kv then closes its Store as
    # the connection ends: lab.sockets.services.for_config).
    thread_per_connection: ClassVar[bool] = False
    # A thread that keeps raising at once is replaced after a delay (lab.sockets.respawn).
    # After the grace period's shutdown()s: how long the threads get to return from the echo
    # and count what they held (they return at once; this only bounds a thread that hangs).
    CUT_WAIT = 2.0

    def __init__(self, config: ServerConfig, log: Log | None = None) -> None:
        super().__init__(config, log)
        self.wake = WakePipe()
        self._extra[self.wake.read_fd] = select.POLLIN
        self.room_wanted = False  # the main thread waits for a thread to free something
        self.states: list[ThreadServing] = []  # every serving state made, busy or not
        self.ended: deque[ThreadServing] = deque()  # threads that ended, for the main thread
        self.pool: set[ThreadServing] = set()  # pool threads running (the main thread's view)
        # echo, or kv: a serving thread opens its own Store at its first connection and keeps
        # it for its life (sqlite3 connections are not shared between threads).
        self.service = services.for_config(config, self.thread_per_connection)
        self._next_key = 1

    def counter_slots(self) -> int:
        return self.config.pool_size + 1

    def ready_details(self) -> dict[str, object]:
        return {"workers": self.config.pool_size} if self.pool_of else {}

    def workers_alive(self) -> int:
        return len(self.pool)

    # -- serving states and threads ----------------------------------------------------------
    def new_state(self, bind: bool = True) -> ThreadServing:
        """A serving state with a fresh slot, bound under a number of its own unless the caller
        binds it (a pool thread, under its tid)."""
        slot = self.counters.assign()
        key, self._next_key = self._next_key, self._next_key + 1
        if bind:
            self.counters.bind(slot, key)
        state = ThreadServing(self.config, self.log, slot, key)
        self.states.append(state)
        return state

    def run_thread(self, state: ThreadServing, target: Callable[[ThreadServing], None]) -> None:
        """The bottom of every serving thread's stack: run ``target``; if it raises, close the
        descriptor it owned and tell the main thread (which reports it and replaces it)."""
        if state.tracing:  # a gettid(), only when tracing (a state may serve many threads)
            state.tid = state.log.tid = _thread.get_native_id()
        try:
            target(state)
        except BaseException as exc:
            state.tid = state.tid or _thread.get_native_id()
            state.crash = describe(exc)
            del exc  # no reference cycle through the traceback's frames
            if state.held >= 0:
                with contextlib.suppress(OSError):
                    os.close(state.held)
                state.held = -1
        finally:
            self.thread_ended(state)

    def thread_ended(self, state: ThreadServing) -> None:
        """In the ending thread: hand it to the main thread (pool threads end rarely)."""
        self.ended.append(state)  # deque.append is atomic
        self.wake.wake()

    def start_pool_thread(self) -> ThreadServing:
        """One pool thread with a fresh state and slot, keyed by its tid (``per_worker``)."""
        state = self.new_state(bind=False)
        try:
            tid = start_thread(lambda: self.run_thread(state, self.thread_main), self.name)
        except RuntimeError:
            self.forget(state)
            raise
        state.tid = tid
        self.counters.bind(state.slot, tid)
        state.key = tid
        self.pool.add(state)
        if self.tracing:
            self.log.trace(f"pthread_create() is OK: thread {tid} started")
        return state

    def thread_main(self, state: ThreadServing) -> None:
        """A pool thread's whole life."""
        raise NotImplementedError

    def fresh_slot(self, state: ThreadServing) -> None:
        """Give a state whose slot was folded a new one (its thread died; the state lives on)."""
        state.slot = self.counters.assign()
        state.key, self._next_key = self._next_key, self._next_key + 1
        self.counters.bind(state.slot, state.key)

    def forget(self, state: ThreadServing) -> None:
        """A state whose thread ended for good: fold its slot into the totals."""
        with contextlib.suppress(ValueError):
            self.states.remove(state)
        lost_as = STOPPED if self.killing else WORKER_DIED
        if self.counters.by_pid.get(state.key) is state.slot:
            self.counters.retire(state.key, self.stats, lost_as)
        else:
            self.counters.release(state.slot)

    def maintain_pool(self) -> int:
        started = 0
        while len(self.pool) < self.config.pool_size:
            try:
                self.start_pool_thread()
            except RuntimeError as exc:
                self.log.notice(f"cannot start a thread ({exc}): retrying in a second")
                self.respawn_at = time.monotonic() + self.RESPAWN_DELAY
                break
            started += 1
        return started

    # -- the main thread's side ------------------------------------------------------------------
    def on_ready(self, fd: int, events: int) -> None:
        if fd == self.wake.read_fd:
            self.wake.drain()
            self.reap_threads()

    def reap_threads(self) -> None:
        while self.ended:
            self.thread_exited(self.ended.popleft())

    def thread_exited(self, state: ThreadServing) -> None:
        """A pool thread ended: it was told to (a stop), or it raised."""
        self.pool.discard(state)
        self.forget(state)
        if state.crash is None:
            return
        cause = f"thread {state.tid} raised {state.crash}"
        if self.stopping:
            self.log.notice(cause)
            return
        self.replace(cause, "threads")

    # -- stopping ---------------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether any thread still has work (a connection, or a queue to serve)."""
        return bool(self.pool)

    def stop_threads(self) -> None:
        """Once, when the main loop has ended: tell the threads to finish and leave."""

    def stop_poll_interval(self) -> float:
        return 1.0  # a bound only: a thread that ends writes the wake pipe while stopping

    def while_stopping(self) -> None:
        """Once per wake-up while waiting for the threads (prethread-accept's door)."""

    def before_cut(self) -> None:
        """At the deadline, before the connections in flight are shut down."""

    def finish(self) -> None:
        """Wait for the threads until the deadline; then shut down what is still in flight."""
        self.stop_threads()
        poller = select.poll()
        signal_fd = self.signal_queue.fileno()
        poller.register(signal_fd, select.POLLIN)
        poller.register(self.wake.read_fd, select.POLLIN)
        health_fd = self.health.fileno() if self.health is not None else -1
        if health_fd >= 0:
            poller.register(health_fd, select.POLLIN)
        while self.busy():
            remaining = (self.stop_deadline or 0.0) - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(min(remaining, self.stop_poll_interval()) * 1000):
                if fd == signal_fd:
                    self.on_signals()
                elif fd == health_fd:
                    self.answer_health_probes()
                else:
                    self.wake.drain()
            self.reap_threads()
            self.while_stopping()
        if self.busy():
            self.cut()

    def in_flight_states(self) -> list[ThreadServing]:
        """The states whose thread holds a connection."""
        return [s for s in self.states if s.slot.in_flight() > 0]

    def cut(self) -> None:
        """The grace period is over: shutdown() every connection still in flight (a thread
        cannot be killed; the shutdown ends its blocked call), then give the threads a moment
        to count them *stopped* and leave."""
        self.killing = True
        self.before_cut()
        cutting = self.in_flight_states()
        self.log.notice(f"grace period over: shutting down {len(cutting)} connection(s)")
        for state in self.states:
            state.cut = True  # first the flag, then the descriptor: see the module docstring
        for state in self.states:
            fd = state.current
            if fd >= 0:
                shutdown_fd(fd)
        deadline = time.monotonic() + self.CUT_WAIT
        while self.busy() and time.monotonic() < deadline:
            with contextlib.suppress(InterruptedError):
                select.select([self.wake.read_fd], [], [], deadline - time.monotonic())
            self.wake.drain()
            self.reap_threads()
        for state in self.in_flight_states():  # a thread that hangs: counted, then abandoned
            self.forget(state)

    def close(self) -> None:
        super().close()
        self.wake.close()
