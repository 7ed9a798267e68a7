"""Hot sandboxes (``SandboxConfig(spin=...)``): between calls the guest's
dispatcher spins on the doorbell page on a thread of the sandbox, and calls
that come within the spin are answered through shared memory, with no exit.
Everything a call can do still works; other operations park the guest first;
a guest that misuses the doorbell gets a protocol error, a dump, and no CPU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from hlasync import (
    ConfigError,
    GuestCancelled,
    GuestCrashed,
    GuestProtocolError,
    Sandbox,
    SandboxConfig,
    SandboxState,
)
from hlasync.crashdump import CoreDump
from hlasync.kvm import Kvm
from hlasync.sandbox.hot import HotSession

HOT = SandboxConfig(spin=0.2)


def _hot_session(sb: Sandbox) -> HotSession:
    holder = sb._holder
    assert isinstance(holder, HotSession), holder
    return holder


def _wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_spin_is_checked() -> None:
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="spin"):
            SandboxConfig(spin=bad)  # type: ignore[arg-type]


def test_hot_calls_answer_like_the_exit_path(kvm: Kvm, simpleguest: Path) -> None:
    printed: list[str] = []
    outcomes = []
    for config in (SandboxConfig(), HOT):
        with Sandbox(simpleguest, config, output=printed.append) as sb:
            sb.register_host_function("twice", lambda x: 2 * x)
            outcomes.append(
                [
                    sb.call("add", 2, 3),
                    sb.call("echo", "héllo"),
                    sb.call("echo_bytes", bytes(range(256)) * 8),
                    sb.call("fib", 20),
                    [sb.call("increment") for _ in range(5)],
                    sb.call("call_host", "twice", 21),  # a host call: an exit within the call
                    sb.call("print_message", "from the guest\n"),
                    sb.call("add_float", 0.5, 0.25),
                    sb.call("increment"),
                ]
            )
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][4] == [1, 2, 3, 4, 5] and outcomes[1][5] == 42
    assert printed == ["from the guest\n", "from the guest\n"]


def test_calls_within_the_spin_make_no_exit(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, HOT) as sb:
        sb.call("add", 1, 1)
        hot = _hot_session(sb)
        _wait_until(lambda: hot.running)
        exit_before = hot.exit
        for n in range(500):
            assert sb.call("add", n, 1) == n + 1
        # One KVM_RUN on the hot thread has served them all: it has not come back.
        assert sb._holder is hot and hot.running and hot.exit is exit_before


def test_the_spin_ends_and_an_idle_sandbox_costs_no_cpu(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(spin=0.01)) as sb:
        assert sb.call("increment") == 1
        _wait_until(lambda: sb._holder is None)  # parked: cold, its vCPU stopped
        process = psutil.Process()
        before = process.cpu_times()
        time.sleep(0.5)
        after = process.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        assert used < 0.1, f"an idle sandbox used {used:.3f} s of CPU in 0.5 s"
        assert sb.call("increment") == 2  # cold: the exit path, then hot again
        assert isinstance(sb._holder, HotSession)


def test_operations_park_a_hot_guest_at_once(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(spin=1.0)) as sb:  # the longest spin
        assert sb.call("increment") == 1
        started = time.monotonic()
        snapshot = sb.snapshot()
        assert sb.call("increment") == 2
        sb.restore(snapshot)
        assert sb.call("increment") == 2
        sb.restore()
        assert sb.call("increment") == 1
        path = sb.generate_crashdump()
        assert time.monotonic() - started < 1.0, "an operation waited for the spin to end"
    with CoreDump.open(path) as dump:  # parked at the dispatcher's exit
        frames = [frame.symbol or "" for frame in dump.backtrace()]
        assert any(name.startswith("hl_main") for name in frames), frames


def test_close_while_hot_is_prompt_and_ends_the_thread(kvm: Kvm, simpleguest: Path) -> None:
    sb = Sandbox(simpleguest, SandboxConfig(spin=1.0))
    sb.call("add", 1, 2)
    thread = _hot_session(sb).thread
    started = time.monotonic()
    sb.close()
    assert time.monotonic() - started < 1.0
    thread.join(5)
    assert not thread.is_alive()
    assert sb.state is SandboxState.CLOSED


def test_interrupt_and_dump_a_hot_call(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, HOT) as sb:
        sb.call("add", 1, 2)
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                sb.call("spin")  # never returns
            except BaseException as exc:  # noqa: BLE001 - the outcome is the subject
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        _wait_until(lambda: sb.current_call is not None)
        time.sleep(0.05)
        path = sb.generate_crashdump()  # mid-call: it stops the guest where it runs
        with CoreDump.open(path) as dump:
            frames = [frame.symbol or "" for frame in dump.backtrace()]
            assert any(name.startswith("spin") for name in frames), frames
        handle = sb.current_call
        assert handle is not None and handle.interrupt()
        thread.join(10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], GuestCancelled)
        assert sb.state is SandboxState.POISONED
        sb.restore()
        assert sb.call("add", 2, 2) == 4


def test_a_fault_in_a_hot_call_is_dumped(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, HOT) as sb:
        sb.call("add", 1, 2)
        with pytest.raises(GuestCrashed) as caught:
            sb.call("null_pointer_write")
        assert caught.value.core_path is not None
        assert sb._holder is None  # the hot thread gave the vCPU up
        sb.restore()
        assert sb.call("add", 3, 4) == 7


def test_a_guest_that_forges_doorbell_answers_is_stopped(kvm: Kvm, hostile_guest: Path) -> None:
    """A guest function that takes the doorbell over answers its own call with
    garbage and ignores every request to stop spinning: the call fails with a
    protocol error and a dump, the guest is kicked out of KVM_RUN (no CPU left
    burning), and restore() makes the sandbox usable again."""
    with Sandbox(hostile_guest, HOT) as sb:
        assert isinstance(sb.call("count_in_input", b"aaa"), int)  # hot now
        with pytest.raises(GuestProtocolError, match="bad result frame") as caught:
            sb.call("forge_doorbell")
        assert caught.value.core_path is not None
        assert sb._holder is None and not sb._hot.running  # type: ignore[union-attr]
        sb.restore()
        assert isinstance(sb.call("count_in_input", b"aaa"), int)


def test_a_guest_cannot_spin_longer_than_its_budget(kvm: Kvm, hostile_guest: Path) -> None:
    """The spin budget lives in guest memory: a guest that sets it to forever is
    still parked (or kicked) once its sandbox's own spin has passed."""
    with Sandbox(hostile_guest, SandboxConfig(spin=0.02)) as sb:
        sb.call("count_in_input", b"")
        sb.call("spin_forever_between_calls")
        _wait_until(lambda: sb._holder is None, timeout=2.0)
        assert isinstance(sb.call("count_in_input", b"a"), int)


def test_the_supervisor_and_js_sandboxes_keep_the_exit_path(kvm: Kvm, simpleguest: Path) -> None:
    """Their CPU-time limits count the calling thread's CPU: a guest spinning on
    another thread would escape them, so ``spin`` does not apply there."""
    import anyio

    from hlasync.js import JSSandbox
    from hlasync.sandbox import live_sandboxes
    from hlasync.supervisor import Supervisor

    async def supervised() -> list[object]:
        async with Supervisor(processes=0) as sup:
            pool = await sup.create_pool(simpleguest, size=1, config=HOT)
            assert await pool.call("add", 1, 2) == 3
            await anyio.sleep(0.01)
            return [sb._holder for sb in live_sandboxes()]

    assert not any(isinstance(h, HotSession) for h in anyio.run(supervised))
    from hlasync.js import runtime

    with JSSandbox(config=runtime.default_config(spin=0.2)) as js:
        js.add_handler("echo", "function handler(event) { return event }")
        js.load()
        assert js.call_handler("echo", {"a": 1}) == {"a": 1}
        assert not isinstance(js._sandbox._holder, HotSession)


def test_a_hot_sandbox_dropped_without_close_ends_its_thread(kvm: Kvm, simpleguest: Path) -> None:
    import gc

    sb = Sandbox(simpleguest, SandboxConfig(spin=0.01))
    sb.call("add", 1, 2)
    hot = _hot_session(sb)
    deadline = time.monotonic() + 10
    while hot.running:  # until the spin is over
        assert time.monotonic() < deadline
        time.sleep(0.001)
    thread = hot.thread
    del sb, hot
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_a_failed_host_call_is_not_run_again_when_the_guest_spins(
    kvm: Kvm, simpleguest: Path
) -> None:
    """After a host function fails, the vCPU is put back at the dispatcher but
    memory is not reset: the call must count as handled, or the guest, resumed
    to spin, would run the old frame (and the host function) a second time."""
    from hlasync import HostFunctionError

    calls: list[int] = []

    def fails_once(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise ValueError("no")
        return x

    with Sandbox(simpleguest, HOT) as sb:
        sb.register_host_function("fails_once", fails_once)
        sb.call("add", 1, 2)
        with pytest.raises(HostFunctionError):
            sb.call("call_host", "fails_once", 7)
        time.sleep(0.05)  # hot again meanwhile
        assert calls == [7]
        assert sb.call("call_host", "fails_once", 8) == 8
        assert calls == [7, 8]


def test_every_posted_call_runs_exactly_once(kvm: Kvm, simpleguest: Path) -> None:
    """Calls posted while the guest spins, around parks and cold calls, each
    run once. (The host once wrote the doorbell's words byte by byte: a guest
    reading ``req_seq`` in the middle saw 0, took it for a new call and ran
    the previous frame again, about once in 30 rounds.)"""
    with Sandbox(simpleguest, HOT) as sb:
        first = sb.call("increment")
        assert isinstance(first, int)
        expected = first
        for _ in range(300):
            with sb._operation("park"):  # what snapshot(), restore() and dumps do first
                pass
            for _ in range(3):  # one cold call, then hot ones
                expected += 1
                assert sb.call("increment") == expected
