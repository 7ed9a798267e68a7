"""Sandbox behaviour on real /dev/kvm with the bundled simpleguest."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from hlasync import (
    ArgumentError,
    FunctionNotFound,
    GuestAborted,
    GuestCancelled,
    GuestCrashed,
    GuestResultError,
    HlasyncError,
    HostFunctionError,
    Sandbox,
    SandboxBusy,
    SandboxClosed,
    SandboxConfig,
    SandboxPoisoned,
    SandboxState,
    ValueType,
    abi,
)
from hlasync.kvm import Kvm


def test_typed_calls_round_trip(sandbox: Sandbox) -> None:
    assert sandbox.call("add", 2, 3) == 5
    assert sandbox.call("add", -(2**63), -1) == 2**63 - 1  # wraps like int64_t in C
    assert sandbox.call("echo", "héllo, wörld ✓") == "héllo, wörld ✓"
    assert sandbox.call("echo", "") == ""
    assert sandbox.call("echo_bytes", b"\x00\xffabc\x00") == b"\x00\xffabc\x00"
    assert sandbox.call("echo_bytes", bytearray(b"xy")) == b"xy"
    assert sandbox.call("sum_bytes", bytes(range(256))) == sum(range(256))
    assert sandbox.call("fib", 20) == 6765
    assert sandbox.call("add_float", 1.5, 2.25) == 3.75
    assert sandbox.call("add_float", 1, 2) == 3.0
    assert sandbox.call("negate", True) is False
    assert sandbox.call("spin_for", 1000) == 1000
    assert sandbox.call("format_pair", "answer", 42) == "answer=42"
    assert sandbox.call("heap_roundtrip", 1000) == sum(i % 256 for i in range(1000))
    assert sandbox.call("write_sentinel", "x") is None


def test_functions_are_read_from_the_elf(sandbox: Sandbox) -> None:
    add = sandbox.functions["add"]
    assert add.params == (ValueType.INT, ValueType.INT)
    assert add.returns is ValueType.INT
    assert str(sandbox.functions["echo_bytes"]) == "echo_bytes(bytes) -> bytes"
    assert sandbox.functions["spin"].params == ()
    assert sandbox.functions["abort_guest"].returns is ValueType.VOID
    required = {
        "add",
        "echo",
        "echo_bytes",
        "sum_bytes",
        "fib",
        "spin",
        "spin_for",
        "divide_by_zero",
        "undefined_instruction",
        "null_pointer_write",
        "stack_overflow",
        "privileged_instruction",
        "abort_guest",
        "call_host",
        "print_message",
        "write_sentinel",
    }
    assert required <= set(sandbox.functions)


def test_ten_thousand_calls_on_one_sandbox(sandbox: Sandbox) -> None:
    rng = random.Random(7)
    for _ in range(10_000):
        a, b = rng.randrange(-(10**12), 10**12), rng.randrange(-(10**12), 10**12)
        assert sandbox.call("add", a, b) == a + b


def test_large_payloads_use_the_whole_buffer(sandbox: Sandbox) -> None:
    blob = random.Random(1).randbytes(64 * 1024)
    assert sandbox.call("echo_bytes", blob) == blob
    with pytest.raises(ArgumentError, match="input_buffer_size") as info:
        sandbox.call("echo_bytes", bytes(300 * 1024))
    assert info.value.sandbox_id == sandbox.id
    assert sandbox.state is SandboxState.READY
    assert sandbox.call("add", 1, 1) == 2


@pytest.mark.parametrize(
    ("function", "vector", "name", "symbol"),
    [
        ("divide_by_zero", 0, "#DE", "divide_by_zero"),
        ("undefined_instruction", 6, "#UD", "undefined_instruction"),
        ("null_pointer_write", 14, "#PF", "null_pointer_write"),
        ("stack_overflow", 14, "#PF", "recurse"),
        ("privileged_instruction", 13, "#GP", "privileged_instruction"),
    ],
)
def test_faults_report_vector_and_guest_function(
    sandbox: Sandbox, function: str, vector: int, name: str, symbol: str
) -> None:
    with pytest.raises(GuestCrashed) as info:
        sandbox.call(function)
    crash = info.value
    assert crash.vector == vector
    assert crash.vector_name == name
    assert crash.function == function
    assert crash.sandbox_id == sandbox.id
    assert crash.symbol is not None and crash.symbol.split("+")[0] == symbol
    fn = sandbox.image.symbol_at(crash.rip)
    assert fn is not None and fn.name == symbol
    if vector == 14:
        assert crash.cr2 is not None and crash.error_code is not None
        assert crash.error_code & 0x4  # fault taken in user mode
    else:
        assert crash.cr2 is None
    assert sandbox.state is SandboxState.POISONED
    with pytest.raises(SandboxPoisoned):
        sandbox.call("add", 1, 2)
    sandbox.restore()
    assert sandbox.call("add", 1, 2) == 3


def test_page_fault_addresses(sandbox: Sandbox) -> None:
    with pytest.raises(GuestCrashed) as info:
        sandbox.call("null_pointer_write")
    assert info.value.cr2 == 0
    assert info.value.error_code == 0x6  # write, user mode, page not present
    sandbox.restore()
    with pytest.raises(GuestCrashed) as info:
        sandbox.call("stack_overflow")
    guard = sandbox.layout.stack_base - 0x1000
    assert info.value.cr2 is not None and guard <= info.value.cr2 < sandbox.layout.stack_base


def test_abort_carries_code_and_message(sandbox: Sandbox) -> None:
    with pytest.raises(GuestAborted) as info:
        sandbox.call("abort_guest", 17, "bad state")
    assert info.value.code == 17
    assert info.value.guest_message == "bad state"
    assert info.value.function == "abort_guest"
    assert sandbox.state is SandboxState.POISONED
    sandbox.restore()
    assert sandbox.call("echo", "ok") == "ok"


def test_interrupt_from_another_thread_stops_spin(sandbox: Sandbox) -> None:
    results: list[bool] = []
    timer = threading.Timer(0.1, lambda: results.append(sandbox.interrupt()))
    timer.start()
    with pytest.raises(GuestCancelled) as info:
        sandbox.call("spin")
    timer.join()
    assert results == [True]
    assert info.value.function == "spin" and info.value.sandbox_id == sandbox.id
    assert sandbox.state is SandboxState.POISONED
    sandbox.restore()
    assert sandbox.call("add", 20, 22) == 42


def test_interrupt_while_idle_returns_false_and_spares_next_call(sandbox: Sandbox) -> None:
    assert sandbox.interrupt() is False
    assert sandbox.call("spin_for", 2_000_000) == 2_000_000
    assert sandbox.state is SandboxState.READY


def test_interrupt_storm_only_cancels_targeted_calls(sandbox: Sandbox) -> None:
    for _ in range(20):
        stopper = threading.Timer(0.005, sandbox.interrupt)
        stopper.start()
        with pytest.raises(GuestCancelled):
            sandbox.call("spin")
        stopper.join()
        sandbox.restore()
        # No kick may leak into the next call.
        for _ in range(20):
            assert sandbox.call("add", 1, 2) == 3


def test_concurrent_call_is_refused(sandbox: Sandbox) -> None:
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        started.set()
        try:
            sandbox.call("spin")
        except GuestCancelled as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    started.wait()
    deadline = time.monotonic() + 5
    while sandbox.state is not SandboxState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(SandboxBusy):
        sandbox.call("add", 1, 2)
    with pytest.raises(SandboxBusy):
        sandbox.restore()
    assert sandbox.interrupt()
    worker.join()
    assert len(errors) == 1


def test_host_functions(sandbox: Sandbox) -> None:
    seen: list[object] = []

    def triple(x: int) -> int:
        seen.append(x)
        return 3 * x

    sandbox.register_host_function("triple", triple)
    sandbox.register_host_function("shout", lambda s: s.upper() + "!")
    assert sandbox.call("call_host", "triple", 14) == 42
    assert seen == [14]
    assert sandbox.call("call_host_str", "shout", "hey") == "HEY!"
    assert set(sandbox.host_functions) == {"triple", "shout"}


def test_host_function_that_raises_surfaces_in_the_caller(sandbox: Sandbox) -> None:
    def broken(x: int) -> int:
        raise RuntimeError(f"cannot handle {x}")

    sandbox.register_host_function("broken", broken)
    with pytest.raises(HostFunctionError) as info:
        sandbox.call("call_host", "broken", 5)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "cannot handle 5" in str(info.value)
    assert info.value.host_function == "broken"
    assert info.value.function == "call_host"
    assert info.value.sandbox_id == sandbox.id
    # The guest was unwound to its dispatcher: the sandbox keeps working.
    assert sandbox.state is SandboxState.READY
    assert sandbox.call("add", 1, 2) == 3


def test_host_function_errors_unknown_and_wrong_type(sandbox: Sandbox) -> None:
    with pytest.raises(HostFunctionError, match="unregistered host function 'missing'"):
        sandbox.call("call_host", "missing", 1)
    sandbox.register_host_function("wrong", lambda x: object())
    with pytest.raises(HostFunctionError, match="returned an object; host functions may"):
        sandbox.call("call_host", "wrong", 1)
    sandbox.register_host_function("text", lambda x: "not an int")
    with pytest.raises(GuestAborted, match="did not return an int"):
        sandbox.call("call_host", "text", 1)
    sandbox.restore()
    assert sandbox.call("add", 2, 2) == 4


def test_register_host_function_validates(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError):
        sandbox.register_host_function("", lambda: None)
    with pytest.raises(TypeError):
        sandbox.register_host_function("x", 42)  # type: ignore[arg-type]


def test_guest_output_goes_to_the_callback(kvm: Kvm, simpleguest: Path) -> None:
    lines: list[str] = []
    with Sandbox(simpleguest, output=lines.append) as sb:
        sb.call("print_message", "hello from the guest\n")
        long = "x" * (300 * 1024 - 100)
        with pytest.raises(ArgumentError):
            sb.call("print_message", long)
        sb.call("print_message", "y" * 100_000)
    assert lines[0] == "hello from the guest\n"
    assert "".join(lines[1:]) == "y" * 100_000


def test_argument_checking(sandbox: Sandbox) -> None:
    with pytest.raises(FunctionNotFound, match="no function 'nope'") as missing:
        sandbox.call("nope")
    assert missing.value.sandbox_id == sandbox.id and missing.value.function == "nope"
    bad_calls: list[tuple[str, tuple[object, ...]]] = [
        ("add", (1,)),
        ("add", (1, 2, 3)),
        ("add", ("1", 2)),
        ("add", (1.0, 2)),
        ("add", (True, 2)),
        ("add", (2**63, 0)),
        ("echo", (b"bytes",)),
        ("echo", ("nul\0inside",)),
        ("echo_bytes", ("str",)),
        ("negate", (1,)),
        ("add_float", ("x", 1.0)),
        ("spin", (None,)),
    ]
    for name, args in bad_calls:
        with pytest.raises(ArgumentError) as info:
            sandbox.call(name, *args)  # type: ignore[arg-type]
        assert info.value.function == name
        assert info.value.sandbox_id == sandbox.id
        assert isinstance(info.value, HlasyncError) and isinstance(info.value, TypeError)
    assert sandbox.state is SandboxState.READY
    assert sandbox.call("add", 1, 2) == 3


def test_snapshot_and_restore_roll_back_state(sandbox: Sandbox) -> None:
    assert sandbox.call("increment") == 1
    snap = sandbox.snapshot()
    assert sandbox.call("increment") == 2
    assert sandbox.call("increment") == 3
    sandbox.restore(snap)
    assert sandbox.call("increment") == 2
    sandbox.restore(snap)
    sandbox.restore()  # the initial state
    assert sandbox.call("increment") == 1
    sandbox.restore(snap)  # another snapshot than the one mapped now
    assert sandbox.call("increment") == 2


def test_snapshot_restores_memory_contents(sandbox: Sandbox) -> None:
    sandbox.call("write_sentinel", "before")
    snap = sandbox.snapshot()
    sandbox.call("write_sentinel", "after!")
    assert sandbox.read_memory(abi.SCRATCH_ADDR, 7) == b"after!\0"
    sandbox.restore(snap)
    assert sandbox.read_memory(abi.SCRATCH_ADDR, 7) == b"before\0"


@pytest.mark.parametrize("written", [3 * 4096, 3 << 20])  # page copies / whole reset
def test_restore_brings_back_every_written_page(sandbox: Sandbox, written: int) -> None:
    layout = sandbox.layout
    regions = [
        (layout.heap_addr, 4 << 20),
        (layout.stack_base, layout.stack_top - layout.stack_base),
        (layout.input_addr, layout.input_size),
        (layout.output_addr, layout.output_size),
    ]
    before = [sandbox.read_memory(start, size) for start, size in regions]
    sandbox.call("heap_roundtrip", written)
    sandbox.call("echo_bytes", bytes(range(256)) * 100)
    assert [sandbox.read_memory(start, size) for start, size in regions] != before
    sandbox.restore()
    assert [sandbox.read_memory(start, size) for start, size in regions] == before


def test_snapshot_of_another_configuration_is_refused(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest) as a, Sandbox(simpleguest, SandboxConfig(memory_size=16 << 20)) as b:
        with pytest.raises(ValueError, match="another guest or configuration"):
            b.restore(a.snapshot())
        with pytest.raises(TypeError):
            a.restore("not a snapshot")  # type: ignore[arg-type]


def test_sandboxes_do_not_share_memory(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest) as a, Sandbox(simpleguest) as b:
        a.call("write_sentinel", "secret of a")
        b.call("write_sentinel", "b")
        assert a.read_memory(abi.SCRATCH_ADDR, 12) == b"secret of a\0"
        assert b.read_memory(abi.SCRATCH_ADDR, 2) == b"b\0"
        assert a.call("increment") == 1 and a.call("increment") == 2
        assert b.call("increment") == 1


def test_read_memory_is_bounds_checked(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError):
        sandbox.read_memory(sandbox.layout.memory_size - 4, 8)
    with pytest.raises(ValueError):
        sandbox.read_memory(-1, 1)


def test_closed_sandbox_refuses_work(kvm: Kvm, simpleguest: Path) -> None:
    sb = Sandbox(simpleguest)
    sb.close()
    sb.close()  # idempotent
    assert sb.state is SandboxState.CLOSED
    with pytest.raises(SandboxClosed):
        sb.call("add", 1, 2)
    with pytest.raises(SandboxClosed):
        sb.restore()
    with pytest.raises(SandboxClosed):
        sb.snapshot()
    assert sb.interrupt() is False


def test_close_stops_a_running_call(kvm: Kvm, simpleguest: Path) -> None:
    sb = Sandbox(simpleguest)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            sb.call("spin")
        except GuestCancelled as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 5
    while sb.state is not SandboxState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)
    sb.close()
    worker.join(5)
    assert not worker.is_alive()
    assert len(outcome) == 1
    assert sb.state is SandboxState.CLOSED


def test_result_too_large_for_the_output_buffer_keeps_the_sandbox(
    kvm: Kvm, simpleguest: Path
) -> None:
    config = SandboxConfig(input_buffer_size=64 << 10, output_buffer_size=8 << 10)
    with Sandbox(simpleguest, config) as sb:
        with pytest.raises(GuestResultError, match="output_buffer_size") as info:
            sb.call("echo_bytes", bytes(20_000))
        assert info.value.core_path is None and info.value.function == "echo_bytes"
        assert sb.state is SandboxState.READY
        assert sb.call("echo_bytes", b"fits") == b"fits"


def test_config_sizes_the_layout(kvm: Kvm, simpleguest: Path) -> None:
    config = SandboxConfig(
        memory_size=4 << 20,
        stack_size=64 << 10,
        input_buffer_size=8 << 10,
        output_buffer_size=16 << 10,
        heap_size=64 << 10,
    )
    with Sandbox(simpleguest, config) as sb:
        assert sb.layout.input_size == 8 << 10
        assert sb.layout.heap_size == 64 << 10
        assert sb.call("heap_roundtrip", 32 << 10) == sum(i % 256 for i in range(32 << 10))
        assert sb.call("heap_roundtrip", 128 << 10) == -1  # malloc fails cleanly
        with pytest.raises(ArgumentError):
            sb.call("echo_bytes", bytes(8 << 10))


def test_interrupt_storm_across_sandboxes_cancels_exactly_the_interrupted_calls(
    kvm: Kvm, simpleguest: Path
) -> None:
    """Many threads interrupt at random moments: every True from interrupt() is one
    cancelled call, no other call is disturbed (stale kicks included)."""
    sandboxes = [Sandbox(simpleguest) for _ in range(6)]
    stop = threading.Event()
    stopped = [0] * len(sandboxes)
    cancelled = [0] * len(sandboxes)
    completed = [0] * len(sandboxes)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        sb, rng = sandboxes[i], random.Random(i)
        try:
            for _ in range(150):
                n = rng.randrange(1, 300_000)
                try:
                    assert sb.call("spin_for", n) == n
                    assert sb.call("add", n, 1) == n + 1
                    completed[i] += 1
                except GuestCancelled:
                    cancelled[i] += 1
                    sb.restore()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def storm(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(sandboxes))
            if sandboxes[i].interrupt():
                with lock:
                    stopped[i] += 1
            time.sleep(rng.uniform(0, 0.002))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(sandboxes))]
    storms = [threading.Thread(target=storm, args=(100 + s,)) for s in range(4)]
    for t in workers + storms:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    for t in storms:
        t.join()
    for sb in sandboxes:
        sb.close()
    assert errors == []
    assert stopped == cancelled
    assert sum(cancelled) > 10 and sum(completed) > 10
    assert [c + x for c, x in zip(completed, cancelled, strict=True)] == [150] * len(sandboxes)
