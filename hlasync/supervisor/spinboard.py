"""The spin board: one budget of spinning threads for all the worker
processes of a supervisor.

A thread that waits for a vCPU's owner, or an owner that waits for its next
request, spins for a few microseconds before it sleeps, but only while it
holds a *spin slot* (``native/hl_owner.c``): one slot per two CPUs, so that
spinners leave CPUs to the guests and the callers. Counted per process, N
worker processes would spin N-fold (16 processes with 8 slots each on 16
CPUs). The board makes it one budget: a memory file that the supervisor makes
and every worker process maps, one cell per worker (64 bytes apart, no false
sharing), in which a worker's threads count their slots; a thread may spin
while all the cells add up to no more than the supervisor's slots.

Hot sandboxes (guests that spin between calls, :mod:`hlasync.sandbox.hot`)
keep a CPU each: the budget that lets a sandbox go hot (one per two CPUs)
counts them in the same cells, so N worker processes do not keep N times as
many guests spinning either.

A worker that dies holding slots leaves its cell counted: the supervisor
clears the cell once the process is reaped (also when no next process can
start), and before it starts the worker's next process. A cell is never
below zero then; should one be (a give-back without its take), it counts as
zero and its own process takes no slot (it could take past the slots
unseen otherwise). A forked child of a worker counts alone. Workers on other
machines (Ray) count alone.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from ..kvm.helper import library, spin_slots
from ..sandbox import hot

__all__ = ["CELL", "SpinBoard"]

#: Bytes between two cells (a cache line each); the header is one cell.
CELL = 64
_HEADER = struct.Struct("=II")  # cells, slots
_COUNTS = struct.Struct("=ii")  # a cell: spinning threads, hot sandboxes


class SpinBoard:
    """One supervisor's board (see the module): made by the supervisor with
    :meth:`create`, mapped by each worker with :meth:`attach`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        if size < 2 * CELL or size % CELL:
            raise ValueError(f"a spin board of {size} bytes")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        cells, slots = _HEADER.unpack_from(self._map, 0)
        if cells != size // CELL - 1 or slots < 1:
            self._map.close()
            raise ValueError(f"a spin board with {cells} cells and {slots} slots in {size} bytes")
        self.cells, self.slots = cells, slots
        self._pinned: ctypes.c_char | None = None  # the cells the helper library counts in

    @classmethod
    def create(cls, cells: int, slots: int | None = None) -> SpinBoard:
        """A board for ``cells`` workers sharing ``slots`` (default: one per
        two CPUs this process may run on, or ``$HLASYNC_HOT_SLOTS``); ``fd``
        is passed to workers with ``pass_fds`` and closed by :meth:`close`."""
        if cells < 1:
            raise ValueError("a spin board needs at least one cell")
        slots = spin_slots() if slots is None else slots
        if slots < 1:
            raise ValueError("a spin board needs at least one slot")
        fd = os.memfd_create("hlasync-spin-board", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, (cells + 1) * CELL)
            header = mmap.mmap(fd, CELL, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                _HEADER.pack_into(header, 0, cells, slots)
            finally:
                header.close()
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    # ---------------------------------------------------------- supervisor
    def clear(self, cell: int) -> None:
        """Forget what ``cell``'s worker counted (its process is gone)."""
        _COUNTS.pack_into(self._map, self._offset(cell), 0, 0)

    def count(self, cell: int) -> int:
        """What ``cell``'s worker counts now: spin slots its threads hold."""
        return self.counts(cell)[0]

    def hot(self, cell: int) -> int:
        """What ``cell``'s worker counts now: its hot sandboxes."""
        return self.counts(cell)[1]

    def counts(self, cell: int) -> tuple[int, int]:
        spinning, hot_ = _COUNTS.unpack_from(self._map, self._offset(cell))
        return spinning, hot_

    def taken(self) -> int:
        """Slots held now by all the workers (a cell below zero counts as zero)."""
        return sum(max(self.count(cell), 0) for cell in range(self.cells))

    def _offset(self, cell: int) -> int:
        if not 0 <= cell < self.cells:
            raise IndexError(f"no cell {cell} in a board of {self.cells}")
        return (cell + 1) * CELL

    # -------------------------------------------------------------- worker
    def attach(self, cell: int) -> None:
        """Count this process's spinning threads in ``cell`` against the
        board's slots (a worker process, before any sandbox is made; the
        mapping stays for the process's life)."""
        self._offset(cell)
        # The C library keeps the address: the mapping is never closed now.
        self._pinned = ctypes.c_char.from_buffer(self._map, CELL)
        library().hl_owner_share_spin(ctypes.addressof(self._pinned), self.cells, cell, self.slots)
        hot.budget.share(self.slots)

    def close(self) -> None:
        """Unmap and close it (the supervisor's; an attached board stays)."""
        if self._pinned is not None:
            return
        self._map.close()
        os.close(self.fd)
