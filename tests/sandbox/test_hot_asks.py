"""Host calls and prints of a hot call (``SandboxConfig(spin=...)``): the guest
asks through the doorbell and spins for the answer while the caller's thread
runs the host function, so its vCPU never leaves ``KVM_RUN``. Slow answers,
failures, dumps and stops while the guest waits, and guests that forge asks,
all end as they do on the exit path."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from hlasync import (
    GuestCancelled,
    GuestProtocolError,
    HostFunctionError,
    Sandbox,
    SandboxConfig,
    SandboxState,
    abi,
)
from hlasync.crashdump import CoreDump
from hlasync.kvm import Kvm
from hlasync.sandbox.hot import ANSWER_SPIN
from tests.sandbox.hot_helpers import make_hot

HOT = SandboxConfig(spin=0.2)


def _asks(sb: Sandbox) -> int:
    """Host calls and prints the guest asked on the doorbell so far."""
    return int(sb._machine.bell[abi.WORD_ASK_SEQ])


def _frames(path: Path) -> list[str]:
    with CoreDump.open(path) as dump:
        return [frame.symbol or "" for frame in dump.backtrace()]


def test_host_calls_and_prints_of_a_hot_call_need_no_exit(kvm: Kvm, simpleguest: Path) -> None:
    """While the host function runs, the guest is still in KVM_RUN on the hot
    thread (it spins for the answer): the host call made no exit."""
    printed: list[str] = []
    with Sandbox(simpleguest, HOT, output=printed.append) as sb:
        guest_running: list[bool] = []

        def twice(x: int) -> int:
            hot = sb._hot
            guest_running.append(hot is not None and hot.running)
            return 2 * x

        sb.register_host_function("twice", twice)
        make_hot(sb)
        before = _asks(sb)
        for n in range(200):
            assert sb.call("call_host", "twice", n) == 2 * n
            assert sb.call("print_message", f"line {n}\n") is None
        assert printed == [f"line {n}\n" for n in range(200)]
        # A host function slower than the answer spin (a GC pause, a busy
        # machine: on a loaded 2-CPU machine up to half of them) makes the
        # guest exit to wait after all; how many did not is a benchmark's
        # business (python -m hlasync.bench doorbell), that some did not is this test's.
        assert len(guest_running) == 200 and any(guest_running), guest_running
        assert _asks(sb) - before >= 300


def test_answers_slower_than_the_spin_arrive_after_an_exit(kvm: Kvm, simpleguest: Path) -> None:
    """A host function that takes longer than the guest's answer spin: the guest
    exits to wait, the call goes on from the caller's thread, and every host
    call of the call (fast and slow) is answered exactly once."""
    with Sandbox(simpleguest, HOT) as sb:
        seen: list[int] = []

        def slow(x: int) -> int:
            seen.append(x)
            if x % 2:
                time.sleep(ANSWER_SPIN * 10)
            return x

        sb.register_host_function("slow", slow)
        make_hot(sb)
        for _ in range(3):
            seen.clear()
            assert sb.call("call_host_times", "slow", 6) == sum(range(6))
            assert seen == list(range(6))
        assert sb.state is SandboxState.READY


def test_a_failed_host_call_of_a_hot_call_is_not_run_again(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, HOT) as sb:
        runs: list[int] = []

        def fail(x: int) -> int:
            runs.append(x)
            raise KeyError(x)

        sb.register_host_function("fail", fail)
        make_hot(sb)
        assert sb.call("increment") == 1
        with pytest.raises(HostFunctionError, match="KeyError"):
            sb.call("call_host", "fail", 7)
        with pytest.raises(HostFunctionError, match="unregistered"):
            sb.call("call_host", "missing", 1)
        assert runs == [7] and sb.state is SandboxState.READY
        for expected in (2, 3, 4):  # the guest was put back at its dispatcher, memory kept
            assert sb.call("increment") == expected
        assert runs == [7]


def test_a_dump_from_the_host_function_shows_the_guest_waiting(kvm: Kvm, simpleguest: Path) -> None:
    """generate_crashdump() from inside the host function of a hot call stops the
    spinning guest first; the dump shows it waiting at the doorbell for its answer."""
    with Sandbox(simpleguest, HOT) as sb:
        paths: list[Path] = []

        def dump(x: int) -> int:
            paths.append(sb.generate_crashdump())
            return x + 1

        sb.register_host_function("dump", dump)
        make_hot(sb)
        assert sb.call("call_host", "dump", 41) == 42
        assert sb.call("call_host", "dump", 1) == 2  # hot again, dumped again
        assert len(paths) == 2
        for path in paths:
            frames = _frames(path)
            assert any(name.startswith("hl_ask_doorbell") for name in frames), frames
            assert any(name.startswith("hl_call_host") for name in frames), frames


def test_dump_and_stop_a_hot_call_blocked_in_a_host_function(kvm: Kvm, simpleguest: Path) -> None:
    """Another thread dumps (borrowing the vCPU) and then interrupts a hot call
    whose host function blocks: the guest is stopped for the dump, and the call
    ends cancelled when the host function returns."""
    with Sandbox(simpleguest, HOT) as sb:
        entered, release = threading.Event(), threading.Event()

        def block(x: int) -> int:
            entered.set()
            release.wait(10)
            return x

        sb.register_host_function("block", block)
        make_hot(sb)
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(sb.call("call_host", "block", 5))
            except BaseException as exc:  # noqa: BLE001 - the outcome is the subject
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        assert entered.wait(10)
        path = sb.generate_crashdump()
        frames = _frames(path)
        assert any(name.startswith("hl_ask_doorbell") for name in frames), frames
        hot = sb._hot
        assert hot is not None and not hot.running  # stopped for the dump
        handle = sb.current_call
        assert handle is not None and handle.interrupt()
        release.set()
        thread.join(10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], GuestCancelled), outcome
        sb.restore()
        assert sb.call("add", 2, 2) == 4


def test_a_dumped_hot_call_blocked_in_a_host_function_goes_on(kvm: Kvm, simpleguest: Path) -> None:
    """The same dump without the stop: the call finishes with its result."""
    with Sandbox(simpleguest, HOT) as sb:
        entered, release = threading.Event(), threading.Event()

        def block(x: int) -> int:
            entered.set()
            release.wait(10)
            return x * 3

        sb.register_host_function("block", block)
        make_hot(sb)
        results: list[object] = []
        thread = threading.Thread(target=lambda: results.append(sb.call("call_host", "block", 5)))
        thread.start()
        assert entered.wait(10)
        sb.generate_crashdump()
        release.set()
        thread.join(10)
        assert results == [15]
        assert sb.call("call_host", "block", 2) == 6


@pytest.mark.parametrize("config", [HOT, SandboxConfig(spin=0)], ids=["hot", "exit-path"])
@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("ask_unknown_port", "unknown port 0x99"),
        ("ask_garbage_host_call", "bad host-call frame"),
    ],
)
def test_a_forged_ask_is_a_protocol_error_with_a_dump(
    kvm: Kvm, hostile_guest: Path, config: SandboxConfig, function: str, message: str
) -> None:
    """Asked on the doorbell (hot) or announced by an exit to wait (exit path):
    either way the host stops the guest, dumps it, and the sandbox recovers."""
    with Sandbox(hostile_guest, config) as sb:
        if config.spin:
            make_hot(sb, "count_in_input", b"")
        with pytest.raises(GuestProtocolError, match=message) as caught:
            sb.call(function)
        assert caught.value.core_path is not None
        assert sb.state is SandboxState.POISONED
        hot = sb._hot
        assert hot is None or not hot.running  # no guest left burning a CPU
        sb.restore()
        assert sb.call("count_in_input", b"aa") == 0  # no leftover of the forged frame


def _cpu_in(thread: threading.Thread, seconds: float) -> float:
    """The CPU time ``thread`` uses in the next ``seconds`` (as /proc counts
    it; a thread that has ended uses none)."""

    def used() -> float:
        for task in psutil.Process().threads():
            if task.id == thread.native_id:
                return float(task.user_time + task.system_time)
        return 0.0

    before = used()
    time.sleep(seconds)
    return max(used() - before, 0.0) if thread.is_alive() else 0.0


@pytest.mark.parametrize("stop", ["interrupt", "close"])
def test_a_stopped_hot_call_leaves_no_guest_spinning_in_its_host_function(
    kvm: Kvm, hostile_guest: Path, stop: str
) -> None:
    """A guest that asked for a host function and then spins, ignoring the
    answer spin, kept its hot thread (and a CPU) busy while the host function
    ran, after interrupt() returned True and after close() returned: the stop
    kicked only the caller's thread. The stop now takes the guest off the CPU
    at once; the call still ends as GuestCancelled when the function returns."""
    entered, release = threading.Event(), threading.Event()

    def slow() -> int:
        entered.set()
        release.wait(30)
        return 0

    sb = Sandbox(hostile_guest, HOT)
    outcome: list[BaseException] = []
    try:
        sb.register_host_function("slow", slow)
        hot = make_hot(sb, "cpuid_leaf", 0)

        def call() -> None:
            try:
                sb.call("ask_host_then_spin", "slow")
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert entered.wait(10)
        if stop == "interrupt":
            assert sb.interrupt()
        else:
            sb.close(timeout=0.5)
        time.sleep(0.1)  # the kick lands
        spent = _cpu_in(hot.thread, 0.5)
        assert spent < 0.05, f"the hot thread used {spent:.2f} s of CPU in 0.5 s"
    finally:
        release.set()
        caller.join(10)
        sb.close()
    assert len(outcome) == 1 and isinstance(outcome[0], GuestCancelled), outcome
