"""Live debugging: a sandbox that serves gdb and lldb (docs/debugging.md).

    python examples/live_debugging.py            # attach yourself: it prints how
    python examples/live_debugging.py --script   # gdb attaches by itself, in batch mode

The sandbox is made with ``SandboxConfig(debug_port=...)``; its first call,
``fib(6)``, waits at fib's entry until a debugger attaches and resumes it.
With ``--script`` the program drives gdb itself: a breakpoint in the
recursion, a backtrace, ``finish``, changing an argument, and a fault that
stops in the debugger before it becomes a ``GuestCrashed`` with its dump.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time

from hlasync import GuestCrashed, Sandbox, SandboxConfig, guests


def gdb(address: tuple[str, int], *commands: str) -> subprocess.Popen[str]:
    """gdb in batch mode, attached to ``address``, running ``commands``."""
    args = ["gdb", "-nx", "-batch", "-ex", f"target remote {address[0]}:{address[1]}"]
    for command in commands:
        args += ["-ex", command]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def call_in_thread(
    sandbox: Sandbox, function: str, *args: int
) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(sandbox.call(function, *args))
        except GuestCrashed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_debugger(sandbox: Sandbox, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not sandbox.debugger_attached:
        if time.monotonic() > deadline:
            raise SystemExit("gdb did not attach")
        time.sleep(0.01)


def scripted(sandbox: Sandbox) -> None:
    address = sandbox.debug_address
    assert address is not None
    thread, outcome = call_in_thread(sandbox, "fib", 6)
    session = gdb(address, "break fib if n == 5", "continue", "bt 3", "delete", "finish", "detach")
    out, _ = session.communicate(timeout=60)
    thread.join(60)
    print("gdb, at a breakpoint in the recursion:")
    for line in out.splitlines():
        if line.startswith(("#", "Breakpoint 1,", "Value returned")):
            print("   ", line)
    print(f"fib(6) -> {outcome[0]}")

    # A debugger that attaches between calls stops the next one at its entry.
    session = gdb(address, "set var b = 41", "detach")
    wait_for_debugger(sandbox)
    thread, outcome = call_in_thread(sandbox, "add", 1, 2)
    session.communicate(timeout=60)
    thread.join(60)
    print(f"add(1, 2) with b set to 41 in gdb -> {outcome[0]}")

    # A fault stops in the debugger first; continuing passes it on.
    session = gdb(address, "continue", "bt 1", "continue")
    wait_for_debugger(sandbox)
    thread, outcome = call_in_thread(sandbox, "divide_by_zero")
    out, _ = session.communicate(timeout=60)
    thread.join(60)
    for line in out.splitlines():
        if line.startswith(("Program received", "#0", "Program terminated")):
            print("   ", line)
    crash = outcome[0]
    assert isinstance(crash, GuestCrashed)
    print(f"divide_by_zero -> {type(crash).__name__}, dump at {crash.core_path}")


def interactive(sandbox: Sandbox) -> None:
    host, port = sandbox.debug_address or ("", 0)
    guest = sandbox.image.path
    print(f"fib(6) waits at its entry for a debugger on {host}:{port}. Attach with")
    print(f"  gdb {guest} -ex 'target remote {host}:{port}'")
    print(f"  lldb {guest} -o 'gdb-remote {host}:{port}'")
    print("and try: break fib / continue / bt / finish / continue")
    print(f"fib(6) -> {sandbox.call('fib', 6)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", action="store_true", help="drive gdb from here")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    options = parser.parse_args()
    config = SandboxConfig(debug_port=options.port)
    with Sandbox(guests.path("simpleguest"), config) as sandbox:
        if options.script:
            if shutil.which("gdb") is None:
                raise SystemExit("--script needs gdb (apt install gdb)")
            scripted(sandbox)
        else:
            interactive(sandbox)


if __name__ == "__main__":
    main()
