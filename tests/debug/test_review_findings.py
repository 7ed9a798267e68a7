"""What a review of the debugger found, each as a test that failed before its fix."""

from __future__ import annotations

import gc
import logging
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from hlasync import CoreDump, GuestCancelled, Sandbox, SandboxConfig, guests
from hlasync.debug.registers import NUMBERS
from hlasync.kvm import Kvm
from tests.debug.clients import debug_cli, free_port
from tests.debug.test_stub_hostile import WAIT, CallThread, Client, attach, register

SIMPLE = guests.path("simpleguest")


def debug_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("hlasync-debug")]


def test_a_sandbox_dropped_unclosed_frees_its_port_and_thread(kvm: Kvm) -> None:
    before = set(debug_threads())
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    where = sandbox.debug_address
    assert where is not None
    del sandbox
    gc.collect()
    deadline = time.monotonic() + WAIT
    while set(debug_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(debug_threads()) <= before
    again = Sandbox(SIMPLE, SandboxConfig(debug_port=where[1]))  # the port is free again
    again.close()


def _breakpoint_for_the_calls_to_come(sandbox: Sandbox, address: int) -> Client:
    """Attach at the first call (add), let it finish, then set a breakpoint at
    ``address`` for the calls to come; the attached client."""
    first = CallThread(sandbox, "add", 2, 3)
    client = attach(sandbox)
    client.send(b"c")
    assert first.outcome() == 5
    assert client.ask(b"Z0,%x,1" % address) == b"OK"
    return client


def test_dumps_during_a_call_never_show_breakpoints(kvm: Kvm, tmp_path: Path) -> None:
    """An on-demand dump of a running call (written at a kick, as watchdog dumps
    are) shows the guest's code, not the int3 the debugger placed in it."""
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0, crashdump_dir=tmp_path))
    try:
        add = sandbox.functions["add"].address
        original = sandbox.read_memory(add, 1)
        client = _breakpoint_for_the_calls_to_come(sandbox, add)
        running = CallThread(sandbox, "spin_for", 3 * 10**9)
        time.sleep(0.3)
        path = sandbox.generate_crashdump()
        with CoreDump.open(path) as dump:
            assert dump.read(add, 1) == original
        assert sandbox.read_memory(add, 1) == original  # in memory only inside KVM_RUN
        assert sandbox.interrupt()
        with pytest.raises(GuestCancelled):
            running.outcome()
        client.close()
    finally:
        sandbox.close()


def test_read_memory_during_a_call_never_shows_breakpoints(kvm: Kvm) -> None:
    """Sandbox.read_memory while a call runs with the debugger's int3 in memory
    (CI failure of b541c7d: the read saw 0xcc) returns the guest's own bytes."""
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    try:
        add = sandbox.functions["add"].address
        original = sandbox.read_memory(add, 4)
        client = _breakpoint_for_the_calls_to_come(sandbox, add)
        running = CallThread(sandbox, "spin")
        deadline = time.monotonic() + 0.5
        reads: set[bytes] = set()
        while time.monotonic() < deadline:
            reads.add(sandbox.read_memory(add - 1, 4)[1:])  # a read around it
            time.sleep(0.005)
        assert reads == {original[:3]}
        assert sandbox.interrupt()
        with pytest.raises(GuestCancelled):
            running.outcome()
        client.close()
    finally:
        sandbox.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("xmm3", 0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321),
        ("st0", 0x3FFF_8000_0000_0000_0000),
        ("fctrl", 0x27F),
        ("mxcsr", 0x1F00),
    ],
    ids=["xmm3", "st0", "fctrl", "mxcsr"],
)
def test_x87_and_sse_registers_written_by_the_debugger_stay(
    kvm: Kvm, name: str, value: int
) -> None:
    """A register of the XSAVE area written at add's entry (no x87 or SSE use
    yet: their components are in their initial state) keeps its value after
    a step: its component is marked in use."""
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    try:
        call = CallThread(sandbox, "add", 2, 3)
        client = attach(sandbox)
        size = {"xmm3": 16, "st0": 10}.get(name, 4)
        number = NUMBERS[name]
        width = 16 if name == "xmm3" else 10 if name == "st0" else 4
        written = value.to_bytes(size, "little").ljust(width, b"\0").hex().encode()
        assert client.ask(b"P%x=%s" % (number, written)) == b"OK"
        client.send(b"s")
        assert client.packet().startswith(b"T05")
        assert client.ask(b"p%x" % number) == written
        client.send(b"c")
        assert call.outcome() == 5
        client.close()
    finally:
        sandbox.close()


def test_a_step_over_an_out_stops_right_after_it(kvm: Kvm) -> None:
    """Single-stepping the guest's out (a host call) stops at the next
    instruction: this host loses the trap after the exit, the stub makes up
    for it."""
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    sandbox.register_host_function("twice", lambda x: 2 * x)
    try:
        call = CallThread(sandbox, "call_host", "twice", 21)
        client = attach(sandbox)
        seen_out = False
        for _ in range(2000):
            rip = register(client, "rip")
            code = bytes.fromhex(client.ask(b"m%x,2" % rip).decode())
            client.send(b"s")
            reply = client.packet()
            assert reply.startswith(b"T05"), reply
            if code[0] in (0xE6, 0xE7, 0xEE, 0xEF):  # out imm8 / out dx
                length = 2 if code[0] in (0xE6, 0xE7) else 1
                assert register(client, "rip") == rip + length
                seen_out = True
                break
        assert seen_out
        client.send(b"c")
        assert call.outcome() == 42
        client.close()
    finally:
        sandbox.close()


def test_a_dump_during_an_exception_stop_shows_the_guest(kvm: Kvm, tmp_path: Path) -> None:
    """At a breakpoint stop (a #BP report), generate_crashdump() shows the
    guest where it stopped, not the CPL0 exception stub."""
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0, crashdump_dir=tmp_path))
    try:
        add = sandbox.functions["add"].address
        call = CallThread(sandbox, "add", 2, 3)
        client = attach(sandbox)
        assert register(client, "rip") == add
        path = sandbox.generate_crashdump()
        with CoreDump.open(path) as dump:
            assert dump.registers["rip"] == add
            assert dump.registers["cs"] & 3 == 3
            assert dump.registers["rsp"] == register(client, "rsp")
        client.send(b"c")
        assert call.outcome() == 5
        client.close()
    finally:
        sandbox.close()


def test_interrupt_of_a_stopped_call_disconnects_its_debugger(kvm: Kvm) -> None:
    """interrupt() of a call stopped in the debugger ends the call, and the
    debugger is told by its connection ending (it would read registers of a
    stop that no longer exists)."""
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    try:
        call = CallThread(sandbox, "add", 2, 3)
        client = attach(sandbox)
        assert sandbox.interrupt()
        with pytest.raises(GuestCancelled):
            call.outcome()
        assert client.closed_by_stub()
        deadline = time.monotonic() + WAIT
        while sandbox.debugger_attached and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not sandbox.debugger_attached
        sandbox.restore()
        assert sandbox.call("add", 1, 1) == 2  # no debugger: no stop
    finally:
        sandbox.close()


def test_a_debugger_leaving_as_a_stop_is_taken_does_not_wedge_the_call(
    kvm: Kvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The debugger disconnects between the decision to stop (it was attached)
    and the stop's publication: the stop is resumed at once, the call ends."""
    from hlasync.sandbox import debugging

    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    try:
        first = CallThread(sandbox, "add", 2, 3)
        client = attach(sandbox)
        fib = sandbox.functions["fib"].address
        client.send(b"c")
        assert first.outcome() == 5
        assert client.ask(b"Z0,%x,1" % fib) == b"OK"  # for the next call
        client.send_raw(b"\x03")
        left = threading.Event()
        original = debugging._stop_of

        def slow_stop_of(*args: object, **kwargs: object) -> object:
            client.close()  # the debugger leaves right here
            deadline = time.monotonic() + WAIT
            while sandbox.debugger_attached and time.monotonic() < deadline:
                time.sleep(0.01)
            left.set()
            return original(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(debugging, "_stop_of", slow_stop_of)
        second = CallThread(sandbox, "fib", 10)
        assert second.outcome() == 55
        assert left.is_set()
    finally:
        sandbox.close()


def test_ctrl_c_of_hlasync_debug_is_a_clean_exit(kvm: Kvm) -> None:
    cli = debug_cli(free_port(), "simpleguest", "add", "1", "2")
    try:
        assert cli.stderr is not None
        assert "waits at its entry" in cli.stderr.readline()
        time.sleep(0.3)
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, err
    assert "Traceback" not in err, err
    assert "interrupted" in err, err


def test_the_log_names_a_refused_second_debugger(
    kvm: Kvm, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0))
    try:
        call = CallThread(sandbox, "add", 2, 3)
        client = attach(sandbox)
        where = sandbox.debug_address
        assert where is not None
        with caplog.at_level(logging.WARNING, logger="hlasync.debug"):
            with socket.create_connection(where, timeout=WAIT) as other:
                other.settimeout(WAIT)
                assert other.recv(10) == b""
            deadline = time.monotonic() + WAIT
            while "one is attached already" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
        assert "one is attached already" in caplog.text
        client.send(b"c")
        assert call.outcome() == 5
        client.close()
    finally:
        sandbox.close()
