"""Sandbox: one guest in one KVM micro-VM, driven synchronously.

The package splits the sandbox by concern:

- :mod:`.core` the :class:`Sandbox` (API, every change of state, a call's lifecycle, close)
- :mod:`.holder` the fields the parts share, and who holds the vCPU (operations, waits)
- :mod:`.boot` making the machine (a template or a timed boot), taking snapshots
- :mod:`.requests` stopping and dumping a running call, and the caller's answers
- :mod:`.spin` hot sessions at the end of a call, and when the hot thread's run returns
- :mod:`.calls` a call's identity, owner thread, kicks and requests
- :mod:`.runner` the owner's run loop: exits, host calls, prints, results
- :mod:`.faults` CPU exceptions decoded from the interrupt frame
- :mod:`.cpu` the vCPU state saved and restored, vCPU set-up (CPUID, CR4)
- :mod:`.machine` VM, vCPU and guest memory, and the pages written
- :mod:`.snapshots` snapshots and the per-process template cache
- :mod:`.dumps` capturing and writing core dumps
- :mod:`.registry` live sandboxes, and forked children
- :mod:`.hot` hot sandboxes: the hot thread, the reaper, the budget, ``spin="auto"``
"""

from .calls import CallHandle
from .core import Sandbox, SandboxState, check_call, live_sandboxes
from .dumps import CrashdumpRecord
from .faults import VECTOR_NAMES, ExceptionInfo
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
