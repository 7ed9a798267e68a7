"""A sandbox's states and every transition between them, in one table.

:data:`TRANSITIONS` is the only place that says which event takes a sandbox
from which state to which: :class:`~hlasync.Sandbox` changes its state only
through :func:`after`, which refuses any pair the table does not hold
(an :class:`IllegalTransition`, a bug in hlasync). ``docs/architecture.md``
§8 shows the same table (a test checks it against this one).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["TRANSITIONS", "Event", "IllegalTransition", "SandboxState", "after"]


class SandboxState(enum.Enum):
    READY = "ready"  # idle at the dispatcher: a call may start
    RUNNING = "running"  # a call holds the vCPU
    POISONED = "poisoned"  # a fault, abort, protocol error or stop left the guest dirty
    CLOSED = "closed"  # VM and memory released (also while it boots)


class Event(enum.Enum):
    BOOTED = "booted"  # initialisation reached the dispatcher
    CALL = "call"  # a call takes the vCPU
    RETURNED = "returned"  # the guest is back at its dispatcher (a result, a failed host call)
    FAILED = "failed"  # a crash, abort, protocol error or interrupt ended the call
    RESTORED = "restored"  # restore() put memory and vCPU back
    RESTORE_FAILED = "restore-failed"  # restore() could not finish
    CLOSE = "close"  # close(), or a forked child's copy


class IllegalTransition(AssertionError):
    """A state change the table does not allow: a bug in hlasync."""


_S, _E = SandboxState, Event

_TABLE: dict[tuple[SandboxState, Event], SandboxState] = {
    (_S.CLOSED, _E.BOOTED): _S.READY,
    (_S.READY, _E.CALL): _S.RUNNING,
    (_S.RUNNING, _E.RETURNED): _S.READY,
    (_S.RUNNING, _E.FAILED): _S.POISONED,
    (_S.READY, _E.RESTORED): _S.READY,
    (_S.POISONED, _E.RESTORED): _S.READY,
    (_S.READY, _E.RESTORE_FAILED): _S.POISONED,
    (_S.POISONED, _E.RESTORE_FAILED): _S.POISONED,
    # Closed meanwhile (from another thread): the call or restore ends, closed it stays.
    (_S.CLOSED, _E.RETURNED): _S.CLOSED,
    (_S.CLOSED, _E.FAILED): _S.CLOSED,
    (_S.CLOSED, _E.RESTORED): _S.CLOSED,
    (_S.CLOSED, _E.RESTORE_FAILED): _S.CLOSED,
}
for _state in SandboxState:
    _TABLE[(_state, _E.CLOSE)] = _S.CLOSED

#: (state, event) -> the state after it; nothing else is allowed.
TRANSITIONS: Mapping[tuple[SandboxState, Event], SandboxState] = MappingProxyType(_TABLE)


def after(state: SandboxState, event: Event) -> SandboxState:
    """The state ``event`` leads to from ``state`` (IllegalTransition if none)."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"no transition from {state.value!r} on {event.value!r}") from None
