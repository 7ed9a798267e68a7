"""What crosses between the host and the JS runtime guest (``guest/js/jsruntime.c``).

Events and results are JSON (UTF-8, NUL-terminated on the way in). Every
reply of the guest is one status byte and a JSON body; :func:`decode_reply`
turns it into the handler's result or the matching exception. Host
functions, console output and the clock are host calls with fixed names
(:data:`HOST_CALL`, :data:`CONSOLE`, :data:`CLOCK`).

A reply is untrusted bytes (up to the output buffer, 2 MiB by default):
reading one takes time and memory linear in its size, no regular expression
runs over it, and whatever it holds gives a value or an hlasync error.
"""

from __future__ import annotations

import json
import json.scanner
import re
from typing import Any, NoReturn

from ..errors import ArgumentError, FunctionNotFound, JSError, JSResultError, JSSyntaxError

__all__ = [
    "CLOCK",
    "CONSOLE",
    "HOST_CALL",
    "INLINE_REPLY",
    "LEVELS",
    "check_function_name",
    "check_name",
    "decode_reply",
    "encode_event",
]

#: Host functions the guest calls (registered on every JS sandbox).
HOST_CALL = "__js_host"  # (module, name, JSON array of arguments) -> JSON envelope
CONSOLE = "__js_console"  # (level, text) -> None; level "print" is print(): no newline
CLOCK = "__hl_clock"  # () -> seconds since the epoch, as a float
LEVELS = ("log", "info", "warn", "error", "debug", "print")

#: Replies up to this size decode at once, wherever they arrive (at most a
#: few milliseconds); a supervisor decodes larger ones on a thread of their own,
#: with ``share_gil`` (:func:`hlasync.supervisor.targets.decode_js_reply`).
INLINE_REPLY = 64 * 1024

#: Handler and module names (checked on host-given names only, never on guest
#: text): what a file name (``<name>.js`` in stacks) may be.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/@:]{0,99}\Z")
#: The longest host function name (any characters but NUL and lone surrogates).
_MAX_FUNCTION_NAME = 100
#: How many lines of a stack :func:`syntax_position` reads: an engine puts the
#: frame it means on the first one.
_POSITION_LINES = 16
#: Line and column numbers longer than this are not positions (and ``int()``
#: refuses more than 4,300 digits).
_POSITION_DIGITS = 9
#: Values the C decoder may read in one go while another thread waits for the
#: GIL: about a millisecond of work (values = at most twice the commas and
#: opening brackets, plus one).
_C_DECODER_VALUES = 8192
_NOT_JSON_PREVIEW = 80
#: The status bytes of ``guest/js/jsruntime.c``.
_STATUSES = frozenset("REOSUN")


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


def check_function_name(name: object) -> str:
    """``name`` if it can name a host function, else ValueError saying why.

    Any text of 1-100 characters but NUL or a lone surrogate (it crosses to the
    guest as UTF-8, as a C string): hyperlight-js takes any non-empty name,
    ``"no-op"`` or ``"scoped/add/😊"``, and JavaScript reaches one that is no
    identifier as a property of the module: ``import * as m from "host";
    m["no-op"]()`` (or ``import { "no-op" as noop } from "host"``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"host function name must be a non-empty str, got {name!r}")
    if len(name) > _MAX_FUNCTION_NAME or "\0" in name or not _is_utf8(name):
        raise ValueError(
            f"host function name {name!r} must be 1-{_MAX_FUNCTION_NAME} characters, "
            "without NUL or lone surrogates"
        )
    return name


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def decode_reply(
    reply: object, *, sandbox_id: str, handler: str | None, share_gil: bool = False
) -> Any:
    """The result a reply carries, or the exception it describes.

    ``share_gil``: this runs on a thread of its own while other threads (an
    event loop) should keep running. The C JSON decoder holds the GIL until it
    is done: 40-100 ms for 2 MiB of small values, during which no other thread
    of the process runs. A body over :data:`INLINE_REPLY` with more values than
    :data:`_C_DECODER_VALUES` is then read by the standard library's
    pure-Python scanner instead (same result; its patterns for numbers and
    whitespace are linear), which lets other threads run every switch
    interval but is ten to twenty times slower.
    """
    if not isinstance(reply, bytes) or not reply:
        _raise_internal(f"malformed reply from the JS runtime: {reply!r:.80}", sandbox_id, handler)
    status, body = chr(reply[0]), reply[1:]
    if status not in _STATUSES:
        _raise_internal(
            f"the JS runtime's reply has an unknown status byte {reply[:1]!r}", sandbox_id, handler
        )
    try:
        value = _read_json(body, share_gil=share_gil)
    except RecursionError:
        status, value = "U", {"message": "the result nests too deeply to be read in Python"}
    except ValueError as exc:  # also UnicodeDecodeError, and ints of more than 4,300 digits
        preview = repr(body[:_NOT_JSON_PREVIEW]) + ("..." if len(body) > _NOT_JSON_PREVIEW else "")
        detail = str(exc)[:_NOT_JSON_PREVIEW]
        _raise_internal(
            f"the JS runtime's reply is not JSON ({detail}): {len(body)} bytes, {preview}",
            sandbox_id,
            handler,
        )
    if status in ("R", "O"):
        return value
    fields = value if isinstance(value, dict) else {"message": str(value)}
    raise_reply_error(status, fields, sandbox_id=sandbox_id, handler=handler)


def _read_json(body: bytes, *, share_gil: bool) -> Any:
    if not share_gil or len(body) <= INLINE_REPLY:
        return json.loads(body)
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values <= _C_DECODER_VALUES:
        return json.loads(body)
    text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads does
    decoder = json.JSONDecoder()
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder.decode(text)


def _raise_internal(message: str, sandbox_id: str, handler: str | None) -> NoReturn:
    raise JSError(
        sandbox_id=sandbox_id, function=handler, name="InternalError", js_message=message, stack=""
    )


def raise_reply_error(
    status: str, fields: dict[str, Any], *, sandbox_id: str, handler: str | None
) -> NoReturn:
    """The exception of an error reply (``status`` E, S, U or N) with its JSON ``fields``."""
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
    """File, line and column of the first frame of an engine stack that names
    one: ``"    at <eval> (handler.js:3:7)"`` or ``"    at handler.js:3:7"``.

    Reads the first :data:`_POSITION_LINES` lines with string methods, in time
    linear in their length whatever the guest wrote there (a regular expression
    searching for frames took hours over 2 MiB of ``"at "``).
    """
    start = 0
    for _ in range(_POSITION_LINES):
        end = stack.find("\n", start)
        found = _frame_position(stack[start:] if end < 0 else stack[start:end])
        if found is not None:
            return found
        if end < 0:
            break
        start = end + 1
    return None, None, None


def _frame_position(line: str) -> tuple[str, int, int] | None:
    """``(file, line, column)`` of one stack line ``at [function (]file:line:column[)]``."""
    text = line.strip()
    if not text.startswith("at "):
        return None
    where = text[3:]
    if "(" in where:  # "at function (file:line:column)"
        where = where[where.index("(") + 1 :].removesuffix(")")
    file, _, numbers = where.rpartition(":")
    file, _, row = file.rpartition(":")
    if not file or "(" in file or ")" in file or not (_number(row) and _number(numbers)):
        return None
    return file, int(row), int(numbers)


def _number(text: str) -> bool:
    return 0 < len(text) <= _POSITION_DIGITS and text.isascii() and text.isdigit()
