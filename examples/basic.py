"""A tour of the synchronous Sandbox API with the bundled ``simpleguest``.

Run it from a checkout (needs /dev/kvm)::

    python examples/basic.py

It creates one sandbox (one KVM VM with one vCPU), calls guest functions of
every value type, lets the guest call back into Python, survives a guest
fault, stops a runaway call from another thread through its handle, and
shows that ``restore()`` rolls guest state back to a snapshot.
"""

from __future__ import annotations

import threading
import time

from hlasync import (
    CallHandle,
    GuestCancelled,
    GuestCrashed,
    HostFunctionError,
    Sandbox,
    SandboxConfig,
    SandboxPoisoned,
    SandboxState,
    guests,
)
from hlasync.abi import Value


def double(x: int) -> int:
    """A host function: the guest calls it through ``hl_call_host_int``."""
    return 2 * x


def shout(text: str) -> str:
    """A host function taking and returning a str (``call_host_str`` in the guest)."""
    return text.upper() + "!"


def refuse(x: int) -> int:
    """A host function that fails: the guest call fails with HostFunctionError."""
    raise ValueError(f"refusing {x}")


def show(label: str, value: Value) -> None:
    print(f"  {label:<34} -> {value!r}")


def main() -> None:
    tour(SandboxConfig())  # dumps go to $HYPERLIGHT_CORE_DUMP_DIR, else the temp directory


def tour(config: SandboxConfig) -> None:
    printed: list[str] = []  # the guest's hl_print() output lands here
    started = time.perf_counter()
    with Sandbox(guests.path("simpleguest"), config, output=printed.append) as sb:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        print(f"sandbox {sb.id} ready in {elapsed_ms:.1f} ms, {len(sb.functions)} functions")
        print(f"  e.g. {sb.functions['add']}, {sb.functions['echo_bytes']}")

        print("values of every type:")
        show("add(2, 3)", sb.call("add", 2, 3))
        show("add(-7, 2)", sb.call("add", -7, 2))
        show("add_float(1.5, 2.25)", sb.call("add_float", 1.5, 2.25))
        show("negate(True)", sb.call("negate", True))
        show("echo('héllo, vm')", sb.call("echo", "héllo, vm"))
        show("echo_bytes(b'\\x00\\x01\\xff')", sb.call("echo_bytes", b"\x00\x01\xff"))
        show("sum_bytes(bytes(range(10)))", sb.call("sum_bytes", bytes(range(10))))
        show("format_pair('answer', 42)", sb.call("format_pair", "answer", 42))
        show("heap_roundtrip(1000)", sb.call("heap_roundtrip", 1000))
        show("fib(20)", sb.call("fib", 20))
        show("print_message(...)", sb.call("print_message", "hello from the guest\n"))
        print(f"  guest printed: {''.join(printed)!r}")

        print("host functions (the guest calls back into Python):")
        sb.register_host_function("double", double)
        sb.register_host_function("shout", shout)
        show("call_host('double', 21)", sb.call("call_host", "double", 21))
        show("call_host_str('shout', 'hey')", sb.call("call_host_str", "shout", "hey"))
        sb.register_host_function("refuse", refuse)
        try:
            sb.call("call_host", "refuse", 1)
        except HostFunctionError as exc:
            print(f"  HostFunctionError: {exc}")
            print(f"    cause: {exc.__cause__!r}; state stays {sb.state.value}")
        assert sb.state is SandboxState.READY

        print("a guest fault:")
        try:
            sb.call("divide_by_zero")
        except GuestCrashed as exc:
            print(f"  GuestCrashed: {exc}")
            print(f"    vector {exc.vector} ({exc.vector_name}), rip {exc.rip:#x} in {exc.symbol}")
            if exc.core_path is not None:  # see examples/crash_dumps.py and docs/crashdumps.md
                print(f"    core dump written: {exc.core_path}")
        print(f"  state: {sb.state.value}")
        try:
            sb.call("add", 1, 1)
        except SandboxPoisoned as exc:
            print(f"  SandboxPoisoned: {exc}")
        sb.restore()  # back to the state right after initialisation
        print(f"  after restore(): {sb.state.value}, add(1, 1) -> {sb.call('add', 1, 1)!r}")

        print("stopping one call from another thread (a handle stops exactly its call):")
        handles: list[CallHandle] = []

        def stop_the_runaway() -> None:
            while (handle := sb.current_call) is None:  # the call on the main thread
                time.sleep(0.001)
            handles.append(handle)
            time.sleep(0.05)
            handle.interrupt()

        stopper = threading.Thread(target=stop_the_runaway)
        stopper.start()
        try:
            sb.call("spin")  # never returns by itself
        except GuestCancelled as exc:
            print(f"  GuestCancelled: {exc}")
        stopper.join()
        sb.restore()
        print(f"  call {handles[0].id} ({handles[0].function}) running: {handles[0].running}")
        print(f"  its handle again: interrupt() -> {handles[0].interrupt()} (stops no later call)")
        print(f"  next call: add(2, 2) -> {sb.call('add', 2, 2)!r}")

        print("snapshots roll guest memory back:")
        counts = [sb.call("increment") for _ in range(3)]
        print(f"  increment() x3 -> {counts}")
        snap = sb.snapshot()
        after = [sb.call("increment") for _ in range(2)]
        print(f"  snapshot taken; increment() x2 -> {after}")
        sb.restore(snap)
        print(f"  restore(snap); increment() -> {sb.call('increment')!r}  (counter was 3)")
        sb.restore()
        print(f"  restore();     increment() -> {sb.call('increment')!r}  (initial state)")
        assert counts == [1, 2, 3] and after == [4, 5]

    print(f"closed: {sb.state.value}")


if __name__ == "__main__":
    main()
