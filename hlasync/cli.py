"""The ``hlasync`` command line (also ``python -m hlasync``)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import _build, guests
from .errors import GuestCancelled, GuestError, HlasyncError
from .guest.image import GuestImage
from .sandbox import Sandbox

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    path = guests.path("simpleguest")
    print(f"guest: {path}")
    started = time.perf_counter()
    with Sandbox(path) as sb:
        print(
            f"created sandbox {sb.id} (one KVM VM, one vCPU) in "
            f"{(time.perf_counter() - started) * 1e3:.1f} ms; "
            f"{len(sb.functions)} guest functions, e.g. {sb.functions['add']}"
        )
        print(f"  add(2, 3)            -> {sb.call('add', 2, 3)!r}")
        print(f"  echo('hello, vm')    -> {sb.call('echo', 'hello, vm')!r}")
        print(f"  fib(25)              -> {sb.call('fib', 25)!r}")
        sb.register_host_function("double", lambda x: 2 * x)
        print(
            f"  call_host('double', 21) -> {sb.call('call_host', 'double', 21)!r}"
            "   (guest called back into Python)"
        )
        sb.call("print_message", "  (this line was printed by the guest)\n")
        print("now a guest fault:")
        try:
            sb.call("divide_by_zero")
        except GuestError as exc:
            print(f"  {type(exc).__name__}: {exc}")
        print(f"  sandbox state: {sb.state.value}; restore() brings it back")
        sb.restore()
        print(f"  add(40, 2)           -> {sb.call('add', 40, 2)!r}")
        print("and a guest that never returns, stopped by interrupt() from another thread:")
        timer = threading.Timer(0.2, sb.interrupt)
        timer.start()
        begun = time.perf_counter()
        try:
            sb.call("spin")
        except GuestCancelled as exc:
            print(f"  GuestCancelled after {time.perf_counter() - begun:.2f} s: {exc}")
        finally:
            timer.cancel()
        sb.restore()
        print(f"  add(1, 1)            -> {sb.call('add', 1, 1)!r}")
    return 0


def _guest_build(args: argparse.Namespace) -> int:
    try:
        output = _build.build_guest(
            args.sources, args.output, cc=args.cc, extra_flags=args.cflag or ()
        )
    except _build.GuestBuildError as exc:
        print(f"hlasync: {exc}", file=sys.stderr)
        return 1
    image = GuestImage.load(output)
    print(f"built {output} ({len(image.functions)} functions)")
    for fn in image.functions:
        print(f"  {fn}")
    return 0


def _guest_functions(args: argparse.Namespace) -> int:
    path = Path(args.guest) if Path(args.guest).exists() else guests.path(args.guest)
    image = GuestImage.load(path)
    for fn in image.functions:
        print(fn)
    return 0


def _guest_list(args: argparse.Namespace) -> int:
    for name in guests.names():
        print(f"{name}\t{guests.path(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlasync", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the bundled guest: calls, a host call, a fault")
    demo.set_defaults(handler=_demo)

    guest = commands.add_parser("guest", help="build and inspect guest binaries")
    guest_commands = guest.add_subparsers(dest="guest_command", required=True)
    build = guest_commands.add_parser("build", help="compile C sources into a guest ELF")
    build.add_argument("sources", nargs="+", type=Path, help="C source files")
    build.add_argument("-o", "--output", type=Path, required=True, help="guest ELF to write")
    build.add_argument("--cc", help="C compiler (default: $HLASYNC_CC, $CC or gcc)")
    build.add_argument(
        "--cflag",
        action="append",
        metavar="FLAG",
        help="extra compiler flag (repeatable), e.g. --cflag=-DDEBUG",
    )
    build.set_defaults(handler=_guest_build)
    functions = guest_commands.add_parser("functions", help="list a guest's exported functions")
    functions.add_argument("guest", help="guest ELF path or bundled guest name")
    functions.set_defaults(handler=_guest_functions)
    listing = guest_commands.add_parser("list", help="list the bundled guests")
    listing.set_defaults(handler=_guest_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except HlasyncError as exc:
        print(f"hlasync: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
