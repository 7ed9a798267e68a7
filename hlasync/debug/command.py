"""hlasync debug GUEST FUNCTION [ARGS...]: one call, under a debugger.

The sandbox serves the GDB remote protocol on --host:--port; the call
stops at the function's entry until a debugger attaches and resumes it. The
command prints how to attach with gdb and lldb, then the call's result (or
its error) once it ends, and exits 0 (1 when the call failed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..abi import Arg, FunctionSignature, ValueType
from ..config import SandboxConfig
from ..errors import HlasyncError, printable

__all__ = ["add_parser", "attach_commands", "parse_argument"]

#: The port gdb's documentation uses in its examples.
DEFAULT_PORT = 1234


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    debug = commands.add_parser(
        "debug",
        help="call a guest function under gdb or lldb (a GDB remote stub on a local port)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    debug.add_argument("guest", help="guest ELF path or bundled guest name")
    debug.add_argument("function", help="the guest function to call")
    debug.add_argument(
        "args",
        nargs="*",
        help="its arguments: ints (0x.. too), floats, true/false, strings, bytes as hex",
    )
    debug.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port"
    )
    debug.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback only)"
    )
    debug.set_defaults(handler=run)


def parse_argument(kind: ValueType, text: str) -> Arg:
    """A command-line argument as the guest function's parameter ``kind``."""
    if kind is ValueType.INT:
        return int(text, 0)
    if kind is ValueType.FLOAT:
        return float(text)
    if kind is ValueType.BOOL:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    if kind is ValueType.BYTES:
        return bytes.fromhex(text)
    return text


def attach_commands(guest: Path, host: str, port: int) -> tuple[str, str]:
    """The gdb and lldb command lines that attach to a sandbox serving on ``host:port``."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    gdb = f"gdb {guest} -ex 'target remote {address}'"
    lldb = f"lldb {guest} -o 'gdb-remote {address}'"
    return gdb, lldb


def _arguments(signature: FunctionSignature, texts: list[str]) -> tuple[Arg, ...]:
    if len(texts) != len(signature.params):
        raise ValueError(f"{signature} takes {len(signature.params)} argument(s), got {len(texts)}")
    values = []
    for position, (kind, text) in enumerate(zip(signature.params, texts, strict=True)):
        try:
            values.append(parse_argument(kind, text))
        except ValueError as exc:
            raise ValueError(f"{signature}: argument {position + 1}: {exc}") from None
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    from .. import guests
    from ..guest.image import GuestImage
    from ..sandbox import Sandbox

    path = Path(args.guest)
    try:
        if not path.exists():
            path = guests.path(args.guest)
        image = GuestImage.load(path)
    except (HlasyncError, LookupError, OSError) as exc:
        print(f"hlasync: {printable(str(exc))}", file=sys.stderr)
        return 2
    signature = {fn.name: fn for fn in image.functions}.get(args.function)
    if signature is None:
        names = ", ".join(sorted(fn.name for fn in image.functions))
        print(
            f"hlasync: {path.name} has no function {args.function!r} (it has: {names})",
            file=sys.stderr,
        )
        return 2
    try:
        values = _arguments(signature, args.args)
        config = SandboxConfig(debug_port=args.port, debug_host=args.host)
        sandbox = Sandbox(image, config)
    except (HlasyncError, ValueError) as exc:
        print(f"hlasync: {printable(str(exc))}", file=sys.stderr)
        return 2
    with sandbox:
        address = sandbox.debug_address
        assert address is not None
        gdb, lldb = attach_commands(path, *address)
        print(
            f"hlasync: {signature} waits at its entry for a debugger on "
            f"{address[0]}:{address[1]}; attach with\n  {gdb}\n  {lldb}",
            file=sys.stderr,
            flush=True,
        )
        try:
            result = sandbox.call(signature.name, *values)
        except HlasyncError as exc:
            print(f"hlasync: {type(exc).__name__}: {printable(str(exc))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("hlasync: interrupted", file=sys.stderr)
            return 130
    print(printable(repr(result)))
    return 0
