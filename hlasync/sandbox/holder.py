"""Who holds a sandbox's vCPU, and the fields the parts of a sandbox share.

:class:`SandboxBase` declares what a :class:`~.core.Sandbox` keeps (its
machine, the state lock and the condition that waiters use, the holder, the
loans, the hot session) and owns the *holder* machinery. One holder at a
time decides what the vCPU is used for: a running call (:class:`~.calls.Call`),
an operation on an idle sandbox (:class:`_Operation`: restore, snapshot,
dump) or a hot session (:class:`~.hot.HotSession`). Here: waiting (bounded)
until no other operation holds the vCPU, holding it for an operation, waking
the waiters when the holder or the loans change, and releasing the VM of a
closed sandbox once nobody holds it. Every change of the sandbox's state is
:mod:`.core`'s.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import abi
from ..config import SandboxConfig
from ..errors import HlasyncError, SandboxBusy, SandboxClosed, SandboxPoisoned
from ..guest.image import GuestImage
from ..guest.layout import MemoryLayout
from . import trim
from .calls import Call
from .dumps import CrashdumpRecord
from .faults import ExceptionInfo
from .hot import PARK_KICK_AFTER, AutoChooser, HotSession
from .machine import Machine
from .snapshots import Snapshot
from .states import SandboxState

if TYPE_CHECKING:
    from ..debug.server import DebugServer

__all__ = ["OPERATION_WAIT", "SandboxBase"]

#: How long a call, restore or dump waits for another operation on an idle
#: sandbox (a restore, a snapshot, a dump) to finish before SandboxBusy.
OPERATION_WAIT = 30.0


class _Operation:
    """A holder of an idle sandbox that is not a call: restore, snapshot or dump."""

    __slots__ = ("name", "thread")

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread = threading.get_ident()


class SandboxBase:
    """The fields of a sandbox that its parts share (set by ``Sandbox.__init__``)
    and the holder of its vCPU. Fields below the lock are guarded by it."""

    config: SandboxConfig
    image: GuestImage
    layout: MemoryLayout
    id: str
    last_exception: ExceptionInfo | None
    _machine: Machine
    _output: Callable[[str], None] | None
    _host_functions: dict[str, Callable[..., Any]]
    _crashdump_listeners: list[Callable[[CrashdumpRecord], None]]
    _compat: tuple[str, MemoryLayout]  # what a snapshot must match to be restored here
    _initial: Snapshot  # what restore() without an argument returns to
    _doorbell: bool  # the guest's dispatcher waits on the doorbell page
    _park_feature: bool  # and parks in hl_park after a call when asked (abi.FEATURE_PARK)
    _park_token: int  # the token of the park its guest is in or about to enter (0: none)
    _spin_allowed: bool  # whether config.spin applies (see Sandbox.__init__)
    _debugger: DebugServer | None  # SandboxConfig.debug_port's server
    _finalizer: weakref.finalize[[Machine, threading.Lock, DebugServer | None], SandboxBase]
    _lock: threading.Lock
    _changed: threading.Condition  # on _lock: the holder or the loans changed
    _waiting: int  # threads waiting on _changed
    _state: SandboxState
    _holder: Call | _Operation | HotSession | None
    _loans: int  # dumps written by other threads while a call runs host code
    _forked_from: int | None  # the parent's pid, in a forked child
    _hot: HotSession | None  # made at the first call with config.spin
    _last_end: float  # monotonic time the last call ended (spin="auto")
    _gap_average: float | None  # of the gaps between calls (spin="auto")
    _auto: AutoChooser  # spin="auto": whether spinning pays for this caller
    _idle_since: float  # monotonic time the last holder gave the vCPU up (idle_trim)
    _trim_noted: bool  # the hlasync-trim thread will look at this sandbox

    def _wait_for_operations(self, what: str) -> None:
        """Wait (lock held, bounded) until no other operation holds the vCPU;
        SandboxBusy if a call holds it. Returns with the holder free."""
        deadline = 0.0
        while True:
            if self._state is SandboxState.CLOSED:
                self._raise_not_ready(what)
            holder = self._holder
            if holder is None:
                return
            if isinstance(holder, HotSession):  # stop the spin; it gives the vCPU up
                holder.park(self, time.monotonic())
                self._wait_locked(PARK_KICK_AFTER / 4)
                continue
            if isinstance(holder, Call):
                raise SandboxBusy(
                    f"sandbox {self.id} is already running a call ({holder.function})",
                    sandbox_id=self.id,
                )
            if holder.thread == threading.get_ident():
                raise SandboxBusy(
                    f"sandbox {self.id} is busy with {holder.name} on this thread ({what})",
                    sandbox_id=self.id,
                )
            now = time.monotonic()
            if not deadline:
                deadline = now + OPERATION_WAIT
            if now >= deadline:
                raise SandboxBusy(
                    f"sandbox {self.id} has been busy with {holder.name} for more than "
                    f"{OPERATION_WAIT:g} s ({what})",
                    sandbox_id=self.id,
                )
            self._wait_locked(deadline - now)

    @contextlib.contextmanager
    def _operation(self, name: str) -> Iterator[_Operation]:
        """Hold an idle (ready or poisoned) sandbox's vCPU for ``name``."""
        operation = _Operation(name)
        with self._lock:
            self._wait_for_operations(name)
            self._holder = operation
            # spin="auto": the next call follows an operation, which would park a
            # spinning guest again (call + restore loops): it does not spin. With
            # hot_restore the next restore may need no park: the chooser decides.
            if not self.config.hot_restore:
                self._last_end = 0.0
        try:
            yield operation
        finally:
            with self._lock:
                self._holder = None
                self._holder_left_locked()
                self._notify_locked()

    def _holder_left_locked(self) -> None:
        """A holder gave the vCPU up (lock held): release a closed sandbox's VM;
        otherwise the sandbox may be idle from now (``idle_trim``)."""
        if self._state is SandboxState.CLOSED:
            self._release_if_closed_locked()
            return
        now = time.monotonic()
        self._idle_since = now
        after = self.config.idle_trim
        if after is not None and not self._trim_noted:
            self._trim_noted = trim.note(self, now + after)

    def _trim_if_idle(self, now: float) -> bool:
        """(The hlasync-trim thread) Drop the backing image's pages from guest
        memory if nothing held the vCPU for ``idle_trim`` seconds (True);
        else look again when that may be so."""
        after = self.config.idle_trim
        with self._lock:
            if after is None or self._state is SandboxState.CLOSED or not self._trim_noted:
                self._trim_noted = False
                return False
            if self._holder is not None or self._loans:
                # busy: its holder will leave a new idle time
                self._trim_noted = trim.note(self, now + after)
                return False
            due = self._idle_since + after
            if due > now:
                self._trim_noted = trim.note(self, due)
                return False
            self._holder = _Operation("trim")
        try:
            self._machine.trim()
            return True
        except (OSError, HlasyncError) as exc:  # a closed owner; nothing is lost
            trim.log.debug("sandbox %s: idle trim skipped: %s", self.id, exc)
            return False
        finally:
            with self._lock:
                self._holder = None
                self._trim_noted = False
                self._release_if_closed_locked()
                self._notify_locked()

    def _wait_for_trim_locked(self) -> None:
        """Wait (lock held, bounded) until no idle trim holds the vCPU."""
        deadline = time.monotonic() + OPERATION_WAIT
        while isinstance(self._holder, _Operation) and self._holder.name == "trim":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxBusy(
                    f"sandbox {self.id} has been busy with an idle trim for more than "
                    f"{OPERATION_WAIT:g} s",
                    sandbox_id=self.id,
                )
            self._wait_locked(remaining)

    def _wait_locked(self, timeout: float) -> None:
        """Wait (lock held) for the holder or the loans to change."""
        self._waiting += 1
        try:
            self._changed.wait(max(timeout, 0.0))
        finally:
            self._waiting -= 1

    def _notify_locked(self) -> None:
        if self._waiting:  # nobody waits on most calls: skip the Condition's bookkeeping
            self._changed.notify_all()

    def _release_locked(self) -> None:
        """Release the VM and guest memory now (lock held, or no other thread)."""
        self._finalizer.detach()
        self._machine.release()

    def _release_if_closed_locked(self) -> None:
        if self._state is SandboxState.CLOSED and self._holder is None and not self._loans:
            self._release_locked()

    def _set_spin(self, ticks: int) -> None:
        """The doorbell's spin budget (TSC ticks; 0 ends a spin)."""
        machine = self._machine
        if machine.released:  # by the finalizer of a sandbox dropped unclosed
            return
        machine.write_bell(abi.WORD_SPIN, ticks)

    def _raise_not_ready(self, what: str) -> None:
        state = self._state
        if state is SandboxState.POISONED:
            raise SandboxPoisoned(
                f"sandbox {self.id} is poisoned by an earlier fault or interrupt; call restore()",
                sandbox_id=self.id,
            )
        if state is SandboxState.CLOSED:
            if self._forked_from is not None:
                raise SandboxClosed(
                    f"sandbox {self.id} belongs to process {self._forked_from}; a forked child "
                    "cannot use it (create sandboxes after the fork)",
                    sandbox_id=self.id,
                )
            raise SandboxClosed(f"sandbox {self.id} is closed", sandbox_id=self.id)
        raise SandboxBusy(
            f"sandbox {self.id} is already running a call ({what})", sandbox_id=self.id
        )
