"""The few libc calls Python's standard library does not expose with the
semantics we need: ``mmap`` at a fixed address, ``munmap`` and ``madvise`` on
raw addresses."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from . import owner as _owner

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MADV_DONTNEED = 4
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def mmap(address: int, length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    if flags & MAP_FIXED and _owner.CHECK:
        _owner.check_range(address, length, "fixed mmap")
    result = _mmap(address or None, length, prot, flags, fd, offset)
    if result is None or result == MAP_FAILED:
        _raise("mmap")
    assert result is not None
    return int(result)


def munmap(address: int, length: int) -> None:
    if _owner.CHECK:
        _owner.check_range(address, length, "munmap")
    if _munmap(address, length) != 0:
        _raise("munmap")


def madvise(address: int, length: int, advice: int) -> None:
    if advice == MADV_DONTNEED and _owner.CHECK:
        _owner.check_range(address, length, "madvise(MADV_DONTNEED)")
    if _madvise(address, length, advice) != 0:
        _raise("madvise")
