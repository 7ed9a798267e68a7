"""Sandbox configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .abi import IMAGE_BASE
from .crashdump.placement import RetentionPolicy
from .errors import ConfigError

__all__ = ["SandboxConfig"]

KiB = 1024
MiB = 1024 * KiB
PAGE = 4 * KiB
#: Largest guest memory: the page tables live below 1 MiB (128 tables of 2 MiB each).
MAX_MEMORY = 256 * MiB
MIN_MEMORY = 2 * MiB


#: Smallest value of each size field.
_MINIMUM_SIZES = {
    "memory_size": MIN_MEMORY,
    "stack_size": 8 * KiB,
    "input_buffer_size": 4 * KiB,
    "output_buffer_size": 4 * KiB,
    "heap_size": 4 * KiB,
}
#: Memory below the stack whatever the guest: everything up to the image base
#: (page tables, descriptor tables, PEB), the smallest image (one page) and the
#: guard page under the stack.
_BELOW_STACK = IMAGE_BASE + 2 * PAGE
_MAX_INIT_TIMEOUT = 3600.0
_MAX_SPIN = 1.0
_MAX_IDLE_TRIM = 86400.0
#: Environment variable giving ``SandboxConfig.spin``'s default (seconds, or
#: ``auto``).
SPIN_ENV = "HLASYNC_SPIN"
#: ``SandboxConfig.spin``'s default: spin only while calls come back to back.
AUTO: Literal["auto"] = "auto"


def _default_spin() -> float | Literal["auto"]:
    text = os.environ.get(SPIN_ENV, "").strip()
    if not text or text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise ConfigError(
            f"{SPIN_ENV} must be a number of seconds or {AUTO!r}, got {text!r}"
        ) from None


#: Environment variable giving ``SandboxConfig.hot_restore``'s default (``1`` or ``0``).
HOT_RESTORE_ENV = "HLASYNC_HOT_RESTORE"


def _default_hot_restore() -> bool:
    text = os.environ.get(HOT_RESTORE_ENV, "").strip()
    if text in ("", "0"):
        return False
    if text == "1":
        return True
    raise ConfigError(f"{HOT_RESTORE_ENV} must be 0 or 1, got {text!r}")


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Sizes of a sandbox's guest memory and behaviour switches.

    Every value is checked here, and a bad one raises :class:`ConfigError`
    (also a ``ValueError``) naming the field and the value given. Limits:

    - All sizes are ints in bytes and multiples of 4 KiB (4096).
    - ``memory_size`` (default 8 MiB): from 2 MiB to 256 MiB. The guest image
      starts at 1 MiB; below it sit the page tables and descriptor tables,
      which is also why 256 MiB is the most they map.
    - ``stack_size`` (default 256 KiB): at least 8 KiB.
    - ``input_buffer_size`` (default 256 KiB, call arguments) and
      ``output_buffer_size`` (default 256 KiB, results, prints and host
      calls): at least 4 KiB each. A call whose arguments do not fit raises
      ``ArgumentError``; a result that does not fit, ``GuestResultError``.
    - ``heap_size``: ``None`` (default) gives the heap all memory left after
      the image, stack and buffers; else at least 4 KiB.
    - Stack, buffers and heap must fit in ``memory_size`` above the 1 MiB
      where the image starts (checked here against the smallest image; the
      real image size is checked when a sandbox is made, with
      ``GuestImageError``).
    - ``init_timeout`` (default 10): seconds, more than 0 and at most 3600;
      bounds the guest's initialisation (from its entry point to its
      dispatcher).
    - ``spin`` (default ``"auto"``): how long the guest's dispatcher spins
      waiting for the next call after one finishes, on a thread of its own.
      A spinning sandbox is *hot*: a call that comes within the spin is
      served through the doorbell page with no VM exit (a few µs instead of
      ~30 on a PVM host), and so are the host calls and prints it makes, at
      the price of a CPU busy for up to the spin after every call. Seconds
      from 0 to 1 fix it; 0 keeps the exit path (every call one ``KVM_RUN``
      on the caller's thread). ``"auto"`` spins only while calls come back to
      back (the caller came back within 200 µs of the last call, on
      average), four times that gap, from 300 µs to 1 ms, and not at all
      when calls are sparse. ``Sandbox``, a supervisor's dedicated
      sandboxes, hot pools' members and hot ``JSSandbox`` objects
      (``hot_restore``) use it; other pool members and other ``JSSandbox``
      objects (restored after every call, on the exit path) take the exit
      path. ``$HLASYNC_SPIN`` (seconds or
      ``auto``) changes the default. Whatever the setting, a sandbox spins
      only while the CPUs are free for it: at most one per two CPUs
      (``$HLASYNC_HOT_SLOTS``), and not while other threads call sandboxes;
      meanwhile it takes the exit path.

    ``hot_restore`` (a bool, default False): :meth:`Sandbox.restore` of a
    hot sandbox (its guest spinning after a call) puts back the memory the
    call changed *without stopping the guest*: after each call the guest's
    runtime parks in ``hl_park``, which resets the registers, flags, data
    segments and x87/MMX/SSE/AVX state itself and then waits touching nothing
    but three doorbell words, so the host copies the pages back meanwhile
    and the next call starts with no VM exit at all. A restore that cannot
    be done so (the guest did not park, too many pages, another snapshot, a
    cold sandbox) takes the exit path as before. The registers are reset by
    guest code at CPL3, so this trusts the guest's runtime: a guest that
    takes over its own machine code can keep values in registers from one
    call to the next, and a write it makes after the host put a page back
    reaches the next call (the restore after that call undoes it). On this
    PVM host code at CPL0 is emulated, and a supervisor-mode park would cost
    more than the exit it saves. Use it
    for guests whose machine code you trust (the bundled JavaScript runtime
    running tenants' JavaScript, your own C guests); keep the default for
    guest binaries you do not. A pool whose config has it is a *hot pool*:
    its members spin (``spin``) and restore in place, and a call waits for
    the member being restored rather than take one that went cold.
    ``$HLASYNC_HOT_RESTORE`` (``1`` or ``0``) changes the default.
    docs/architecture.md ("Hot restore").

    ``idle_trim`` (default 10; seconds, more than 0 and at most 86400, or
    ``None``): after this long with no call and no operation, the sandbox
    gives back the pages of its backing image (template or snapshot) that
    its guest only read. All sandboxes made from one image share those
    pages, but RSS counts them once per sandbox that maps them (about 70 KiB
    each after a call of the bundled guest, 1.4 MiB for a JavaScript
    sandbox); the pages the guest wrote are kept. The next call maps what
    it reads again, once: a fault per page (on a PVM host 40-130 µs more
    for a call of the bundled guest, 1-9 ms for a JavaScript handler call).
    ``None`` never trims. docs/architecture.md §13 ("Idle trim").

    ``debug_port`` (default ``None``: off): serve the GDB remote protocol for
    this sandbox on ``debug_host:debug_port`` (0: any free port, see
    ``Sandbox.debug_address``), one debugger at a time; the first call waits
    at its guest function's entry until a debugger attaches and resumes it.
    ``debug_host`` (default ``"127.0.0.1"``): loopback only unless you name
    another address. A debugged sandbox always takes the exit path (no
    spin). docs/debugging.md.

    ``crashdump_enabled`` (a bool, default True) writes a core dump on faults,
    aborts, protocol errors and watchdog timeouts; ``crashdump_dir`` (a path
    or None) overrides the directory (else ``HYPERLIGHT_CORE_DUMP_DIR``, else
    the system temp directory) and ``crashdump_retention`` (a
    ``RetentionPolicy`` or None) bounds how many dumps that directory keeps.
    """

    memory_size: int = 8 * MiB
    stack_size: int = 256 * KiB
    heap_size: int | None = None
    input_buffer_size: int = 256 * KiB
    output_buffer_size: int = 256 * KiB
    crashdump_enabled: bool = True
    crashdump_dir: str | os.PathLike[str] | None = None
    crashdump_retention: RetentionPolicy | None = None
    init_timeout: float = 10.0
    spin: float | Literal["auto"] = field(default_factory=_default_spin)
    idle_trim: float | None = 10.0
    hot_restore: bool = field(default_factory=_default_hot_restore)
    debug_port: int | None = None
    debug_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("memory_size", "stack_size", "input_buffer_size", "output_buffer_size"):
            _check_size(name, getattr(self, name))
        if self.heap_size is not None:
            _check_size("heap_size", self.heap_size)
        if self.memory_size > MAX_MEMORY:
            raise ConfigError(
                f"memory_size must be between {MIN_MEMORY // MiB} MiB and "
                f"{MAX_MEMORY // MiB} MiB, got {_got(self.memory_size)}"
            )
        above_image = self.stack_size + self.input_buffer_size + self.output_buffer_size
        above_image += self.heap_size or 0
        if above_image > self.memory_size - _BELOW_STACK:
            parts = "stack_size, input_buffer_size, output_buffer_size" + (
                " and heap_size" if self.heap_size is not None else ""
            )
            raise ConfigError(
                f"{parts} add up to {_human(above_image)}, more than the "
                f"{_human(self.memory_size - _BELOW_STACK)} that memory_size "
                f"{_human(self.memory_size)} leaves above the guest image (which starts at "
                "1 MiB): raise memory_size or lower them"
            )
        if (
            isinstance(self.init_timeout, bool)
            or not isinstance(self.init_timeout, (int, float))
            or not 0 < self.init_timeout <= _MAX_INIT_TIMEOUT
        ):
            raise ConfigError(
                f"init_timeout must be a number of seconds in (0, 3600], got {self.init_timeout!r}"
            )
        if self.spin != AUTO and (
            isinstance(self.spin, bool)
            or not isinstance(self.spin, (int, float))
            or not 0 <= self.spin <= _MAX_SPIN
        ):
            raise ConfigError(
                f"spin must be a number of seconds in [0, 1] or {AUTO!r}, got {self.spin!r}"
            )
        if self.idle_trim is not None and (
            isinstance(self.idle_trim, bool)
            or not isinstance(self.idle_trim, (int, float))
            or not 0 < self.idle_trim <= _MAX_IDLE_TRIM
        ):
            raise ConfigError(
                f"idle_trim must be a number of seconds in (0, 86400] or None, got "
                f"{self.idle_trim!r}"
            )
        if self.debug_port is not None and (
            type(self.debug_port) is not int or not 0 <= self.debug_port <= 65535
        ):
            raise ConfigError(
                f"debug_port must be an int in [0, 65535] or None, got {self.debug_port!r}"
            )
        if not isinstance(self.debug_host, str) or not self.debug_host:
            raise ConfigError(f"debug_host must be a non-empty str, got {self.debug_host!r}")
        if not isinstance(self.hot_restore, bool):
            raise ConfigError(f"hot_restore must be a bool, got {type(self.hot_restore).__name__}")
        if not isinstance(self.crashdump_enabled, bool):
            raise ConfigError(
                f"crashdump_enabled must be a bool, got {type(self.crashdump_enabled).__name__}"
            )
        path_types = (str, os.PathLike)
        if self.crashdump_dir is not None and not isinstance(self.crashdump_dir, path_types):
            raise ConfigError(
                f"crashdump_dir must be a path or None, got {type(self.crashdump_dir).__name__}"
            )
        if self.crashdump_retention is not None and not isinstance(
            self.crashdump_retention, RetentionPolicy
        ):
            raise ConfigError(
                "crashdump_retention must be a RetentionPolicy or None, got "
                f"{type(self.crashdump_retention).__name__}"
            )


def _check_size(name: str, value: object) -> None:
    if type(value) is not int:
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if value % PAGE:
        raise ConfigError(f"{name} must be a multiple of 4096 (4 KiB), got {_got(value)}")
    minimum = _MINIMUM_SIZES[name]
    if value < minimum:
        what = f"at least {_human(minimum)}"
        if name == "memory_size":
            what = f"between {MIN_MEMORY // MiB} MiB and {MAX_MEMORY // MiB} MiB"
        raise ConfigError(f"{name} must be {what}, got {_got(value)}")


def _got(value: int) -> str:
    human = _human(value)
    return f"{value:,}" if human.endswith("bytes") else f"{value:,} ({human})"


def _human(size: int) -> str:
    """``size`` in the largest binary unit that divides it: 3 MiB, 1,536 KiB."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size > 0 and size % unit == 0:
            return f"{size // unit:,} {name}"
    return f"{size:,} bytes"
