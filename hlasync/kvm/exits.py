"""vCPU exits as values: one small frozen dataclass per ``KVM_EXIT_*`` kind."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Exit",
    "FailEntry",
    "Hlt",
    "InternalError",
    "Interrupted",
    "IoIn",
    "IoOut",
    "Mmio",
    "Shutdown",
    "UnknownExit",
]


@dataclass(frozen=True, slots=True)
class IoOut:
    """``KVM_EXIT_IO``, direction out: the guest executed ``out`` (or ``outs``)."""

    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """``KVM_EXIT_IO``, direction in: the guest executed ``in`` (or ``ins``)."""

    port: int
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class Hlt:
    """``KVM_EXIT_HLT``: ``hlt`` at CPL0 (at CPL3 it is a #GP instead)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """``KVM_EXIT_SHUTDOWN``: triple fault; the vCPU state is no longer meaningful."""


@dataclass(frozen=True, slots=True)
class Mmio:
    """``KVM_EXIT_MMIO``: an access to guest-physical memory with no memslot."""

    address: int
    is_write: bool
    length: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Interrupted:
    """``KVM_RUN`` returned ``EINTR`` (a kick) or ``KVM_EXIT_INTR``."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""

    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not emulate or deliver something."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """Any other exit reason (``KVM_EXIT_UNKNOWN``, ``KVM_EXIT_DEBUG``, ...)."""

    reason: int


Exit = IoOut | IoIn | Hlt | Shutdown | Mmio | Interrupted | FailEntry | InternalError | UnknownExit
