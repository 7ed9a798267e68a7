"""hlasync: run guest functions in KVM micro-VMs, supervised from async
Python, with ELF core dumps of every hang and crash.

    from hlasync import Sandbox, guests
    with Sandbox(guests.path("simpleguest")) as sb:
        assert sb.call("add", 2, 3) == 5

    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(guests.path("simpleguest"), size=4)
        assert await pool.call("add", 2, 3, timeout=1.0) == 5
"""

import logging

from . import crashdump, events, guests
from .abi import FunctionSignature, ValueType
from .config import SandboxConfig
from .crashdump import CoreDump, RetentionPolicy, install_dump_signal
from .errors import (
    ArgumentError,
    CallError,
    ConfigError,
    CrashdumpError,
    DebuggerError,
    FunctionNotFound,
    GuestAborted,
    GuestCancelled,
    GuestCrashed,
    GuestError,
    GuestImageError,
    GuestProtocolError,
    GuestResultError,
    GuestTimeout,
    HlasyncError,
    HostFunctionError,
    InvalidCoreDump,
    IoctlError,
    JSError,
    JSResultError,
    JSSyntaxError,
    KvmError,
    KvmUnavailableError,
    OwnerBusy,
    SandboxBusy,
    SandboxClosed,
    SandboxPoisoned,
    SandboxStateError,
    SupervisorBusy,
    SupervisorClosed,
    SupervisorError,
    WorkerLost,
)
from .guest.image import GuestImage
from .sandbox import CallHandle, CrashdumpRecord, Sandbox, SandboxState, Snapshot
from .supervisor import (
    JSPool,
    PendingCall,
    Pool,
    SupervisedSandbox,
    Supervisor,
    SupervisorStatistics,
)

__version__ = "0.1.0"

# A library logs; the application decides where records go.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ArgumentError",
    "CallError",
    "CallHandle",
    "ConfigError",
    "CoreDump",
    "CrashdumpError",
    "CrashdumpRecord",
    "DebuggerError",
    "FunctionNotFound",
    "FunctionSignature",
    "GuestAborted",
    "GuestCancelled",
    "GuestCrashed",
    "GuestError",
    "GuestImage",
    "GuestImageError",
    "GuestProtocolError",
    "GuestResultError",
    "GuestTimeout",
    "HlasyncError",
    "HostFunctionError",
    "InvalidCoreDump",
    "IoctlError",
    "JSError",
    "JSPool",
    "JSResultError",
    "JSSyntaxError",
    "KvmError",
    "KvmUnavailableError",
    "OwnerBusy",
    "PendingCall",
    "Pool",
    "RetentionPolicy",
    "Sandbox",
    "SandboxBusy",
    "SandboxClosed",
    "SandboxConfig",
    "SandboxPoisoned",
    "SandboxState",
    "SandboxStateError",
    "Snapshot",
    "SupervisedSandbox",
    "Supervisor",
    "SupervisorBusy",
    "SupervisorClosed",
    "SupervisorError",
    "SupervisorStatistics",
    "ValueType",
    "WorkerLost",
    "__version__",
    "crashdump",
    "events",
    "guests",
    "install_dump_signal",
]
