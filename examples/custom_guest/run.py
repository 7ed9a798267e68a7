"""Build the custom guest ``greeter.c`` with the hlasync SDK and call it.

Run it from a checkout (needs /dev/kvm and gcc)::

    python examples/custom_guest/run.py

The same build from the command line is
``hlasync guest build examples/custom_guest/greeter.c -o greeter.elf``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from hlasync import GuestAborted, GuestImage, Sandbox
from hlasync._build import build_guest

HERE = Path(__file__).resolve().parent


def now() -> int:
    """Host function ``now``: seconds since the epoch, as an int."""
    return int(time.time())


def main() -> None:
    log: list[tuple[str, int]] = []

    def log_message(text: str, length: int) -> None:
        """Host function ``log``: receives a str and an int from the guest."""
        log.append((text, length))

    # The guest is built where its dumps go ($HYPERLIGHT_CORE_DUMP_DIR, else the
    # temp directory), so both are still there for gdb when this is done.
    home = Path(os.environ.get("HYPERLIGHT_CORE_DUMP_DIR") or tempfile.gettempdir())
    started = time.perf_counter()
    elf = build_guest([HERE / "greeter.c"], home / "greeter.elf")
    print(f"built {elf} in {(time.perf_counter() - started) * 1e3:.0f} ms; exports:")
    for signature in GuestImage.load(elf).functions:
        print(f"  {signature}")

    with Sandbox(elf) as sb:
        sb.register_host_function("now", now)
        sb.register_host_function("log", log_message)

        print(f"greet('Ada')           -> {sb.call('greet', 'Ada')!r}")
        print(f"repeat('ho', 3)        -> {sb.call('repeat', 'ho', 3)!r}")
        long = sb.call("repeat", "abc", 100)
        assert isinstance(long, str)
        print(f"repeat('abc', 100)     -> {len(long)} chars (realloc'd on the guest heap)")
        print(f"mean(b'\\x00\\x0a\\x14')  -> {sb.call('mean', bytes([0, 10, 20]))!r}")
        sb.call("shout", "hi there")
        print(f"host function 'log' got {log}")

        try:
            sb.call("repeat", "x", -1)
        except GuestAborted as exc:
            print(f"GuestAborted: code {exc.code}, message {exc.guest_message!r}")
            if exc.core_path is not None:
                print(f"  core dump: {exc.core_path} (open it: gdb {elf} {exc.core_path})")
        print(f"state after the abort: {sb.state.value}; restore() fixes it")
        sb.restore()
        print(f"greet('again')         -> {sb.call('greet', 'again')!r}")


if __name__ == "__main__":
    main()
