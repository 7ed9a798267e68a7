"""The ``hlasync`` command line (also ``python -m hlasync``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from . import _build, guests
from .crashdump import DUMP_GLOB, CoreDump, manifest_path, resolve_directory
from .errors import GuestCancelled, GuestError, GuestImageError, HlasyncError, InvalidCoreDump
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
            print(f"  {type(exc).__name__}: {exc.message}")
            if exc.core_path is not None:
                with CoreDump.open(exc.core_path) as dump:
                    frames = " <- ".join(f.symbol or hex(f.pc) for f in dump.backtrace())
                print(f"  core dump: {exc.core_path}\n  backtrace from the dump: {frames}")
                print(f"  open it: gdb {path} {exc.core_path}")
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
    try:
        image = GuestImage.load(output)
    except GuestImageError:
        output.unlink()  # an ELF the host would refuse is not a build result
        raise
    print(f"built {output} ({len(image.functions)} functions)")
    for fn in sorted(image.functions, key=lambda f: f.name):
        print(f"  {fn}")
    return 0


def _guest_functions(args: argparse.Namespace) -> int:
    path = Path(args.guest) if Path(args.guest).exists() else guests.path(args.guest)
    image = GuestImage.load(path)
    for fn in sorted(image.functions, key=lambda f: f.name):
        print(fn)
    return 0


def _guest_list(args: argparse.Namespace) -> int:
    for name in guests.names():
        print(f"{name}\t{guests.path(name)}")
    return 0


def _dump_show(args: argparse.Namespace) -> int:
    with CoreDump.open(args.core) as dump:
        if args.json:
            print(json.dumps(dump.summary(args.guest), indent=2, default=str))
        else:
            print(dump.report(args.guest))
    return 0


def _dump_list(args: argparse.Namespace) -> int:
    directory = Path(args.directory) if args.directory else resolve_directory()
    if not directory.is_dir():
        print(f"hlasync: {directory} is not a directory", file=sys.stderr)
        return 1
    paths = sorted(directory.glob(DUMP_GLOB), key=lambda p: p.stat().st_mtime)
    if not paths:
        print(f"no hlasync core dumps in {directory}")
        return 0
    for path in paths:
        allocated = path.stat().st_blocks * 512
        try:
            with CoreDump.open(path) as dump:
                meta = dump.metadata
                print(
                    f"{path}  {allocated // 1024} KiB  {meta.get('timestamp')}  "
                    f"{meta.get('sandbox_id')}  {meta.get('reason')}  {meta.get('function')}"
                )
        except InvalidCoreDump as exc:
            print(f"{path}  {allocated // 1024} KiB  unreadable: {exc}")
    return 0


def _dump_all(args: argparse.Namespace) -> int:
    signum = _parse_signal(args.signal)
    try:
        target = psutil.Process(args.pid)
        temp_dir = target.environ().get("TMPDIR")
    except psutil.NoSuchProcess:
        print(f"hlasync: no process {args.pid}", file=sys.stderr)
        return 1
    except psutil.AccessDenied:
        temp_dir = None
    manifest = manifest_path(args.pid, temp_dir)
    sent_at = time.time()
    os.kill(args.pid, signum)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            result = json.loads(manifest.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            result = None
        if result is not None and result.get("time", 0) >= sent_at:
            for path in result["paths"]:
                print(path)
            for error in result["errors"]:
                print(f"hlasync: {error}", file=sys.stderr)
            return 0 if not result["errors"] else 1
        time.sleep(0.05)
    print(
        f"hlasync: process {args.pid} wrote no dump list within {args.timeout} s "
        f"(did it call hlasync.install_dump_signal({signum})?)",
        file=sys.stderr,
    )
    return 1


def _parse_signal(name: str) -> int:
    try:
        return int(name)
    except ValueError:
        pass
    try:
        return int(signal.Signals["SIG" + name.upper().removeprefix("SIG")])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {name!r}") from None


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

    dump = commands.add_parser("dump", help="inspect core dumps")
    dump_commands = dump.add_subparsers(dest="dump_command", required=True)
    show = dump_commands.add_parser("show", help="report on one core dump")
    show.add_argument("core", type=Path, help="core dump file")
    show.add_argument("--guest", type=Path, help="guest ELF for symbols (default: as recorded)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(handler=_dump_show)
    dump_list = dump_commands.add_parser("list", help="list the core dumps in a directory")
    dump_list.add_argument(
        "directory", nargs="?", help="default: $HYPERLIGHT_CORE_DUMP_DIR or the temp directory"
    )
    dump_list.set_defaults(handler=_dump_list)

    dump_all = commands.add_parser(
        "dump-all", help="make a process dump all its sandboxes (see install_dump_signal)"
    )
    dump_all.add_argument("pid", type=int, help="process that called install_dump_signal()")
    dump_all.add_argument("--signal", default="USR2", help="signal to send (default: USR2)")
    dump_all.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    dump_all.set_defaults(handler=_dump_all)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except HlasyncError as exc:
        print(f"hlasync: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
