"""The live sandboxes of this process (for ``hlasync dump-all``), and what a
forked child does with the sandboxes it inherited: nothing. Their VMs
belong to the parent; in the child they are closed and say so."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol, TypeVar

from .states import SandboxState

__all__ = ["Registered", "add", "discard", "live"]


class Registered(Protocol):
    """What the registry uses of a sandbox (a :class:`~.core.Sandbox`)."""

    @property
    def state(self) -> SandboxState: ...
    def _after_fork_in_child(self, parent: int) -> None: ...


_R = TypeVar("_R", bound=Registered)

_live: weakref.WeakSet[Registered] = weakref.WeakSet()
_lock = threading.Lock()


def add(sandbox: Registered) -> None:
    with _lock:
        _live.add(sandbox)


def discard(sandbox: Registered) -> None:
    with _lock:
        _live.discard(sandbox)


def live(kind: type[_R]) -> list[_R]:
    """Every registered sandbox of ``kind`` that is not closed (``live_sandboxes()``
    of :mod:`.core` asks for every :class:`~.core.Sandbox`)."""
    with _lock:
        sandboxes = list(_live)
    return [sb for sb in sandboxes if isinstance(sb, kind) and sb.state is not SandboxState.CLOSED]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at the fork
    from ..kvm.system import Kvm
    from .snapshots import templates

    Kvm._shared_lock = threading.Lock()
    templates._after_fork()
    parent = os.getppid()
    for sandbox in list(_live):
        sandbox._after_fork_in_child(parent)
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
