"""Setting up the JS runtime guest in a sandbox: sizes, the engine, and the
handlers and modules a sandbox (or every sandbox of a pool) loads."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

from .. import guests
from ..config import MiB, SandboxConfig
from ..errors import ConfigError, GuestImageError
from ..sandbox import Sandbox
from . import protocol

__all__ = [
    "DEFAULT_HEAP_SIZE",
    "GUEST",
    "call_handler",
    "check_handler",
    "default_config",
    "install",
    "start_engine",
]

GUEST = "jsruntime"
DEFAULT_HEAP_SIZE = 32 * MiB
MIN_HEAP_SIZE = 1 * MiB
#: Guest memory beyond the JS heap: engine code and data, stack, buffers, allocator slack.
OVERHEAD = 24 * MiB
MAX_MEMORY = 256 * MiB
STACK_SIZE = 1 * MiB
BUFFER_SIZE = 2 * MiB
#: Stack kept free for C code below the deepest JS frame (host calls, the interrupt handler).
STACK_RESERVE = 128 * 1024


def guest_path() -> Any:
    return guests.path(GUEST)


def default_config(heap_size: int = DEFAULT_HEAP_SIZE, **options: Any) -> SandboxConfig:
    """A sandbox configuration for a JS heap of ``heap_size`` bytes (the engine's
    memory limit): memory for the heap plus the engine, a 1 MiB stack, 2 MiB
    input and output buffers (events and results up to about 2 MiB), and no
    idle trim (``idle_trim=None``: a handler call after one maps ~350 pages
    of the runtime again, 1-9 ms on a PVM host, for RSS alone; the pages
    are shared by every JS sandbox of the process). ``options`` override any
    field."""
    if type(heap_size) is not int or not MIN_HEAP_SIZE <= heap_size <= MAX_MEMORY - OVERHEAD:
        raise ConfigError(
            f"heap_size must be an int from {MIN_HEAP_SIZE // MiB} MiB to "
            f"{(MAX_MEMORY - OVERHEAD) // MiB} MiB, got {heap_size!r}"
        )
    memory = (heap_size + OVERHEAD + MiB - 1) // MiB * MiB
    settings: dict[str, Any] = {
        "memory_size": memory,
        "stack_size": STACK_SIZE,
        "input_buffer_size": BUFFER_SIZE,
        "output_buffer_size": BUFFER_SIZE,
        "idle_trim": None,
    }
    settings.update(options)
    return SandboxConfig(**settings)


def check_config(config: SandboxConfig, heap_size: int) -> None:
    """ConfigError when ``heap_size`` is out of range, or ``config`` has less
    guest memory than a JS heap of ``heap_size`` needs (a plain
    ``SandboxConfig()`` has 8 MiB: the engine would start and then run out of
    memory in the handlers)."""
    needed = default_config(heap_size).memory_size
    if config.memory_size < needed:
        raise ConfigError(
            f"config.memory_size is {config.memory_size // MiB} MiB, too small for a JS heap "
            f"of {heap_size // MiB} MiB (at least {needed // MiB} MiB): build it with "
            "hlasync.js.default_config(heap_size, **changes) and pass the same heap_size "
            "(default_config(h) goes with heap_size=h)"
        )


def start_engine(sandbox: Sandbox, heap_size: int) -> None:
    """Create the engine (runtime, context, console) in a freshly booted sandbox."""
    stack = sandbox.layout.stack_top - sandbox.layout.stack_base
    status = sandbox._call_with(None, "js_init", heap_size, max(stack - STACK_RESERVE, 64 * 1024))
    if status != 0:
        raise GuestImageError(
            f"the JS runtime could not start (js_init returned {status!r}): is the guest heap "
            "large enough for the engine?",
            path=sandbox.image.path,
        )


def install(
    sandbox: Sandbox,
    *,
    handlers: Mapping[str, str],
    modules: Mapping[str, str],
    host_modules: Mapping[str, list[str]],
) -> None:
    """Define host modules, compile modules, then compile and run the handlers."""
    for module, functions in host_modules.items():
        reply = sandbox._call_with(None, "js_define_host_module", module, json.dumps(functions))
        protocol.decode_reply(reply, sandbox_id=sandbox.id, handler=None)
    for name, source in modules.items():
        reply = sandbox._call_with(None, "js_add_module", name, source)
        protocol.decode_reply(reply, sandbox_id=sandbox.id, handler=name)
    for name, source in handlers.items():
        reply = sandbox._call_with(None, "js_add_handler", name, source)
        protocol.decode_reply(reply, sandbox_id=sandbox.id, handler=name)


def check_handler(sandbox: Sandbox, name: str, source: str) -> None:
    """Compile ``source`` without running it; JSSyntaxError if it does not compile."""
    reply = sandbox._call_with(None, "js_check_handler", name, source)
    protocol.decode_reply(reply, sandbox_id=sandbox.id, handler=name)


def call_arguments(
    sandbox_id: str, name: str, event: object, *, gc: bool = False
) -> tuple[str, bytes, int, int]:
    """Arguments of the guest's ``js_call`` for one handler call (ValueError for
    a name no handler can have, ArgumentError for an event that is not JSON).
    ``gc``: the guest runs the engine's garbage collector after the handler."""
    protocol.check_name("handler", name)
    payload = protocol.encode_event(event, sandbox_id=sandbox_id, handler=name)
    seed = secrets.randbits(63)  # Math.random's seed: fresh for every call
    return name, payload, seed, int(gc)


def call_handler(sandbox: Sandbox, name: str, event: object) -> Any:
    reply = sandbox.call("js_call", *call_arguments(sandbox.id, name, event))
    return protocol.decode_reply(reply, sandbox_id=sandbox.id, handler=name)
