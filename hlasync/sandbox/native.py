"""The host-side helper library (``libhlwait.so``, built at install from
``native/hl_wait.c``), through ctypes, which releases the GIL for the length
of each call: a thread can wait for a guest's doorbell word, spinning and
then sleeping, while every other Python thread runs.
"""

from __future__ import annotations

import ctypes

from ..kvm.helper import library

__all__ = [
    "FOREVER",
    "WAIT_ASK",
    "WAIT_FLAG",
    "WAIT_TIMEOUT",
    "WAIT_WORD",
    "Flag",
    "library",
    "wait",
    "wait_flag",
]

WAIT_TIMEOUT, WAIT_WORD, WAIT_FLAG, WAIT_ASK = 0, 1, 2, 3
#: A timeout that never ends.
FOREVER = (1 << 64) - 1


class Flag:
    """A 32-bit word in host memory that one thread raises (:meth:`wake`) to end
    another's :func:`wait` early."""

    __slots__ = ("_word", "address")

    def __init__(self) -> None:
        self._word = ctypes.c_uint32(0)
        self.address = ctypes.addressof(self._word)

    @property
    def raised(self) -> bool:
        return bool(self._word.value)

    def lower(self) -> None:
        self._word.value = 0

    def wake(self) -> None:
        library().hl_wake(self.address)


_NEVER = ctypes.c_uint64(1)  # a word that never becomes 0
_NEVER_ADDRESS = ctypes.addressof(_NEVER)


def wait(
    address: int,
    expected: int,
    flag: Flag,
    spin_ns: int,
    timeout_ns: int = FOREVER,
    ask: tuple[int, int] | None = None,
) -> int:
    """Wait, without the GIL, until the 64-bit word at ``address`` equals
    ``expected`` (:data:`WAIT_WORD`), the two 64-bit words at the addresses in
    ``ask`` differ (:data:`WAIT_ASK`), ``flag`` is raised (:data:`WAIT_FLAG`)
    or ``timeout_ns`` passed (:data:`WAIT_TIMEOUT`): spinning for ``spin_ns``,
    then sleeping on the flag and looking at the words every 50 µs. The words
    must stay mapped for the whole wait (a guest's memory, held by the caller)."""
    first, second = ask if ask is not None else (_NEVER_ADDRESS, _NEVER_ADDRESS)
    return int(
        library().hl_wait(address, expected, first, second, flag.address, spin_ns, timeout_ns)
    )


def wait_flag(flag: Flag, timeout_ns: int = FOREVER) -> bool:
    """Wait, without the GIL, for ``flag`` alone; True when it was raised."""
    return wait(_NEVER_ADDRESS, 0, flag, 0, timeout_ns) == WAIT_FLAG
