"""The JavaScript stack of a running handler, asked for from outside.

The runtime guest keeps a control block ``hl_js_control`` in its data (found
by symbol): the host bumps ``request`` and waits, while the guest keeps
running, until ``answered`` equals it; the engine's interrupt handler,
polled by the interpreter every few thousand operations, writes the stack
of the frames running at that moment. An engine busy inside a native
builtin (a pathological regex, a huge sort) cannot answer: after a short
bound the caller goes on without the stack and says why.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from ..sandbox import Sandbox

__all__ = ["STACK_WAIT", "JSStack", "capture_stack"]

#: How long to wait for the engine to report its stack.
STACK_WAIT = 0.05
_HEADER = struct.Struct("<IIII")  # request, answered, length, running
_MAX = 8192
SYMBOL = "hl_js_control"


@dataclass(frozen=True, slots=True)
class JSStack:
    """The outcome of one request: the stack, or why there is none."""

    stack: str | None
    unavailable: str | None = None

    def annotations(self) -> dict[str, object]:
        """Fields for a core dump's hlasync note."""
        if self.stack is not None:
            return {"js_stack": self.stack}
        return {"js_stack": None, "js_stack_unavailable": self.unavailable}


def capture_stack(sandbox: Sandbox, wait: float = STACK_WAIT) -> JSStack:
    """Ask the engine in ``sandbox`` for the JS stack of the running handler."""
    symbol = sandbox.image.symbol(SYMBOL)
    if symbol is None:
        return JSStack(None, "the guest is not a JS runtime")
    if sandbox.current_call is None:
        return JSStack(None, "no handler was running")
    request, answered, _, _ = _HEADER.unpack(sandbox.read_memory(symbol.address, 16))
    wanted = (request + 1) & 0xFFFF_FFFF
    sandbox._write_memory(symbol.address, struct.pack("<I", wanted))
    deadline = time.monotonic() + wait
    while True:
        _, answered, length, running = _HEADER.unpack(sandbox.read_memory(symbol.address, 16))
        if answered == wanted:
            text = sandbox.read_memory(symbol.address + _HEADER.size, min(length, _MAX))
            return JSStack(text.decode("utf-8", "replace"))
        if time.monotonic() >= deadline:
            why = (
                "busy in native code, such as a regular expression or a builtin"
                if running
                else "no JavaScript was running: the call was in the runtime's own code"
            )
            return JSStack(None, f"the engine did not answer within {wait * 1e3:g} ms ({why})")
        time.sleep(0.0005)
