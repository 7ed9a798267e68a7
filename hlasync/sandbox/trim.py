"""Giving back the mappings of idle sandboxes (``SandboxConfig.idle_trim``).

A sandbox's guest memory is a private mapping of its backing image (the
template, or the snapshot it was restored to): the pages its guest only read
are the image's own pages, shared by every sandbox made from it, and RSS
counts each of them once per sandbox that maps it (PSS counts it once in
all). After ``idle_trim`` seconds with neither a call nor an operation, the
process-wide ``hlasync-trim`` thread drops those shared mappings; the pages
the guest wrote are kept, so nothing the guest sees changes, and its next
access to a dropped page maps it again (a minor fault, a few µs, once).

The thread sleeps until the earliest sandbox is due, and on its condition
while none is: idle sandboxes cost no wake-ups once trimmed. It holds only
weak references, so a sandbox dropped unclosed is collected as usual, and a
trim holds the sandbox like any operation on an idle sandbox (a call that
comes meanwhile waits for it, a busy sandbox is tried again later).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["Trimmable", "note"]

log = logging.getLogger("hlasync.sandbox")


class Trimmable(Protocol):
    """What the trimmer asks of a sandbox."""

    id: str

    def _trim_if_idle(self, now: float) -> float | None:
        """Trim if idle long enough: None when done (or closed), else when to try again."""
        ...


class _Trimmer:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, weakref.ref[Trimmable]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def note(self, sandbox: Trimmable, due: float) -> None:
        """Look at ``sandbox`` at monotonic time ``due`` (once per noting)."""
        with self._cond:
            earliest = self._due[0][0] if self._due else None
            heapq.heappush(self._due, (due, next(self._order), weakref.ref(sandbox)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="hlasync-trim", daemon=True)
                self._thread.start()
            elif earliest is None or due < earliest:
                self._cond.notify()

    def pending(self) -> int:
        """How many sandboxes are waiting to be looked at."""
        with self._cond:
            return len(self._due)

    def forked(self) -> None:
        """In a forked child: the thread stayed in the parent."""
        self._cond = threading.Condition(threading.Lock())
        self._due = []
        self._thread = None

    def _main(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        _, _, ref = heapq.heappop(self._due)
                        break
                    self._cond.wait(self._due[0][0] - now if self._due else None)
            sandbox = ref()
            if sandbox is None:
                continue
            try:
                again = sandbox._trim_if_idle(now)
            except Exception:  # pragma: no cover - never lose the thread over one sandbox
                log.exception("trimming idle sandbox %s failed", sandbox.id)
                again = None
            del sandbox
            if again is not None:
                with self._cond:
                    heapq.heappush(self._due, (again, next(self._order), ref))


_trimmer = _Trimmer()
os.register_at_fork(after_in_child=_trimmer.forked)


def note(sandbox: Trimmable, due: float) -> None:
    """Have the ``hlasync-trim`` thread look at ``sandbox`` at monotonic time ``due``."""
    _trimmer.note(sandbox, due)


def pending() -> int:
    """How many sandboxes the trimmer has yet to look at (for tests)."""
    return _trimmer.pending()
