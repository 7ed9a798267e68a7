"""The host side of a JS runtime guest's host calls: host functions JavaScript
imports from modules, console output, and the clock."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import protocol
from .arguments import checked

__all__ = ["HostBridge", "OutputSink", "default_output"]

#: Receives ``(level, text)`` for every console call of a handler (the level is
#: the method's name) and its print() text (level ``"print"``, no newline implied).
OutputSink = Callable[[str, str], None]


def default_output(level: str, text: str) -> None:
    """console.log/info/debug to stdout, warn/error to stderr (like Node), each
    a line; print() text (level ``"print"``) to stdout as it is."""
    stream = sys.stderr if level in ("warn", "error") else sys.stdout
    stream.write(text if level == "print" else text + "\n")
    stream.flush()


def clock() -> float:
    """``Date.now()`` and friends in the guest: the host's wall clock."""
    return time.time()


class HostBridge:
    """Host functions by (module, name), and where console output goes.

    The guest sees module ``module`` exporting the functions registered under
    it; each takes and returns JSON values, its arguments checked against its
    annotations first (:mod:`.arguments`). A Python exception becomes a JS
    exception (same name and message) the handler can catch.
    """

    def __init__(self, output: OutputSink | None = None) -> None:
        self.functions: dict[str, dict[str, Callable[..., Any]]] = {}
        self.output: OutputSink = output or default_output

    def register(self, module: str, name: str, function: Callable[..., Any]) -> None:
        protocol.check_name("module", module)
        protocol.check_function_name(name)
        if not callable(function):
            raise TypeError("host function must be callable")
        self.functions.setdefault(module, {})[name] = checked(module, name, function)

    def modules(self) -> Mapping[str, list[str]]:
        """Module name -> the names of its functions (what the guest defines)."""
        return {module: sorted(functions) for module, functions in self.functions.items()}

    def sandbox_functions(self) -> dict[str, Callable[..., Any]]:
        """The host functions a JS sandbox registers (by their reserved names)."""
        return {
            protocol.HOST_CALL: self.call,
            protocol.CONSOLE: self.console,
            protocol.CLOCK: clock,
        }

    def call(self, module: str, name: str, arguments: str) -> str:
        """One host call from JavaScript; never raises (errors go back as JSON)."""
        function = self.functions.get(module, {}).get(name)
        if function is None:
            return _error("ReferenceError", f"no host function {module}.{name}")
        try:
            args = json.loads(arguments)
            if not isinstance(args, list):
                raise ValueError("arguments must be a JSON array")
            result = function(*args)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JS exception
            return _error(type(exc).__name__, str(exc))
        try:
            return json.dumps({"value": result}, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            message = f"host function {module}.{name} returned a value JSON cannot hold: {exc}"
            return _error("TypeError", message)

    def console(self, level: str, text: str) -> None:
        self.output(level if level in protocol.LEVELS else "log", text)


def _error(name: str, message: str) -> str:
    return json.dumps({"error": {"name": name, "message": message}}, ensure_ascii=False)
