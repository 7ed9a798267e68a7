"""The hlasync command line (also: python -m hlasync).

Run guests in KVM micro-VMs, build guest binaries, and read the core dumps
hlasync writes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from . import _build, guests
from .crashdump import DUMP_GLOB, CoreDump, resolve_directory
from .crashdump._format import signal_name
from .crashdump.signals import read_manifest
from .errors import (
    GuestCancelled,
    GuestError,
    GuestImageError,
    GuestTimeout,
    HlasyncError,
    InvalidCoreDump,
    printable,
)
from .guest.image import GuestImage
from .kvm import KICK_SIGNAL
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
    _demo_javascript()
    return 0


def _demo_javascript() -> None:
    from .js import JSSandbox

    print("a JavaScript handler in its own micro-VM (the bundled QuickJS runtime):")
    started = time.perf_counter()
    with JSSandbox(heap_size=8 << 20) as js:
        js.add_handler("greet", DEMO_HANDLER)
        js.load()
        print(f"  runtime started and handler loaded in {(time.perf_counter() - started):.2f} s")
        result = js.call_handler("greet", {"name": "World"})
        print(f"  call_handler('greet', {{'name': 'World'}}) -> {result!r}")
        js.add_handler("spin", DEMO_SPIN)
        js.load()
        try:
            js.call_handler("spin", {}, timeout=0.2)
        except GuestTimeout as exc:
            print(f"  GuestTimeout after {exc.elapsed:.2f} s; the handler's JavaScript stack:")
            for line in (exc.js_stack or "(unavailable)").splitlines():
                print(f"    {line.strip()}")
            if exc.core_path is not None:
                print(f"  core dump: {exc.core_path} (hlasync dump show prints both stacks)")


DEMO_HANDLER = "function handler(event) { return 'Hello, ' + event.name + '!' }"
DEMO_SPIN = (
    "function spin() {\n  let turns = 0\n  for (;;) { turns++ }\n}\n"
    "function handler(event) { spin() }"
)


def _js_run(args: argparse.Namespace) -> int:
    from .js import JSSandbox, files, protocol
    from .js.host import default_output

    script = Path(args.script)
    try:
        source = files.read_handler(script)
        # The ES modules next to the handler, for its imports ("./math" finds
        # math.js) and require() calls; a handler that has none needs none.
        modules = (
            files.read_modules(script.parent, exclude=script.name)
            if files.imports_modules(source)
            else {}
        )
    except OSError as exc:
        print(
            f"hlasync: cannot read {exc.filename or args.script}: {exc.strerror}", file=sys.stderr
        )
        return 1
    except ValueError as exc:  # not UTF-8, or past a bound of read_modules
        print(f"hlasync: {exc}", file=sys.stderr)
        return 2
    try:
        event = json.loads(args.event)
    except json.JSONDecodeError as exc:
        print(f"hlasync: --event is not JSON: {exc}", file=sys.stderr)
        return 2
    name = args.name or script.stem
    try:
        protocol.check_name("handler", name)
    except ValueError as exc:
        print(f"hlasync: {exc}: choose another with --name", file=sys.stderr)
        return 2
    for option, limit in (("--timeout", args.timeout), ("--cpu-timeout", args.cpu_timeout)):
        if limit is not None and not limit > 0:  # what call_handler() refuses
            print(f"hlasync: {option} must be a positive number of seconds", file=sys.stderr)
            return 2

    def output(level: str, text: str) -> None:  # the handler's console, made printable
        default_output(level, printable(text))

    with JSSandbox(heap_size=args.heap_size << 20, output=output) as js:
        for module, module_source in modules.items():
            js.add_module(module, module_source)
        js.add_handler(name, source)
        js.load()
        try:
            result = js.call_handler(
                name, event, timeout=args.timeout, cpu_timeout=args.cpu_timeout
            )
        except GuestTimeout as exc:
            print(f"hlasync: GuestTimeout: {exc}", file=sys.stderr)
            print("javascript stack:", file=sys.stderr)
            print(printable(exc.js_stack or "    (unavailable)"), file=sys.stderr, end="")
            return 1
    print(_printable_json(result))
    return 0


#: What JSON leaves raw but a terminal would act on or cannot show (C1
#: controls, DEL, bidirectional overrides, line separators, lone surrogates):
#: each becomes its JSON ``\uNNNN`` escape, so the output stays JSON.
_JSON_ESCAPES = {
    c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F))
}
_JSON_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x2066, 0x206A), 0x2028, 0x2029)})
_JSON_ESCAPES.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)})


def _printable_json(value: object) -> str:
    """``value`` as indented JSON that is safe on a terminal (non-ASCII text
    stays readable; JSON escapes the C0 controls itself)."""
    return json.dumps(value, ensure_ascii=False, indent=2).translate(_JSON_ESCAPES)


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
        print(f"  {_one_line(fn)}")
    return 0


def _guest_functions(args: argparse.Namespace) -> int:
    path = Path(args.guest) if Path(args.guest).exists() else guests.path(args.guest)
    image = GuestImage.load(path)
    for fn in sorted(image.functions, key=lambda f: f.name):
        print(_one_line(fn))
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
    try:
        with os.scandir(directory) as entries:
            found = [
                (e.stat(follow_symlinks=False), Path(e.path))
                for e in entries
                if fnmatch.fnmatchcase(e.name, DUMP_GLOB)
            ]
    except OSError as exc:
        return _fail(f"cannot list {directory}: {exc.strerror or exc}")
    if not found:
        print(f"no hlasync core dumps in {_one_line(directory)}")
        return 0
    for st, path in sorted(found, key=lambda item: item[0].st_mtime_ns):
        # Each file costs what CoreDump.open reads within its limits: a few KiB
        # of headers and notes, whatever the file claims.
        shown = _one_line(path)
        if not stat.S_ISREG(st.st_mode):
            print(f"{shown}  skipped: not a regular file")
            continue
        allocated = st.st_blocks * 512
        try:
            with CoreDump.open(path) as dump:
                meta = dump.metadata
                fields = [meta.get(k) for k in ("timestamp", "sandbox_id", "reason", "function")]
                print(f"{shown}  {allocated // 1024} KiB  " + "  ".join(map(_one_line, fields)))
        except InvalidCoreDump as exc:
            print(f"{shown}  {allocated // 1024} KiB  unreadable: {_one_line(exc)}")
    return 0


def _one_line(value: object) -> str:
    """Text a file or a guest chose, fit for one line of a terminal."""
    return printable(str(value), keep_newlines=False)


def _dump_all(args: argparse.Namespace) -> int:
    signum: int = args.signal
    name = signal_name(signum)
    if signum == KICK_SIGNAL:
        return _fail(f"{name} is hlasync's vCPU kick signal; it never dumps (pick another)")
    try:
        status = _proc_status(args.pid)
    except FileNotFoundError:
        return _fail(f"no process {args.pid}")
    except (OSError, KeyError, ValueError) as exc:
        return _fail(f"cannot read /proc/{args.pid}/status: {exc}")
    if not status.caught >> (signum - 1) & 1:
        return _fail(
            f"process {args.pid} does not catch {name}: it never called "
            f"hlasync.install_dump_signal(signal.{name}), and {name} could kill it. Nothing sent"
        )
    temp_dir = _temp_dir_of(args.pid)
    sent_at = time.time()
    try:
        os.kill(args.pid, signum)
    except ProcessLookupError:
        return _fail(f"no process {args.pid}")
    except PermissionError:
        return _fail(f"not permitted to send {name} to process {args.pid}: run as its user")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        result = read_manifest(args.pid, temp_dir, status.uid)
        if result is not None and result.get("time", 0) >= sent_at:
            for path in result["paths"]:
                print(_one_line(path))
            for error in result["errors"]:
                print(f"hlasync: {_one_line(error)}", file=sys.stderr)
            return 0 if not result["errors"] else 1
        time.sleep(0.05)
    return _fail(
        f"process {args.pid} catches {name} but wrote no dump list within {args.timeout} s: did "
        f"it call hlasync.install_dump_signal(signal.{name})? Its log may say more"
    )


class _ProcStatus(NamedTuple):
    caught: int  # the signals it has a handler for: bit n-1 for signal n
    uid: int  # its effective uid: who owns the files it writes


def _proc_status(pid: int) -> _ProcStatus:
    text = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return _ProcStatus(int(fields["SigCgt"], 16), int(fields["Uid"].split()[1]))


def _temp_dir_of(pid: int) -> str | None:
    """The temp directory process ``pid`` names in its environment, if we may read it."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None  # not ours to read: assume it uses the same temp directory as we do
    environ = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    for key in (b"TMPDIR", b"TEMP", b"TMP"):
        if environ.get(key):
            return os.fsdecode(environ[key])
    return None


def _fail(message: str) -> int:
    print(f"hlasync: {printable(message)}", file=sys.stderr)
    return 1


def _parse_signal(name: str) -> int:
    try:
        number = int(name)
    except ValueError:
        try:
            return int(signal.Signals["SIG" + name.upper().removeprefix("SIG")])
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown signal {name!r}") from None
    if not 0 < number < signal.NSIG:
        raise argparse.ArgumentTypeError(f"no signal number {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from .debug import command as debug_command

    parser = argparse.ArgumentParser(prog="hlasync", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the bundled guest: calls, a host call, a fault")
    demo.set_defaults(handler=_demo)

    guest = commands.add_parser("guest", help="build and inspect guest binaries")
    guest_commands = guest.add_subparsers(dest="guest_command", required=True)
    build = guest_commands.add_parser("build", help="compile C sources into a guest ELF")
    build.add_argument("sources", nargs="+", type=Path, help="C source files")
    build.add_argument("-o", "--output", type=Path, required=True, help="guest ELF to write")
    build.add_argument(
        "--cc",
        help="C compiler: a command, or zig for the pinned zig cc "
        "(default: $HLASYNC_CC, $CC, gcc if installed, else zig)",
    )
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

    js = commands.add_parser("js", help="run JavaScript handlers in the bundled JS runtime")
    js_commands = js.add_subparsers(dest="js_command", required=True)
    run = js_commands.add_parser("run", help="run one handler with one event and print its result")
    run.add_argument(
        "script",
        help="a script defining function handler(event), or an ES module (which may import "
        "the .js/.mjs files under its directory)",
    )
    run.add_argument("--event", default="null", help="the event, as JSON (default: null)")
    run.add_argument("--name", help="the handler's name in stacks (default: the file's stem)")
    run.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    run.add_argument("--cpu-timeout", type=float, help="guest CPU-time limit in seconds")
    run.add_argument("--heap-size", type=int, default=32, help="JS heap limit in MiB (default 32)")
    run.set_defaults(handler=_js_run)

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

    debug_command.add_parser(commands)

    dump_all = commands.add_parser(
        "dump-all", help="make a process dump all its sandboxes (see install_dump_signal)"
    )
    dump_all.add_argument("pid", type=int, help="process that called install_dump_signal()")
    dump_all.add_argument(
        "--signal",
        type=_parse_signal,
        default="SIGUSR2",
        help="signal to send, by name or number (default: SIGUSR2)",
    )
    dump_all.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    dump_all.set_defaults(handler=_dump_all)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`hlasync dump show CORE | head`): stop quietly, as
        # Unix tools do, and keep the interpreter's final flush from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except HlasyncError as exc:
        print(f"hlasync: {type(exc).__name__}: {printable(str(exc))}", file=sys.stderr)
        return 1
