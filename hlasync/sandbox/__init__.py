"""Sandbox: one guest in one KVM micro-VM, driven synchronously.

The package splits the sandbox by concern:

- :mod:`.core` the :class:`Sandbox` (API, states, who holds the vCPU, lifecycle)
- :mod:`.calls` a call's identity, owner thread, kicks and requests
- :mod:`.runner` the owner's run loop: exits, host calls, prints, results
- :mod:`.faults` CPU exceptions decoded from the interrupt frame
- :mod:`.cpu` the vCPU state saved and restored, vCPU set-up (CPUID, CR4)
- :mod:`.machine` VM, vCPU and guest memory, and the pages written
- :mod:`.snapshots` snapshots and the per-process template cache
- :mod:`.dumps` capturing and writing core dumps
- :mod:`.registry` live sandboxes, and forked children
"""

from .calls import CallHandle
from .core import Sandbox, SandboxState, check_call
from .dumps import CrashdumpRecord
from .faults import VECTOR_NAMES, ExceptionInfo
from .registry import live_sandboxes
from .snapshots import Snapshot

__all__ = [
    "VECTOR_NAMES",
    "CallHandle",
    "CrashdumpRecord",
    "ExceptionInfo",
    "Sandbox",
    "SandboxState",
    "Snapshot",
    "check_call",
    "live_sandboxes",
]
