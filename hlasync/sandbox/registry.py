"""The live sandboxes of this process (for ``hlasync dump-all``), and what a
forked child does with the sandboxes it inherited: nothing. Their VMs
belong to the parent; in the child they are closed and say so."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Sandbox

__all__ = ["add", "discard", "live_sandboxes"]

_live: weakref.WeakSet[Sandbox] = weakref.WeakSet()
_lock = threading.Lock()


def add(sandbox: Sandbox) -> None:
    with _lock:
        _live.add(sandbox)


def discard(sandbox: Sandbox) -> None:
    with _lock:
        _live.discard(sandbox)


def live_sandboxes() -> list[Sandbox]:
    """Every sandbox of this process that is not closed."""
    from .core import SandboxState

    with _lock:
        sandboxes = list(_live)
    return [sb for sb in sandboxes if sb.state is not SandboxState.CLOSED]


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
