"""gdb (batch and MI) and lldb (gdb-remote) attached to live sandboxes.

Each test runs a call on a thread of a sandbox made with
``SandboxConfig(debug_port=0)``; the call waits at its function's entry
until the debugger attaches, as a user's would."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hlasync import (
    GuestCancelled,
    GuestCrashed,
    Sandbox,
    SandboxConfig,
    SandboxState,
    Supervisor,
    guests,
)
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm
from tests.conftest import run_cli
from tests.debug.clients import (
    GdbMI,
    debug_cli,
    free_port,
    gdb_batch,
    in_thread,
    lldb_batch,
)

SIMPLE = str(guests.path("simpleguest"))


@pytest.fixture
def debugged(kvm: Kvm, tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = Sandbox(SIMPLE, SandboxConfig(debug_port=0, crashdump_dir=tmp_path))
    try:
        yield sandbox
    finally:
        sandbox.close()


def address(sandbox: Sandbox) -> tuple[str, int]:
    where = sandbox.debug_address
    assert where is not None
    return where


def test_gdb_stops_at_the_entry_reads_and_changes_the_call(debugged: Sandbox) -> None:
    """The first call waits at add's entry; gdb shows the frames, registers
    and arguments, steps one instruction, and a changed argument changes
    the result; after detach the sandbox works as before."""
    call = in_thread(lambda: debugged.call("add", 40, 2))
    out = gdb_batch(
        address(debugged),
        "bt",
        "info registers rip rdi rsi",
        "p a",
        "p b",
        "set var a = 100",
        "stepi",
        "info registers rip",
        "detach",
    ).output()
    assert call.wait() == 102, out
    assert re.search(r"#0\s+add \(a=40, b=2\) at .*simpleguest\.c:8", out), out
    assert re.search(r"#1\s+0x[0-9a-f]+ in dispatch \(\)", out), out
    assert "$1 = 40" in out and "$2 = 2" in out, out
    rips = re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)
    add = debugged.image.symbol("add")
    assert add is not None
    assert int(rips[0], 16) == add.address and int(rips[1], 16) > add.address, out
    assert "rdi            0x28" in out, out  # 40, the first argument's register
    assert "detached" in out
    assert debugged.call("add", 1, 2) == 3


def test_gdb_breaks_steps_and_finishes_in_a_recursive_function(debugged: Sandbox) -> None:
    """A (conditional) breakpoint in fib stops in the recursion (bt shows
    it), step goes into the next call, finish returns to the caller with the
    value, next moves by source lines, and continue runs the call to its
    right result. Written for gcc's and clang's (zig cc) code alike."""
    call = in_thread(lambda: debugged.call("fib", 5))
    out = gdb_batch(
        address(debugged),
        "break fib if n == 4",
        "continue",
        "bt 3",
        "delete",
        "step",  # into fib(3)
        "info args",
        "finish",
        "next",
        "continue",
    )
    assert call.wait() == 5
    debugged.close()  # the "process" the debugger waits for ends: gdb exits
    text = out.output()
    assert re.search(r"Breakpoint 1, fib \(n=(n@entry=)?4\)", text), text
    assert re.search(r"#1\s+0x[0-9a-f]+ in fib \(n=(n@entry=)?5\)", text), text
    assert re.search(r"^fib \(n=(n@entry=)?3\) at .*simpleguest\.c:24", text, re.M), text
    assert "n = 3" in text, text  # info args
    finished = text.index("Value returned is $1 = 2")  # fib(3), back in fib(4)
    assert re.search(r"^\d+\t", text[finished:], re.M), text  # next printed its line
    assert "exited normally" in text, text


def test_a_software_watchpoint_fires(debugged: Sandbox) -> None:
    """Hardware watchpoints never fire at CPL3 on this host (architecture.md
    §14, Z2 is refused); gdb's software watchpoints, single-stepping, do."""
    call = in_thread(lambda: debugged.call("increment"))
    out = gdb_batch(
        address(debugged),
        "set can-use-hw-watchpoints 0",
        "watch counter",
        "continue",
        "p counter",
        "delete",
        "detach",
    ).output()
    assert call.wait() == 1
    assert "Old value = 0" in out and "New value = 1" in out, out
    assert "$1 = 1" in out, out
    assert debugged.call("increment") == 2  # detached: the sandbox keeps its state


def test_a_fault_stops_in_the_debugger_then_crashes_with_its_dump(debugged: Sandbox) -> None:
    """A fault under a debugger stops there with the signal a process would
    get (SIGFPE for #DE) at the faulting instruction; continuing passes it on:
    gdb sees the "process" end with it, and the call raises GuestCrashed with
    its core dump, as without a debugger."""
    call = in_thread(lambda: debugged.call("divide_by_zero"))
    out = gdb_batch(address(debugged), "continue", "bt 1", "p zero", "continue").output()
    with pytest.raises(GuestCrashed) as crashed:
        call.wait()
    assert "Program received signal SIGFPE" in out, out
    assert "$1 = 0" in out, out  # a local (volatile: in memory, whatever the compiler)
    assert re.search(r"#0\s+0x[0-9a-f]+ in divide_by_zero \(\)", out), out
    assert "Program terminated with signal SIGFPE" in out, out
    assert crashed.value.vector_name == "#DE"
    assert crashed.value.core_path is not None and crashed.value.core_path.exists()
    debugged.restore()
    assert debugged.call("add", 2, 2) == 4


def test_faults_can_dump_without_stopping(debugged: Sandbox) -> None:
    """gdb's own ``handle SIGFPE nostop`` is how a debugging session lets
    faults take their course: no stop, the dump and GuestCrashed as usual."""
    call = in_thread(lambda: debugged.call("divide_by_zero"))
    out = gdb_batch(address(debugged), "handle SIGFPE nostop noprint pass", "continue").output()
    with pytest.raises(GuestCrashed) as crashed:
        call.wait()
    assert "Program received signal" not in out, out
    assert "Program terminated with signal SIGFPE" in out, out
    assert crashed.value.core_path is not None and crashed.value.core_path.exists()


def test_gdb_mi_interrupts_a_spinning_guest(debugged: Sandbox) -> None:
    """Ctrl-C (MI's -exec-interrupt) stops a guest that never returns, in
    spin(); after detach it spins on, and interrupt() still stops the call."""
    call = in_thread(lambda: debugged.call("spin"))
    mi = GdbMI()
    try:
        mi.command("-gdb-set mi-async on")
        host, port = address(debugged)
        assert mi.command(f"-target-select remote {host}:{port}").startswith("^connected")
        mi.command("-exec-continue", "*running")
        mi.command("-exec-interrupt")
        stopped = mi.until("*stopped")
        assert 'signal-name="SIGINT"' in stopped and 'func="spin"' in stopped, stopped
        frames = mi.command("-stack-list-frames")
        assert 'func="spin"' in frames and 'func="dispatch"' in frames, frames
        assert mi.command("-target-detach").startswith("^done")
    finally:
        mi.close()
    assert not call.done.wait(0.3)  # spinning again
    assert debugged.interrupt()
    with pytest.raises(GuestCancelled):
        call.wait()
    debugged.restore()
    assert debugged.call("add", 3, 4) == 7


def test_lldb_attaches_with_gdb_remote(debugged: Sandbox) -> None:
    """lldb: frames, registers, a local, a breakpoint by name, continue, detach."""
    call = in_thread(lambda: debugged.call("fib", 5))
    out = lldb_batch(
        SIMPLE,
        address(debugged),
        "bt",
        "register read rip rdi",
        "frame variable",
        "breakpoint set -n fib -c 'n == 4'",
        "continue",
        "bt 2",
        "process detach",
    ).output()
    assert call.wait() == 5, out
    assert re.search(r"frame #0: 0x[0-9a-f]+ simpleguest\.elf`fib\(n=5\)", out), out
    assert re.search(r"rdi = 0x0+5\b", out), out
    assert "(int64_t) n = 5" in out, out
    assert "stop reason = breakpoint 1.1" in out, out
    assert re.search(r"fib\(n=4\) at simpleguest\.c:24", out), out
    assert re.search(r"frame #1: 0x[0-9a-f]+ simpleguest\.elf`fib\(n=5\)", out), out
    assert "Process 1 detached" in out, out


def test_the_javascript_runtime_is_debuggable(kvm: Kvm) -> None:
    """A JSSandbox's first handler call stops at the runtime's js_call; a
    breakpoint in the engine (JS_CallInternal) shows the handler's
    JavaScript frames through hl_js_stack(); time stopped in the debugger
    does not count against the call's wall-clock timeout."""
    js = JSSandbox(debug_port=0)
    try:
        js.add_handler(
            "fib",
            "function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2) }\n"
            "function handler(e) { return fib(e.n) }",
        )
        js.load()
        call = in_thread(lambda: js.call_handler("fib", {"n": 10}, timeout=0.5))
        where = js.sandbox.debug_address
        assert where is not None
        out = gdb_batch(
            where,
            "bt 1",
            "break JS_CallInternal",
            "continue",  # the handler
            "continue",  # fib(10)
            "continue",  # fib(9), called by fib(10)
            "delete",
            'printf "%s\\n", hl_js_stack()',
            "shell sleep 1",
            "detach",
        ).output()
        assert call.wait() == 55, out
        assert re.search(r"#0\s+js_call \(name=0x[0-9a-f]+ \"fib\"", out), out
        assert "Breakpoint 1, JS_CallInternal" in out, out
        assert "at fib (fib.js:1" in out and "at handler (fib.js:2" in out, out
        assert js.call_handler("fib", {"n": 6}) == 8  # no stop once detached
    finally:
        js.close()


def test_ctrl_c_stops_a_javascript_handler_that_never_returns(kvm: Kvm) -> None:
    """Ctrl-C (MI -exec-interrupt) stops a handler in an endless loop inside
    the engine, hl_js_stack() names the handler's line, and after detach its
    CPU-time limit still ends the call (GuestTimeout with its JS stack)."""
    from hlasync import GuestTimeout

    js = JSSandbox(debug_port=0)
    mi = GdbMI()
    try:
        js.add_handler("loop", "function handler(e) {\n  let n = 0\n  while (true) { n++ }\n}")
        js.load()
        call = in_thread(lambda: js.call_handler("loop", {}, cpu_timeout=1.0))
        host, port = js.sandbox.debug_address or ("", 0)
        mi.command("-gdb-set mi-async on")
        assert mi.command(f"-target-select remote {host}:{port}").startswith("^connected")
        mi.command("-exec-continue", "*running")
        time.sleep(0.3)  # into the loop
        mi.command("-exec-interrupt")
        assert 'signal-name="SIGINT"' in mi.until("*stopped")
        # To a safe point of the interpreter (docs/debugging.md), then ask.
        mi.command("-break-insert js_poll_interrupts")
        mi.command("-exec-continue", "*running")
        assert 'reason="breakpoint-hit"' in mi.until("*stopped")
        mi.command("-break-delete")
        stack = mi.command('-data-evaluate-expression "(char *)hl_js_stack()"')
        assert "at handler (loop.js:3" in stack, "\n".join(mi.seen[-30:])
        assert mi.command("-target-detach").startswith("^done")
        with pytest.raises(GuestTimeout) as timed_out:
            call.wait()
        assert timed_out.value.kind == "cpu"
        assert "at handler (loop.js:3" in (timed_out.value.js_stack or "")
    finally:
        mi.close()
        js.close()


def test_lldb_debugs_the_javascript_runtime(kvm: Kvm) -> None:
    """lldb in the QuickJS engine: a breakpoint in the interpreter, its frames
    back to the runtime's js_call, and detach with the handler's result."""
    js = JSSandbox(debug_port=0)
    try:
        js.add_handler("echo", "function handler(e) { return [e.n, e.n + 1] }")
        js.load()
        call = in_thread(lambda: js.call_handler("echo", {"n": 41}))
        where = js.sandbox.debug_address
        assert where is not None
        out = lldb_batch(
            str(js.sandbox.image.path),
            where,
            "breakpoint set -n JS_CallInternal",
            "continue",
            "bt 4",
            "breakpoint delete --force",
            "process detach",
        ).output()
        assert call.wait() == [41, 42], out
        assert "stop reason = breakpoint 1.1" in out, out
        assert re.search(r"frame #0: 0x[0-9a-f]+ jsruntime\.elf`JS_CallInternal", out), out
        assert "jsruntime.elf`js_call" in out, out
    finally:
        js.close()


@pytest.mark.anyio
@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "processes"])
async def test_a_supervised_sandbox_waits_for_its_debugger_without_a_timeout(
    kvm: Kvm, processes: int
) -> None:
    """A supervisor's dedicated sandbox serves a debugger (in a worker
    process too); its call's timeout leaves out the time it was stopped."""
    port = free_port()
    async with Supervisor(workers=1, processes=processes) as supervisor:
        box = await supervisor.create_sandbox(SIMPLE, SandboxConfig(debug_port=port))
        run = gdb_batch(("127.0.0.1", port), "p a", "shell sleep 1", "detach")
        assert await box.call("add", 20, 22, timeout=0.5) == 42
        out = run.output()
        assert "$1 = 20" in out, out
        with pytest.raises(ValueError, match="cannot be debugged"):
            await supervisor.create_pool(SIMPLE, 1, SandboxConfig(debug_port=port))
        from hlasync import DebuggerError

        with pytest.raises(DebuggerError, match="Address already in use"):  # crosses processes
            await supervisor.create_sandbox(SIMPLE, SandboxConfig(debug_port=port))


def test_hlasync_debug_prints_how_to_attach_and_the_result(kvm: Kvm) -> None:
    """``hlasync debug``: the gdb line it prints attaches; the call's result
    (changed in the debugger) is printed when it ends."""
    port = free_port()
    cli = debug_cli(port, "simpleguest", "add", "40", "2")
    try:
        assert cli.stderr is not None
        lines = [cli.stderr.readline() for _ in range(3)]
        assert "waits at its entry" in lines[0], lines
        gdb_line, lldb_line = lines[1].strip(), lines[2].strip()
        assert gdb_line == f"gdb {SIMPLE} -ex 'target remote 127.0.0.1:{port}'", lines
        assert lldb_line == f"lldb {SIMPLE} -o 'gdb-remote 127.0.0.1:{port}'", lines
        out = gdb_batch(("127.0.0.1", port), "set var b = 8", "continue").output()
        stdout, _ = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0
    assert stdout.strip() == "48"
    assert "exited normally" in out, out
    refused = run_cli("debug", "simpleguest", "add", "1", "--port", str(port))
    assert refused.returncode == 2 and "takes 2 argument(s), got 1" in refused.stderr


def test_a_port_in_use_is_a_clear_error(kvm: Kvm) -> None:
    from hlasync import DebuggerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(DebuggerError, match=f"127.0.0.1:{port}"):
            Sandbox(SIMPLE, SandboxConfig(debug_port=port))


def test_without_a_debugger_a_debugged_sandbox_runs_as_any_other(debugged: Sandbox) -> None:
    """Once a debugger has detached, faults dump as usual and calls run."""
    call = in_thread(lambda: debugged.call("add", 1, 1))
    gdb_batch(address(debugged), "detach").output()
    assert call.wait() == 2
    with pytest.raises(GuestCrashed) as crashed:
        debugged.call("divide_by_zero")
    assert crashed.value.core_path is not None
    assert debugged.state is SandboxState.POISONED


def test_a_forked_child_does_not_keep_the_port(debugged: Sandbox) -> None:
    """A child forked while a sandbox serves a debugger closes its copy of the
    listening socket: once the parent closes the sandbox, the port is free
    even while the child lives on."""
    import os

    _, port = address(debugged)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only sleeps
        time.sleep(2.0)
        os._exit(0)
    try:
        time.sleep(0.2)  # the child's after-fork hooks have run
        debugged.close()
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
            again.listen(1)
    finally:
        os.waitpid(child, 0)
