"""Giving back the mappings of idle sandboxes (``SandboxConfig.idle_trim``).

A sandbox's guest memory is a private mapping of its backing image (the
template, or the snapshot it was restored to): the pages its guest only read
are the image's own pages, shared by every sandbox made from it, and RSS
counts each of them once per sandbox that maps it (PSS counts it once in
all). After ``idle_trim`` seconds with neither a call nor an operation, the
process-wide ``hlasync-trim`` thread drops those shared mappings; the pages
the guest wrote are kept, so nothing the guest sees changes, and its next
access to a dropped page maps it again (a minor fault, a few µs, once).

The thread sleeps until the earliest sandbox is due and ends when none is
noted (a later call makes another): trimmed idle sandboxes cost no wake-ups. It holds only
weak references, so a sandbox dropped unclosed is collected as usual, and a
trim holds the sandbox like any operation on an idle sandbox (a call that
comes meanwhile waits for it, a busy sandbox is tried again later).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["Trimmable", "forget", "note", "pending", "settle", "trims"]

log = logging.getLogger("hlasync.sandbox")


class Trimmable(Protocol):
    """What the trimmer asks of a sandbox."""

    id: str

    def _trim_if_idle(self, now: float) -> bool:
        """Trim if idle long enough (True), else :func:`note` itself again
        (under its lock, so that a close in between cannot be missed)."""
        ...


class _Trimmer:
    """The ``hlasync-trim`` thread and the sandboxes it is to look at. The
    thread runs only while some sandbox is noted (the reaper's pattern in
    :mod:`.hot`): it ends with the last, and :func:`note` makes another."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, weakref.ref[Trimmable]]] = []  # a heap
        self._noted: set[weakref.ref[Trimmable]] = set()  # what the heap holds that counts
        # Refs whose sandbox was collected unclosed: appended by the weakref
        # callback, which may run inside the GC anywhere, so it takes no lock.
        self._dead: collections.deque[weakref.ref[Trimmable]] = collections.deque()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._ending: threading.Thread | None = None  # the last thread, once it ends
        self.trims = 0  # sandboxes trimmed so far

    def note(self, sandbox: Trimmable, due: float) -> bool:
        """Look at ``sandbox`` at monotonic time ``due`` (once per noting).
        False when no thread could be started for it (logged): not noted."""
        ref = weakref.ref(sandbox, self._dead.append)
        with self._cond:
            self._prune_locked()
            earliest = self._due[0][0] if self._due else None
            if self._thread is None:
                thread = threading.Thread(target=self._main, name="hlasync-trim", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread left, or the interpreter is ending
                    log.warning("sandbox %s: no idle trim: %s", sandbox.id, exc)
                    return False
                self._thread = thread
            elif earliest is None or due < earliest:
                self._cond.notify_all()
            heapq.heappush(self._due, (due, next(self._order), ref))
            self._noted.add(ref)
            if len(self._due) > 2 * len(self._noted) + 64:  # entries of closed sandboxes
                self._due = [entry for entry in self._due if entry[2] in self._noted]
                heapq.heapify(self._due)
        return True

    def forget(self, sandbox: Trimmable) -> None:
        """``sandbox`` closed: not to be looked at (the thread ends with the last)."""
        with self._cond:
            self._noted.discard(weakref.ref(sandbox))
            self._prune_locked()
            if not self._noted:
                self._cond.notify_all()

    def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the thread to end, if nothing is noted."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._prune_locked()
            if self._noted:
                return
            self._cond.notify_all()
            while self._thread is not None and not self._noted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is threading.current_thread():
                    return
                self._cond.wait(remaining)
            ending = None if self._noted else self._ending
        if ending is not None and ending is not threading.current_thread():
            ending.join(max(deadline - time.monotonic(), 0.0))  # it has returned from _main

    def pending(self) -> int:
        """How many sandboxes are waiting to be looked at."""
        with self._cond:
            self._prune_locked()
            return len(self._noted)

    def forked(self) -> None:
        """In a forked child: the thread stayed in the parent."""
        self._cond = threading.Condition(threading.Lock())
        self._due = []
        self._noted = set()
        self._dead = collections.deque()
        self._thread = self._ending = None

    def _prune_locked(self) -> None:
        while self._dead:
            self._noted.discard(self._dead.popleft())

    def _main(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._prune_locked()
                    if not self._noted:  # nothing to look at: the thread ends
                        self._due = []
                        self._ending, self._thread = self._thread, None
                        self._cond.notify_all()  # settle() waits for this
                        return
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        _, _, ref = heapq.heappop(self._due)
                        if ref not in self._noted:
                            continue  # closed (or noted again) since
                        self._noted.discard(ref)
                        break
                    self._cond.wait(self._due[0][0] - now if self._due else None)
            sandbox = ref()
            if sandbox is None:
                continue
            try:
                if sandbox._trim_if_idle(now):
                    self.trims += 1
            except Exception:  # pragma: no cover - never lose the thread over one sandbox
                log.exception("trimming idle sandbox %s failed", sandbox.id)
            del sandbox


_trimmer = _Trimmer()
os.register_at_fork(after_in_child=_trimmer.forked)


def note(sandbox: Trimmable, due: float) -> bool:
    """Have the ``hlasync-trim`` thread look at ``sandbox`` at monotonic time
    ``due``; False if no thread could be started (logged)."""
    return _trimmer.note(sandbox, due)


def forget(sandbox: Trimmable) -> None:
    """``sandbox`` closed: the trimmer no longer looks at it."""
    _trimmer.forget(sandbox)


def settle(timeout: float) -> None:
    """Wait (at most ``timeout``) for the trim thread to end if nothing is noted."""
    _trimmer.settle(timeout)


def trims() -> int:
    """How many times an idle sandbox was trimmed in this process."""
    return _trimmer.trims


def pending() -> int:
    """How many sandboxes the trimmer has yet to look at (for tests)."""
    return _trimmer.pending()
