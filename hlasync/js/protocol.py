"""What crosses between the host and the JS runtime guest (``guest/js/jsruntime.c``).

Events and results are JSON (UTF-8, NUL-terminated on the way in). Every
reply of the guest is one status byte and a JSON body; :func:`decode_reply`
turns it into the handler's result or the matching exception. Host
functions, console output and the clock are host calls with fixed names
(:data:`HOST_CALL`, :data:`CONSOLE`, :data:`CLOCK`).
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from ..errors import ArgumentError, FunctionNotFound, JSError, JSResultError, JSSyntaxError

__all__ = [
    "CLOCK",
    "CONSOLE",
    "HOST_CALL",
    "LEVELS",
    "check_name",
    "decode_reply",
    "encode_event",
]

#: Host functions the guest calls (registered on every JS sandbox).
HOST_CALL = "__js_host"  # (module, name, JSON array of arguments) -> JSON envelope
CONSOLE = "__js_console"  # (level, text) -> None
CLOCK = "__hl_clock"  # () -> seconds since the epoch, as a float
LEVELS = ("log", "info", "warn", "error", "debug")

#: Handler and module names: what a file name (``<name>.js`` in stacks) may be.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/@:]{0,99}\Z")
_POSITION = re.compile(r"at (?:[^\n(]*\()?([^\n():]+):(\d+):(\d+)\)?")


def check_name(kind: str, name: object) -> str:
    """``name`` if it can name a handler or module, else ValueError saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty str, got {name!r}")
    if not _NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} must be 1-100 characters: letters, digits and _ . - / @ :"
            " (not starting with a punctuation mark)"
        )
    return name


def encode_event(event: object, *, sandbox_id: str, handler: str) -> bytes:
    """The event as UTF-8 JSON with a terminating NUL (the engine's parser wants it)."""
    try:
        text = json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\0"
    except (TypeError, ValueError, RecursionError) as exc:  # sets, NaN, bytes, surrogates, ...
        detail = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ArgumentError(
            f"the event for handler {handler!r} is not a JSON value: {detail}",
            sandbox_id=sandbox_id,
            function=handler,
        ) from None


def decode_reply(reply: object, *, sandbox_id: str, handler: str | None) -> Any:
    """The result a reply carries, or the exception it describes."""
    if not isinstance(reply, bytes) or not reply:
        raise JSError(
            sandbox_id=sandbox_id,
            function=handler,
            name="InternalError",
            js_message=f"malformed reply from the JS runtime: {reply!r:.80}",
            stack="",
        )
    status, body = chr(reply[0]), reply[1:]
    try:
        value = json.loads(body)
    except RecursionError:
        status, value = "U", {"message": "the result nests too deeply to be read in Python"}
    except ValueError:
        value = {"message": body.decode("utf-8", "replace")}
    if status in ("R", "O"):
        return value
    fields = value if isinstance(value, dict) else {"message": str(value)}
    raise_reply_error(status, fields, sandbox_id=sandbox_id, handler=handler)


def raise_reply_error(
    status: str, fields: dict[str, Any], *, sandbox_id: str, handler: str | None
) -> NoReturn:
    name = str(fields.get("name", ""))
    message = str(fields.get("message", ""))
    stack = str(fields.get("stack", ""))
    if status == "N":
        raise FunctionNotFound(
            f"no handler named {handler!r} is loaded", sandbox_id=sandbox_id, function=str(handler)
        )
    if status == "S":
        file, line, column = syntax_position(stack)
        raise JSSyntaxError(
            sandbox_id=sandbox_id,
            function=handler,
            name=name or "SyntaxError",
            js_message=message,
            stack=stack,
            file=file,
            line=line,
            column=column,
        )
    if status == "U":
        raise JSResultError(
            sandbox_id=sandbox_id, function=handler, name="TypeError", js_message=message, stack=""
        )
    raise JSError(
        sandbox_id=sandbox_id, function=handler, name=name, js_message=message, stack=stack
    )


def syntax_position(stack: str) -> tuple[str | None, int | None, int | None]:
    """File, line and column of the first frame of an engine stack."""
    found = _POSITION.search(stack)
    if found is None:
        return None, None, None
    return found.group(1), int(found.group(2)), int(found.group(3))
