"""multi-accept — N pre-started workers all block in accept() on one listening socket.

The parent does socket → bind → listen and forks the workers, which inherit the listening
socket; the kernel hands each new connection to one of them. The parent never accepts: it only
supervises. No descriptor crosses a process boundary, and no process is created per connection.

No thundering herd: processes blocked in ``accept()`` wait on the listening socket's queue as
*exclusive* waiters, and Linux wakes one of them per connection (Stevens measured the herd on
older kernels; ``prefork-epoll`` — waiting in epoll with ``EPOLLEXCLUSIVE`` — is nginx's model,
a different design). The waiters queue FIFO, so sequential connections go round the workers in
turn. A blocking ``accept()`` cannot also wait for a signal pipe, so a worker is stopped by its
SIGTERM handler raising inside the wait (:mod:`lab.sockets.serving`). The two races that leaves
are closed here: a SIGTERM that lands just before the worker enters ``accept()`` does not
interrupt it, so the parent repeats SIGTERM every half second while workers are still alive;
and an ``accept()`` that completed just as the handler raised left its descriptor open under a
number the worker knows in advance (the lowest free one), which the worker then serves.

``--accept-lock`` puts a lock around ``accept()`` (Stevens' servers 3 and 4, nginx's
``accept_mutex``): one worker at a time waits in ``accept()``, the others wait for the lock. It
was the cure for the herd on kernels that woke every acceptor; here it shows what a lock costs.

* ``flock``: ``flock(LOCK_EX)``/``flock(LOCK_UN)`` on an unlinked file the parent creates
  (``O_TMPFILE``) before forking. A flock belongs to the *open file description*, and a forked
  descriptor shares its parent's: workers holding inherited descriptors would all "hold" the one
  lock and exclude nobody. So each worker opens the file again through ``/proc/self/fd/N`` — a
  new description of the same inode — and locks that. The kernel drops a dead worker's lock with
  its descriptors: nothing to repair. Two ``flock`` calls per connection, always.
* ``sem``: a POSIX semaphore in a page of shared memory (``sem_init(pshared=1)`` through ctypes
  on an anonymous ``MAP_SHARED`` mapping made before the fork). ``sem_wait`` and ``sem_post``
  are an atomic operation in user space when nobody waits; with waiters, one ``futex`` each
  (the post wakes one waiter, the next wait sleeps). A signal ends a ``sem_wait`` with EINTR
  (never restarted), so a stop reaches a worker waiting for the lock. The kernel knows nothing
  of who holds a semaphore: a worker that dies holding it would leave every other one waiting.
  So the holder writes its pid next to the semaphore, and the parent posts for a dead worker
  that was the holder. A SIGKILL in the few bytecodes between ``sem_wait``'s return and that
  store is the one case the parent cannot see; a waiter whose wait outlasts any honest hold
  (the holder's ``accept()`` returns at the listening socket's ``SO_RCVTIMEO``, the idle
  timeout) posts once itself, with a notice.

A connection costs a worker ``accept4``, its messages, the EOF ``recv`` and ``close``: the
design's own calls and nothing else (the listening socket's ``SO_RCVTIMEO``, inherited by each
accepted socket, is the idle timeout; counts go to shared memory), plus the lock's: two
``flock``, or two ``futex`` when workers wait for the semaphore (none when only one worker
runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import time

from lab.sockets import process, services, signals
from lab.sockets.accept import Acceptor
from lab.sockets.base import accept_queue_length
from lab.sockets.config import ConfigError, ServerConfig
from lab.sockets.log import Log
from lab.sockets.pool import PoolServer
from lab.sockets.serving import Serving, adopt_lost, lowest_free_fd
from lab.sockets.signals import Interrupted
from lab.sockets.stats import Slot

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from typing import ClassVar

_LOST = -2  # _wait(): the handler raised just as accept() returned
_STOP, _FAILED = -3, -4  # accept_and_serve(): stopping; accept() raised


class WorkersAcceptPool(PoolServer):
    """What the pools whose *workers* accept share (multi-accept, reuseport, prefork-epoll):
    the parent only supervises; on a stop it shrinks the backlog and forwards SIGTERM, and the
    workers serve what is queued themselves."""

    # The workers call accept(), not the parent (the tests set descriptor limits on them).
    workers_accept: ClassVar[bool] = True
    # Workers keep their own --grace deadline from when they got SIGTERM; the parent waits a
    # moment longer, so a worker closes what it holds and exits by itself before any SIGKILL.
    WORKER_SLACK = 1.0
    # While stopping, SIGTERM again this often to workers still alive (a worker blocked in
    # accept() may have got the first one just before it entered the call); None: never.
    RESIGNAL_EVERY: ClassVar[float | None] = 0.5

    @classmethod
    def check_config(cls, config: ServerConfig) -> None:
        super().check_config(config)
        if config.connections:
            raise ConfigError(
                f"--connections does not apply to {cls.name} (its workers accept on their "
                "own): stop it with SIGTERM, or use another design"
            )

    def counter_slots(self) -> int:
        return self.config.pool_size + 1

    def accepting(self) -> bool:
        return False  # the workers accept; the parent only supervises

    def worker_keeps(self) -> list[int]:
        return [self.listener.fileno()]

    def begin_stop(self, drain: bool = True) -> None:
        # The workers drain the queue themselves: forward the request to stop.
        first = not self.stopping
        super().begin_stop(drain=False)
        if first:
            self.close_the_door()
            if self._stop_deadline is not None:
                self._stop_deadline += self.WORKER_SLACK
        if not first:
            self.killing = True  # told twice: what they hold is cut, counted as stopped
        self.signal_workers(signal.SIGTERM if first else signal.SIGKILL)

    def stop_poll_interval(self) -> float:
        return self.RESIGNAL_EVERY if self.RESIGNAL_EVERY is not None else float("inf")

    def while_stopping(self) -> None:
        if self.RESIGNAL_EVERY is not None:
            self.signal_workers(signal.SIGTERM)


class MultiAcceptServer(WorkersAcceptPool):
    name = "multi-accept"
    summary = "N pre-forked workers each block in accept() on the shared listening socket"
    origin = (
        "the chapter's multiple accept() workers; Stevens UNP ch. 30 server 2 (prefork), "
        "servers 3 and 4 with --accept-lock; nginx accept_mutex"
    )
    model = "a pool of processes that accept"
    # Per connection with one message (tests/test_syscall_budget.py): accept4, the message's
    # readv and write, the EOF readv, close — nothing of the lab's.
    syscalls_per_connection: ClassVar[dict[str, int]] = {
        "accept4": 1,
        "readv": 2,
        "write": 1,
        "close": 1,
    }
    # The lock's calls per connection: lock and unlock; a semaphore's are a futex wake by the
    # post and a futex wait by the next sem_wait while another worker holds it.
    accept_locks: ClassVar[dict[str, dict[str, int]]] = {
        "none": {},
        "flock": {"flock": 2},
        "sem": {"futex": 2},
    }

    def ready_details(self) -> dict[str, object]:
        details = super().ready_details()
        if self.config.accept_lock != "none":
            details["accept_lock"] = self.config.accept_lock
        return details

    def start(self) -> None:
        self.listener.setblocking(True)  # the workers block in accept(); the parent never does
        self.lock: FileLock | SemLock | None = None
        if self.config.accept_lock == "flock":
            self.lock = FileLock()
        elif self.config.accept_lock == "sem":
            self.lock = SemLock()
        super().start()

    def worker_keeps(self) -> list[int]:
        keep = super().worker_keeps()
        if isinstance(self.lock, FileLock):
            keep.append(self.lock.fd)
        return keep

    def worker_main(self, slot: Slot) -> int:
        if self.lock is not None:
            self.lock.in_worker(self.log, self.config.idle_timeout)
        return AcceptWorker(self.listener, self.config, self.log, slot, self.lock).run()

    def child_exited(self, pid: int, status: int, role: str) -> None:
        if isinstance(self.lock, SemLock) and not self.stopping:
            self.lock.release_for(pid)
        super().child_exited(pid, status, role)


class FileLock:
    """``flock()`` on an unlinked file; each worker locks its own open file description."""

    def __init__(self) -> None:
        folder = os.environ.get("TMPDIR") or "/tmp"
        try:  # an inode with no name: nothing to clean up, whatever happens to the server
            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:  # a file system without O_TMPFILE: create, then unlink at once
            path = os.path.join(folder, f"lab-accept-lock-{os.getpid()}")
            self.fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.unlink(path)
        self.own = -1

    def in_worker(self, log: Log, idle_timeout: float) -> None:
        # A new open file description of the same inode (see the module docstring).
        self.own = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        os.close(self.fd)

    def acquire(self) -> None:
        fcntl.flock(self.own, fcntl.LOCK_EX)  # PEP 475 retries after a handler that returned

    def release(self) -> None:
        fcntl.flock(self.own, fcntl.LOCK_UN)


_libc = ctypes.CDLL(None, use_errno=True)
_SEM_SIZE = 32  # sizeof(sem_t) on 64-bit glibc (and musl); the holder's pid follows it
_CLOCK_MONOTONIC = 1
_clockwait = getattr(_libc, "sem_clockwait", None)  # glibc 2.30; else sem_timedwait (realtime)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class SemLock:
    """A process-shared POSIX semaphore (value 1) in shared memory, and its holder's pid."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous, MAP_SHARED: the workers share it
        self.sem = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(self.map)))
        self.holder = memoryview(self.map).cast("q")  # [_SEM_SIZE // 8]: who holds it
        if _libc.sem_init(self.sem, 1, 1) != 0:
            raise OSError(ctypes.get_errno(), "sem_init() failed")
        self.pid = 0
        self.log: Log | None = None
        self.patience = 0.0
        self.deadline = _Timespec()

    def in_worker(self, log: Log, idle_timeout: float) -> None:
        self.pid = os.getpid()
        self.log = log
        # No honest hold lasts longer: the holder's accept() returns after the listening
        # socket's SO_RCVTIMEO (the idle timeout), and it posts at once.
        self.patience = 2 * idle_timeout + 1.0

    def acquire(self) -> None:
        """Take the lock; a wait longer than any honest hold takes it back from a holder that
        died unseen (see the module docstring)."""
        if _libc.sem_trywait(self.sem) != 0:  # taken: wait (the uncontended path is no call)
            self._wait()
        self.holder[_SEM_SIZE // 8] = self.pid

    def _wait(self) -> None:
        self._set_deadline()
        while True:
            if _clockwait is not None:
                code = _clockwait(self.sem, _CLOCK_MONOTONIC, ctypes.byref(self.deadline))
            else:
                code = _libc.sem_timedwait(self.sem, ctypes.byref(self.deadline))
            if code == 0:
                return
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue  # a signal: its handler runs here (and raises when stopping)
            if code != errno.ETIMEDOUT:
                raise OSError(code, os.strerror(code))
            value = ctypes.c_int(-1)
            _libc.sem_getvalue(self.sem, ctypes.byref(value))
            if value.value == 0:
                if self.log is not None:
                    self.log.notice(
                        f"accept lock held for over {self.patience:g} s, by no live worker: "
                        "released"
                    )
                _libc.sem_post(self.sem)
            self._set_deadline()

    def _set_deadline(self) -> None:
        end = (time.monotonic() if _clockwait is not None else time.time()) + self.patience
        self.deadline.tv_sec = int(end)
        self.deadline.tv_nsec = int((end % 1) * 1e9)

    def release(self) -> None:
        self.holder[_SEM_SIZE // 8] = 0
        _libc.sem_post(self.sem)

    def release_for(self, pid: int) -> None:
        """The parent: worker ``pid`` ended; if it held the lock, nobody else ever will post."""
        if pid and self.holder[_SEM_SIZE // 8] == pid:
            self.holder[_SEM_SIZE // 8] = 0
            _libc.sem_post(self.sem)


class AcceptWorker:
    """One worker: accept, serve the connection to its end, accept again."""

    def __init__(
        self,
        listener: socket.socket,
        config: ServerConfig,
        log: Log,
        slot: Slot,
        lock: FileLock | SemLock | None = None,
        own_listener: bool = False,
    ):
        self.listener = listener
        self.accept_raw = listener._accept  # type: ignore[attr-defined]
        self.acceptor = Acceptor(listener, log)  # its errno policy for the rare failures
        self.log = log
        self.slot = slot
        self.lock = lock
        # reuseport: the listening socket is this worker's alone, so the worker, not the
        # parent, closes its door when told to stop.
        self.own_listener = own_listener
        # SIGTERM: stop after this connection (SIGINT stays with the parent: Ctrl-C reaches
        # the whole process group, and the parent coordinates the stop).
        self.serving = Serving(config, log, slot, stop_signals=(signal.SIGTERM,))
        # echo, or kv: the worker (a forked process) opens its Store at its first connection
        self.service = services.for_config(config)

    def run(self) -> int:
        serving = self.serving
        if self.own_listener:
            signals.set_owner(self.on_signal)
        else:
            serving.own_signals()
        self.expected_fd = lowest_free_fd()
        if self.lock is None:
            self.accept_and_serve()
        while not serving.stopping:
            fd = self.next_connection(check_stop=True)
            if fd is not None:
                self.serve(fd)
        # Stopping: serve what the kernel had queued (the backlog is shrunk, so nothing new
        # comes in), then leave. On a shared socket another worker may take the last one first
        # and leave us blocked in accept(): the parent's repeated SIGTERM gets us out. (No
        # lock now: each accept() follows a poll() that saw a connection.)
        queued = select.poll()
        queued.register(self.listener, select.POLLIN)
        while not serving.cut and queued.poll(0):
            fd = self.next_connection(check_stop=False)
            if fd is None:
                break
            self.serve(fd)
        return process.EXIT_OK

    def accept_and_serve(self) -> None:
        """The loop a connection costs without a lock, flat: what :meth:`next_connection` and
        :meth:`serve` do, minus three calls and a try per connection. Returns when stopping.

        Between ``interruptible = True`` and ``False`` the stop handler may raise; the except
        clauses only store (no call, no backward jump: CPython runs a handler at neither), so
        it cannot raise again inside them."""
        serving, accept, close, serve = self.serving, self.accept_raw, os.close, self.service
        accepted, acceptor = self.slot.accepted, self.acceptor
        tracing = serving.tracing
        failure: OSError | None = None
        while True:
            serving.interruptible = True
            try:
                fd = _STOP if serving.stopping else accept()[0]
            except Interrupted:
                fd = _LOST
            except OSError as exc:  # BlockingIOError too: SO_RCVTIMEO, nothing for a while
                fd, failure = _FAILED, exc
            finally:
                serving.interruptible = False
            if fd < 0:
                if fd == _STOP:
                    return
                if fd == _LOST:
                    if not adopt_lost(self.expected_fd):
                        return
                    fd = self.expected_fd
                else:
                    if failure is None or isinstance(failure, BlockingIOError):
                        continue
                    fd = self.accept_failed(failure)
                    if fd is None:
                        continue
            elif acceptor.backoff:
                acceptor._recovered()
            if tracing:
                self.log.trace("accept() is OK")
            accepted()
            serve(fd, serving)
            close(fd)

    def on_signal(self, signum: int) -> None:
        """reuseport: the first SIGTERM shrinks this worker's own backlog at once (while the
        connection in hand goes on), then the usual policy (:class:`Serving`)."""
        if signum == signal.SIGTERM and not self.serving.stopping:
            queued = accept_queue_length(self.listener)
            with contextlib.suppress(OSError):
                self.listener.listen(0)
            if self.serving.tracing:
                self.log.trace(f"stopping: serving the {queued} queued connection(s), no new ones")
        self.serving.on_signal(signum)

    def next_connection(self, check_stop: bool) -> int | None:
        try:
            fd = self._wait(check_stop)
        except BlockingIOError:
            return None  # SO_RCVTIMEO: no connection for --idle-timeout seconds
        except OSError as exc:
            return self.accept_failed(exc)
        if fd == _LOST:
            return self.expected_fd if adopt_lost(self.expected_fd) else None
        if fd is not None:
            if self.acceptor.backoff:
                self.acceptor._recovered()
            if self.serving.tracing:
                self.log.trace("accept() is OK")
        return fd

    def accept_failed(self, exc: OSError) -> int | None:
        """The Acceptor's policy for a failed accept() (shed with the spare, back off): a
        connection it took instead, or None after waiting out any back-off.

        The policy's own accept()s are on the same blocking socket: when another worker took
        the connection first, they block like the main one, and so does the back-off's sleep.
        So the whole of it is interruptible by a stop (PEP 475 would retry both otherwise, and
        the worker would wait for a connection or the parent's SIGKILL). An Interrupted may
        leave the policy half done — the spare not reopened, a shed connection not counted —
        which no longer matters: the worker is leaving. A connection it had already taken is
        still returned, and served as the drain serves."""
        serving = self.serving
        fd: int | None = None
        serving.interruptible = True
        try:
            if not serving.stopping:
                fd, shed = self.acceptor.after_failure(exc)
                if shed:
                    self.slot.accepted_and_shed(shed)
                if self.acceptor.paused(time.monotonic()):
                    time.sleep(max(0.0, self.acceptor.paused_until - time.monotonic()))
        except Interrupted:
            pass
        finally:
            serving.interruptible = False
        return fd

    def _wait(self, check_stop: bool) -> int | None:
        """[lock →] accept() [→ unlock], interruptible by a stop (the only place the handler
        may raise). The lock is left before the connection is served."""
        serving = self.serving
        lock = self.lock if check_stop else None
        locked = False
        serving.interruptible = True
        try:
            if check_stop and serving.stopping:
                return None
            if lock is not None:
                lock.acquire()
                locked = True
            return int(self.accept_raw()[0])
        except Interrupted:
            return _LOST
        finally:
            serving.interruptible = False
            if locked:
                assert self.lock is not None
                self.lock.release()

    def serve(self, fd: int) -> None:
        slot = self.slot
        slot.accepted()
        self.service(fd, self.serving)
        os.close(fd)
