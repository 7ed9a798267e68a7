"""Host mappings of guest memory.

Guest memory is a ``MAP_PRIVATE`` mapping of a memfd that holds a snapshot:
the guest's writes land in private copy-on-write pages. Going back to the
snapshot copies its content over the pages written since (KVM's dirty log
names them; the pages stay mapped, so the next call does not fault them in
again), or drops every private page with ``madvise(MADV_DONTNEED)`` when
many were written. Going to another snapshot maps its memfd over the same
address (``MAP_FIXED``), which KVM follows through its MMU notifiers.

Which pages hold data is never guessed from residency (``mincore`` reports a
swapped-out page as absent): the memfd says where its data is
(``SEEK_DATA``/``SEEK_HOLE``) and the caller says which pages were written
since it was mapped (KVM's dirty log plus the host's own writes).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..kvm import _libc

if TYPE_CHECKING:
    from ..kvm.owner import Owner

__all__ = ["GuestMemory", "MemoryImage"]

PAGE = 0x1000

#: Per /proc/self/pagemap entry (8 bytes, little-endian), its top byte: bit 7
#: is "present" (bit 63), bit 5 "a file page or shared" (bit 61). A private
#: mapping's page with both is the backing image's own page, not a copy.
_SHARED_PRESENT = 0xA0
_SHARED_MASK = bytes(1 if byte & _SHARED_PRESENT == _SHARED_PRESENT else 0 for byte in range(256))
_SHARED_RUN = re.compile(b"\x01+")


class MemoryImage:
    """An immutable memfd holding a full guest-memory image (closed when unreferenced)."""

    def __init__(self, size: int, name: str = "hlasync-snapshot") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        try:
            os.ftruncate(self.fd, size)
        except BaseException:
            self._finalizer()
            raise

    def write_runs(self, source: memoryview, runs: list[tuple[int, int]]) -> None:
        """Copy the non-zero pages of ``runs`` (page-aligned byte ranges) from
        ``source``. Zero pages stay holes: fewer pages in the page cache, and
        fewer mapped by fault-around when a guest first touches its memory."""
        for start, end in _nonzero_runs(source, runs):
            view = source[start:end]
            written = 0
            while written < len(view):
                written += os.pwrite(self.fd, view[written:], start + written)

    def data_runs(self) -> list[tuple[int, int]]:
        """Page-aligned byte ranges of the memfd that hold data (holes read as zero)."""
        runs: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            runs.append((start & ~(PAGE - 1), (end + PAGE - 1) & ~(PAGE - 1)))
            offset = end
        return runs

    def close(self) -> None:
        self._finalizer()


_ZERO_PAGE = bytes(PAGE)


def _nonzero_runs(source: memoryview, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    for run_start, run_end in runs:
        for page in range(run_start, run_end, PAGE):
            if source[page : page + PAGE].tobytes() == _ZERO_PAGE:
                continue
            if found and found[-1][1] == page:
                found[-1] = (found[-1][0], page + PAGE)
            else:
                found.append((page, page + PAGE))
    return found


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Byte ranges covering the given page indexes, merged where adjacent."""
    runs: list[tuple[int, int]] = []
    for page in sorted(set(pages)):
        start = page * PAGE
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + PAGE)
        else:
            runs.append((start, start + PAGE))
    return runs


def merge_runs(*groups: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of byte ranges, sorted and merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(run for group in groups for run in group):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class GuestMemory:
    """``size`` bytes of guest memory mapped in this process."""

    def __init__(self, backing: MemoryImage) -> None:
        self.size = backing.size
        self.address = _libc.mmap(
            0,
            self.size,
            _libc.PROT_READ | _libc.PROT_WRITE,
            _libc.MAP_PRIVATE | _libc.MAP_NORESERVE,
            backing.fd,
        )
        self.backing = backing
        #: The owner thread of the vCPU that runs on this memory (set once there
        #: is one): only it maps over or unmaps the memory.
        self.owner: Owner | None = None
        self._backing_map: tuple[int, memoryview] | None = None
        # Safe: the array covers exactly the mapping, which lives until close().
        self._array = (ctypes.c_ubyte * self.size).from_address(self.address)
        self.view = memoryview(self._array).cast("B")

    def reset(self) -> None:
        """Discard every guest write since the backing image was mapped."""
        self._discard(self.address, self.size)

    def _discard(self, address: int, length: int) -> None:
        """``madvise(MADV_DONTNEED)``, on the owner thread once there is one."""
        if self.owner is not None:
            self.owner.madvise(address, length, _libc.MADV_DONTNEED)
        else:
            _libc.madvise(address, length, _libc.MADV_DONTNEED)

    def trim(self) -> int:
        """Drop this mapping's pages of the backing image that no write has
        copied (what the guest only read), and the host's read-only view of
        the image; the bytes dropped. What the guest sees does not change: a
        dropped page is mapped again from the image at its next access.

        Only while nothing writes the memory (no guest runs, no host frame is
        being written): a write that copies a page between the look and the
        drop would be lost. Without ``/proc/self/pagemap``, drops nothing.
        """
        pages = self.size // PAGE
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            entries = bytearray()
            offset = (self.address // PAGE) * 8
            while len(entries) < pages * 8:
                chunk = os.pread(fd, pages * 8 - len(entries), offset + len(entries))
                if not chunk:
                    return 0
                entries += chunk
        except OSError:
            return 0
        finally:
            os.close(fd)
        dropped = 0
        for run in _SHARED_RUN.finditer(bytes(entries[7::8]).translate(_SHARED_MASK)):
            start, end = run.span()
            self._discard(self.address + start * PAGE, (end - start) * PAGE)
            dropped += (end - start) * PAGE
        self._close_backing_map()
        return dropped

    def reset_pages(self, pages: Iterable[int]) -> None:
        """Copy the backing image's content over ``pages`` (page indexes).

        Unlike :meth:`reset`, the pages stay mapped, so the guest does not
        fault them in again on its next call.
        """
        source = self._backing_view()
        view = self.view
        for page in pages:
            start = page * PAGE
            view[start : start + PAGE] = source[start : start + PAGE]

    def reset_range(self, start: int, length: int) -> None:
        """Copy the backing image's bytes over ``[start, start + length)``."""
        source = self._backing_view()
        self.view[start : start + length] = source[start : start + length]

    def _backing_view(self) -> memoryview:
        """A read-only view of the backing image (mapped on first use, no fd kept)."""
        if self._backing_map is None:
            address = _libc.mmap(0, self.size, _libc.PROT_READ, _libc.MAP_SHARED, self.backing.fd)
            # Safe: the array covers exactly this mapping, unmapped with the view released.
            array = (ctypes.c_ubyte * self.size).from_address(address)
            self._backing_map = (address, memoryview(array).cast("B"))
        return self._backing_map[1]

    def _close_backing_map(self) -> None:
        if self._backing_map is not None:
            address, view = self._backing_map
            view.release()
            _libc.munmap(address, self.size)
            self._backing_map = None

    def remap(self, backing: MemoryImage) -> None:
        """Replace the contents with another image, at the same host address."""
        if backing.size != self.size:
            raise ValueError("image size does not match guest memory")
        prot = _libc.PROT_READ | _libc.PROT_WRITE
        flags = _libc.MAP_PRIVATE | _libc.MAP_FIXED | _libc.MAP_NORESERVE
        if self.owner is not None:
            self.owner.mmap_fixed(self.address, self.size, prot, flags, backing.fd)
        else:
            _libc.mmap(self.address, self.size, prot, flags, backing.fd)
        self._close_backing_map()
        self.backing = backing

    def data_runs(self, written: Iterable[int] | None) -> list[tuple[int, int]]:
        """Byte ranges that may hold data: the backing image's data plus the
        ``written`` pages (changed since it was mapped). ``None`` means the
        writes are unknown: every page is a candidate."""
        if written is None:
            return [(0, self.size)]
        return merge_runs(self.backing.data_runs(), page_runs(written))

    def snapshot_image(self, runs: Iterable[tuple[int, int]]) -> MemoryImage:
        """A new memfd with the contents of ``runs`` (everything else a hole)."""
        image = MemoryImage(self.size)
        try:
            image.write_runs(self.view, list(runs))
        except BaseException:
            image.close()
            raise
        return image

    def read(self, address: int, size: int) -> bytes:
        """Bytes of guest memory; ValueError for a range outside guest memory."""
        if address < 0 or size < 0 or address + size > self.size:
            raise ValueError(f"[{address:#x}, +{size:#x}) is outside guest memory")
        return bytes(self.view[address : address + size])

    def close(self) -> None:
        self._close_backing_map()
        if self.address:
            self.view.release()
            del self._array
            address, self.address = self.address, 0
            if self.owner is not None:
                self.owner.munmap(address, self.size)
            else:
                _libc.munmap(address, self.size)
