"""Loading the host-side helper library (``libhlwait.so``, built at install
from ``native/hl_wait.c`` and ``native/hl_owner.c``) through ctypes, which
releases the GIL for the length of each call into it."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings

from .. import _build
from ..errors import HlasyncError

__all__ = ["library"]

_lock = threading.Lock()


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded helper (rebuilt first in a source checkout where it is stale)."""
    target = _build.BUNDLED_DIR / _build.native.LIBRARY
    if "libhlwait" in _build.bundled_builds():
        with _lock:
            try:
                _build.build_bundled(only_stale=True, names=["libhlwait"])
            except _build.GuestBuildError as exc:
                if not target.exists():
                    raise HlasyncError(f"the helper library is not built: {exc}") from None
                warnings.warn(  # as for the bundled guests: never silently
                    f"rebuilding the helper library failed, using the stale {target}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise HlasyncError(f"cannot load the helper library {target}: {exc}") from None
    lib.hl_wait.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint64,
        ctypes.c_uint64,
    ]
    lib.hl_wait.restype = ctypes.c_int
    lib.hl_wake.argtypes = [ctypes.c_void_p]
    lib.hl_wake.restype = None
    u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    lib.hl_owner_loop.argtypes = [ptr]
    lib.hl_owner_loop.restype = None
    lib.hl_owner_call.argtypes = [ptr, ctypes.c_int32, i64, i64, i64, i64, i64, u64, u64]
    lib.hl_owner_call.restype = ctypes.c_int
    lib.hl_owner_wait.argtypes = [ptr, ctypes.c_uint32, u64, u64]
    lib.hl_owner_wait.restype = ctypes.c_int
    lib.hl_owner_kick.argtypes = [ptr]
    lib.hl_owner_kick.restype = None
    lib.hl_owner_warm.argtypes = [ptr]
    lib.hl_owner_warm.restype = None
    lib.hl_owner_set_spin_slots.argtypes = [ctypes.c_uint32]
    lib.hl_owner_set_spin_slots.restype = None
    lib.hl_owner_spinners.argtypes = []
    lib.hl_owner_spinners.restype = ctypes.c_uint32
    lib.hl_owner_share_spin.argtypes = [ptr, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32]
    lib.hl_owner_share_spin.restype = None
    lib.hl_owner_take_spin.argtypes = []
    lib.hl_owner_take_spin.restype = ctypes.c_int
    lib.hl_owner_give_spin.argtypes = []
    lib.hl_owner_give_spin.restype = None
    lib.hl_owner_hot.argtypes = []
    lib.hl_owner_hot.restype = ctypes.c_uint32
    lib.hl_owner_take_hot.argtypes = [ctypes.c_uint32]
    lib.hl_owner_take_hot.restype = ctypes.c_int
    lib.hl_owner_give_hot.argtypes = []
    lib.hl_owner_give_hot.restype = None
    lib.hl_owner_set_spin_slots(spin_slots())
    lib.hl_owner_forked.argtypes = []
    lib.hl_owner_forked.restype = None
    # A forked child has none of its parent's spinning threads.
    os.register_at_fork(after_in_child=lib.hl_owner_forked)
    return lib


def spin_slots() -> int:
    """How many threads of the process may spin at once waiting for a vCPU's
    owner or its answer: one per two CPUs it may run on, at least one
    (``$HLASYNC_HOT_SLOTS`` overrides it, as for hot sandboxes)."""
    text = os.environ.get("HLASYNC_HOT_SLOTS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return max(1, len(os.sched_getaffinity(0)) // 2)
