"""The owner of a vCPU: the one thread that runs it for its whole life.

Every ``KVM_RUN``, every vCPU ioctl, every map or unmap of guest memory at
its address and the closing of the vCPU's file run on the owner thread, a
thread made with the vCPU that serves one request at a time in the helper
library (``native/hl_owner.c``) without the GIL. Any other thread *posts* a
request through :meth:`Owner.call` (one at a time: a poster waits its turn
for at most :data:`POST_WAIT` seconds, then gets :class:`OwnerBusy`) and
waits for the answer, spinning briefly and then sleeping; waits return to
Python every :data:`WAIT_SLICE_NS` so that signal handlers run. A kick
(:meth:`Owner.kick`, from any thread, never blocking) makes the owner's
``KVM_RUN`` return now, or its next one at once: a guest can always be
stopped, whatever thread waits for it and whatever other threads do.

Because the owner is the only thread that can unmap guest memory or close
the vCPU, neither can happen under a running guest: both are requests that
the owner serves after its ``KVM_RUN`` returned.

With ``HLASYNC_CHECK_OWNER=1`` in the environment, every vCPU ioctl and every
unmap or fixed map of guest memory that does not go through its owner (so
runs on another thread) raises :class:`OwnerViolation` and is counted in
:data:`violations`: the rule is enforced, not a convention.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import signal
import threading

from ..errors import IoctlError, OwnerBusy
from . import _abi
from .helper import library

__all__ = [
    "CHECK",
    "POST_WAIT",
    "Owner",
    "OwnerBusy",
    "OwnerViolation",
    "check_fd",
    "check_range",
    "violations",
]

#: Seconds a poster waits for its turn (another request in flight) before OwnerBusy.
POST_WAIT = 30.0
#: Nanoseconds one wait lasts without a return to Python (where signal handlers run).
WAIT_SLICE_NS = 100_000_000
#: Nanoseconds a poster spins for the answer before it sleeps: a short ioctl,
#: and a ``KVM_RUN`` (a call's round trip is some tens of microseconds).
IOCTL_SPIN_NS = 50_000
RUN_SPIN_NS = 200_000
#: Nanoseconds the owner spins for the next request before it sleeps (a
#: sequence of ioctls, or the next call of a caller that comes straight back),
#: while the last request came within that time after the one before.
OWNER_SPIN_NS = 50_000
#: Seconds :meth:`Owner.stop` waits for the owner thread to end.
STOP_WAIT = 5.0

_OP_IOCTL, _OP_RUN, _OP_MUNMAP, _OP_CLOSE, _OP_EXIT, _OP_DRAIN, _OP_MMAP, _OP_MADVISE = range(1, 9)

#: HLASYNC_CHECK_OWNER=1: assert that vCPU ioctls and guest-memory unmaps run on the owner.
CHECK = os.environ.get("HLASYNC_CHECK_OWNER", "") not in ("", "0")
#: Every violation seen in this process (with CHECK on): a description each.
violations: list[str] = []

_names = itertools.count(1)
_owned_fds: dict[int, Owner] = {}
_owned_ranges: dict[int, tuple[int, Owner]] = {}  # start address -> (length, owner)


class OwnerViolation(AssertionError):
    """A vCPU ioctl or guest-memory unmap ran outside the vCPU's owner thread
    (raised only with ``HLASYNC_CHECK_OWNER=1``)."""


class _Record(ctypes.Structure):
    """``struct hl_owner`` of ``native/hl_owner.c``."""

    _fields_ = [
        ("req", ctypes.c_uint32),
        ("done", ctypes.c_uint32),
        ("owner_sleeping", ctypes.c_uint32),
        ("waiter_sleeping", ctypes.c_uint32),
        ("kicked", ctypes.c_uint32),
        ("in_run", ctypes.c_uint32),
        ("tid", ctypes.c_int32),
        ("pid", ctypes.c_int32),
        ("signal", ctypes.c_int32),
        ("op", ctypes.c_int32),
        ("fd", ctypes.c_int64),
        ("a1", ctypes.c_int64),
        ("a2", ctypes.c_int64),
        ("a3", ctypes.c_int64),
        ("a4", ctypes.c_int64),
        ("result", ctypes.c_int64),
        ("spin_ns", ctypes.c_uint64),
        ("runs", ctypes.c_uint64),
        ("kicks", ctypes.c_uint64),
        ("served", ctypes.c_uint64),
        ("last_run_ns", ctypes.c_uint64),
        ("gap_ns", ctypes.c_uint64),
        ("posted_ns", ctypes.c_uint64),
        ("has_slot", ctypes.c_uint32),
        ("warm", ctypes.c_uint32),
    ]


class Owner:
    """The owner thread of one vCPU (see the module docstring).

    ``kick_signal`` is the real-time signal that kicks it: the owner thread
    keeps it blocked, and KVM unblocks it only inside ``KVM_RUN`` (the mask
    the vCPU is given with ``KVM_SET_SIGNAL_MASK`` is :attr:`run_mask`).
    """

    def __init__(self, kick_signal: int, name: str | None = None) -> None:
        self._lib = library()
        self._record = _Record()
        self._record.signal = kick_signal
        self._record.spin_ns = OWNER_SPIN_NS
        self._address = ctypes.addressof(self._record)
        self._post = threading.Lock()
        self._ended = False
        self._abandoned: object = None  # an unanswered request given up on (its buffer)
        #: The sandbox it serves, for messages (set by the sandbox).
        self.label = "?"
        self.pid = os.getpid()
        #: The signal mask for KVM_SET_SIGNAL_MASK: the owner thread's, without the kick.
        self.run_mask = 0
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [kick_signal])
                self.run_mask = sum(1 << (int(s) - 1) for s in blocked if s != kick_signal)
                self._record.tid = threading.get_native_id()
                self._record.pid = os.getpid()
            except BaseException as exc:  # noqa: BLE001 - re-raised in __init__
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._lib.hl_owner_loop(self._address)  # until OP_EXIT, without the GIL

        self.thread = threading.Thread(
            target=main, name=name or f"hlasync-owner-{next(_names)}", daemon=True
        )
        self.thread.start()
        ready.wait()
        if failure:  # pragma: no cover
            raise failure[0]
        self.ident = self.thread.ident

    # ------------------------------------------------------------ requests
    def on_owner_thread(self) -> bool:
        return threading.get_ident() == self.ident

    @property
    def direct(self) -> bool:
        """True in a forked child: the owner thread stayed in the parent, and
        this process's copies of the files and mappings are its own to release."""
        return os.getpid() != self.pid

    def call(
        self,
        op: int,
        fd: int = -1,
        a1: int = 0,
        a2: int = 0,
        a3: int = 0,
        a4: int = 0,
        spin_ns: int = IOCTL_SPIN_NS,
        keep: object = None,
    ) -> int:
        """Post request ``op`` and wait for the owner's answer (>= 0, or -errno).
        ``keep``: what the request points at, kept alive while it may run."""
        if self.direct:
            raise OwnerBusy(
                f"sandbox {self.label}: the vCPU's owner thread is in process {self.pid}; "
                "a forked child cannot use it",
                sandbox_id=self.label,
            )
        if not self._post.acquire(timeout=POST_WAIT):
            raise OwnerBusy(
                f"sandbox {self.label}: the vCPU's owner thread has served another request "
                f"for more than {POST_WAIT:g} s",
                sandbox_id=self.label,
            )
        try:
            if self._ended:
                raise OwnerBusy(
                    f"sandbox {self.label}: the vCPU's owner thread has ended (its sandbox "
                    "is closed)",
                    sandbox_id=self.label,
                )
            lib, address, record = self._lib, self._address, self._record
            if self._abandoned is not None:
                # A request given up on (see below) must end before another is posted.
                if not lib.hl_owner_wait(address, record.req, 0, int(POST_WAIT * 1e9)):
                    raise OwnerBusy(
                        f"sandbox {self.label}: an interrupted request to the vCPU's owner "
                        f"thread has not ended in {POST_WAIT:g} s",
                        sandbox_id=self.label,
                    )
                self._abandoned = None
            try:
                done = lib.hl_owner_call(address, op, fd, a1, a2, a3, a4, spin_ns, WAIT_SLICE_NS)
                while not done:  # back in Python between slices: signal handlers run
                    done = lib.hl_owner_wait(address, record.req, 0, WAIT_SLICE_NS)
            except BaseException:
                # A signal handler raised (KeyboardInterrupt), also while the first
                # wait was in C: end the request before anyone posts another (a
                # KVM_RUN ends with a kick); if it does not end in time, the next
                # poster waits for it, and what it points at stays alive.
                if record.done != record.req:
                    self.kick()
                    if not lib.hl_owner_wait(address, record.req, 0, int(STOP_WAIT * 1e9)):
                        self._abandoned = keep if keep is not None else True
                raise
            if op == _OP_EXIT:
                self._ended = True
            return int(self._record.result)
        finally:
            self._post.release()

    def ioctl(self, fd: int, request: int, arg: object = 0) -> int:
        """``ioctl(fd, request, arg)`` on the owner thread. ``arg``: an int, or a
        ctypes object / writable buffer the kernel reads and writes in place."""
        if self.direct:
            return _direct_ioctl(fd, request, arg)
        keep: object = arg  # alive until the owner answered
        if isinstance(arg, int):
            pointer = arg
        elif isinstance(arg, ctypes.Structure | ctypes.Union | ctypes.Array):
            pointer = ctypes.addressof(arg)
        elif isinstance(arg, bytes):
            keep = ctypes.create_string_buffer(arg, len(arg))
            pointer = ctypes.addressof(keep)
        else:
            view = memoryview(arg)  # type: ignore[arg-type]
            keep = (ctypes.c_char * view.nbytes).from_buffer(view)
            pointer = ctypes.addressof(keep)
        result = self.call(_OP_IOCTL, fd, request, pointer, keep=keep)
        del keep
        if result < 0:
            name = _abi.IOCTL_NAMES.get(request, f"ioctl {request:#x}")
            raise IoctlError(name, -result, os.strerror(-result))
        return result

    def run(self, fd: int, *, long: bool = False) -> bool:
        """One ``KVM_RUN`` on the owner thread: True when it ran to an exit,
        False when a kick interrupted it (or stopped it before it began).
        ``long``: the run is expected to last (a hot guest's spin): the
        waiter sleeps at once instead of spinning for the answer."""
        # Spin about as long as the last KVM_RUN took: a call that comes back
        # in microseconds is caught without a wake-up, a long one is slept on.
        spin = 0 if long else min(RUN_SPIN_NS, 2 * self._record.last_run_ns + IOCTL_SPIN_NS)
        result = self.call(_OP_RUN, fd, spin_ns=spin)
        if result == -errno.EINTR:
            return False
        if result < 0:
            raise IoctlError("KVM_RUN", -result, os.strerror(-result))
        return True

    def mmap_fixed(self, address: int, length: int, prot: int, flags: int, fd: int) -> None:
        """Map ``fd`` over guest memory at ``address`` (MAP_FIXED) on the owner."""
        if self.direct:
            from . import _libc

            _libc.mmap(address, length, prot, flags, fd)
            return
        result = self.call(_OP_MMAP, fd, address, length, (prot << 32) | flags, 0)
        if result < 0 and result > -4096:
            raise OSError(-result, f"mmap: {os.strerror(-result)}")

    def munmap(self, address: int, length: int) -> None:
        """Unmap guest memory on the owner (after any KVM_RUN returned)."""
        forget_range(address)
        if self.direct:
            from . import _libc

            _libc.munmap(address, length)
            return
        result = self.call(_OP_MUNMAP, -1, address, length)
        if result < 0:
            raise OSError(-result, f"munmap: {os.strerror(-result)}")

    def madvise(self, address: int, length: int, advice: int) -> None:
        """``madvise`` guest memory on the owner: a discard (``MADV_DONTNEED``)
        changes what the guest sees, so it is never concurrent with a run."""
        if self.direct:
            from . import _libc

            _libc.madvise(address, length, advice)
            return
        result = self.call(_OP_MADVISE, -1, address, length, advice)
        if result < 0:
            raise OSError(-result, f"madvise: {os.strerror(-result)}")

    def close_fd(self, fd: int) -> None:
        """Close the vCPU's file on the owner: no ioctl of it can still run."""
        _owned_fds.pop(fd, None)
        if self.direct:
            os.close(fd)
            return
        self.call(_OP_CLOSE, fd)

    def drain(self) -> None:
        """Forget a kick that has not stopped a KVM_RUN yet."""
        if not self.direct and not self._ended:
            self.call(_OP_DRAIN)

    def warm(self) -> None:
        """Wake a sleeping owner ahead of requests that follow soon (a restore's
        ioctls): its wake-up overlaps the caller's work (any thread; never blocks)."""
        if not self._ended and not self.direct:
            self._lib.hl_owner_warm(self._address)

    def kick(self) -> None:
        """Make the owner's KVM_RUN return now, or its next one at once (any
        thread; never blocks)."""
        if not self._ended and not self.direct:
            self._lib.hl_owner_kick(self._address)

    @property
    def kick_pending(self) -> bool:
        return bool(self._record.kicked)

    @property
    def in_run(self) -> bool:
        return bool(self._record.in_run)

    @property
    def counters(self) -> dict[str, int]:
        record = self._record
        return {"runs": record.runs, "kicks": record.kicks, "served": record.served}

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """End the owner thread (its requests served; idempotent)."""
        if self._ended or self.direct:
            self._ended = True
            return
        self.call(_OP_EXIT)
        self.thread.join(timeout)

    # ------------------------------------------------------------- checking
    def own_fd(self, fd: int) -> None:
        """Register ``fd`` as a vCPU of this owner (for HLASYNC_CHECK_OWNER)."""
        _owned_fds[fd] = self

    def own_range(self, address: int, length: int) -> None:
        """Register guest memory at ``address`` as this owner's (for HLASYNC_CHECK_OWNER)."""
        _owned_ranges[address] = (length, self)

    def __repr__(self) -> str:
        return f"<Owner {self.thread.name} tid={self._record.tid}>"


def forget_range(address: int) -> None:
    _owned_ranges.pop(address, None)


def _direct_ioctl(fd: int, request: int, arg: object) -> int:
    from .system import ioctl

    return ioctl(fd, request, arg)


def _violation(what: str) -> None:
    message = f"{what} on thread {threading.current_thread().name}, not on its owner thread"
    violations.append(message)
    raise OwnerViolation(message)


def check_fd(fd: int, request: int) -> None:
    """(HLASYNC_CHECK_OWNER) A direct ioctl on ``fd``: a violation if it is an owned vCPU."""
    owner = _owned_fds.get(fd)
    if owner is not None and not owner.direct and not owner.on_owner_thread():
        _violation(f"vCPU ioctl {_abi.IOCTL_NAMES.get(request, hex(request))} on fd {fd}")


def check_range(address: int, length: int, what: str) -> None:
    """(HLASYNC_CHECK_OWNER) A direct unmap, fixed map or discard: a violation
    if it touches owned guest memory."""
    for start, (size, owner) in list(_owned_ranges.items()):
        overlaps = address < start + size and start < address + length
        if overlaps and not owner.direct and not owner.on_owner_thread():
            _violation(f"{what} of guest memory at {start:#x}")
