"""Snapshots (guest memory image + vCPU state) and the per-process template
cache that lets a new sandbox of an already-booted guest skip initialisation."""

from __future__ import annotations

import collections
import threading
import time

from ..guest.memory import MemoryImage
from .cpu import CpuState

__all__ = ["TEMPLATE_CACHE_SIZE", "Snapshot", "TemplateCache", "templates"]

#: Guests (by content and configuration) whose initial snapshot stays cached
#: for new sandboxes after every sandbox using it is gone.
TEMPLATE_CACHE_SIZE = 16


class Snapshot:
    """Guest memory and vCPU state of a sandbox at a ready point.

    Opaque; restore it with :meth:`Sandbox.restore` into the sandbox it came
    from or any sandbox of the same guest and configuration.
    """

    __slots__ = ("_compat", "_cpu", "_image", "taken_at")

    def __init__(self, compat: tuple[object, ...], image: MemoryImage, cpu: CpuState) -> None:
        self._compat = compat
        self._image = image
        self._cpu = cpu
        self.taken_at = time.time()

    def __repr__(self) -> str:
        return f"<Snapshot of {self._image.size} bytes taken at {self.taken_at:.3f}>"


class TemplateCache:
    """Initial snapshots by (guest digest, layout), least recently used first out.

    A template's memfd lives as long as the cache or any sandbox made from it
    holds it, so at most ``size`` unused templates keep a file descriptor.
    """

    def __init__(self, size: int = TEMPLATE_CACHE_SIZE) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple[object, ...], Snapshot] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> Snapshot | None:
        with self._lock:
            snapshot = self._entries.get(key)
            if snapshot is not None:
                self._entries.move_to_end(key)
            return snapshot

    def put(self, key: tuple[object, ...], snapshot: Snapshot) -> Snapshot:
        """Cache ``snapshot`` unless one is cached already; returns the cached one."""
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None:
                self._entries.move_to_end(key)
                return existing
            self._entries[key] = snapshot
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return snapshot

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a parent thread may have held it


#: The process-wide cache.
templates = TemplateCache()
