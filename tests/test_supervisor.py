"""The async supervisor on real KVM, under asyncio and trio."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from hlasync import (
    ArgumentError,
    CoreDump,
    GuestCancelled,
    GuestCrashed,
    GuestTimeout,
    HostFunctionError,
    SandboxConfig,
    SupervisorBusy,
    SupervisorClosed,
)
from hlasync import events as ev
from hlasync.kvm import Kvm
from hlasync.supervisor import Supervisor
from hlasync.supervisor.host import WorkerHost
from tests.conftest import settled_fds, threads_only

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("supervisor_mode")]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _hlasync_threads() -> list[str]:
    """hlasync's threads, less the process-wide ``hlasync-trim`` thread, which
    lives while any sandbox in the process (another test's too) may go idle."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("hlasync-") and t.name != "hlasync-trim"
    ]


async def test_thousand_concurrent_calls_across_pools(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=2) as sup:
        adders = await sup.create_pool(simpleguest, size=4)
        echoes = await sup.create_pool(simpleguest, size=2)
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            if i % 3:
                results[i] = await adders.call("add", i, 1000)
            else:
                results[i] = await echoes.call("echo", f"call {i}")

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i)
        for i in range(1000):
            assert results[i] == (i + 1000 if i % 3 else f"call {i}")
        stats = sup.statistics()
        assert stats.completed == 1000 and stats.failed == 0 and stats.pending == 0
        assert stats.started == 1000 and stats.sandboxes == 6


async def test_pools_give_every_call_fresh_state(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(simpleguest, size=2)
        assert [await pool.call("increment") for _ in range(5)] == [1] * 5
        dedicated = await sup.create_sandbox(simpleguest)
        assert [await dedicated.call("increment") for _ in range(5)] == [1, 2, 3, 4, 5]


async def test_calls_run_on_vcpu_threads_in_fifo_order(kvm: Kvm, simpleguest: Path) -> None:
    seen: list[tuple[str, int]] = []

    def record(x: int) -> int:
        seen.append((threading.current_thread().name, x))
        return x

    async with Supervisor(workers=2) as sup:
        sb = await sup.create_sandbox(simpleguest, host_functions={"record": record})
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(sb.call, "call_host", "record", i)
                await anyio.sleep(0)  # submit in a known order
    assert [x for _, x in seen] == list(range(30))  # FIFO, serialised
    if sup.processes == 0:  # in process mode they run here, on anyio's worker threads
        assert all(name.startswith("hlasync-vcpu-") for name, _ in seen)


async def test_fifty_hung_calls_each_time_out_with_their_own_dump(
    kvm: Kvm, simpleguest: Path
) -> None:
    async with Supervisor(workers=8) as sup:
        spinners = await sup.create_pool(simpleguest, size=50)
        workers = await sup.create_pool(simpleguest, size=2)
        timeouts: list[GuestTimeout] = []
        good: list[object] = []
        written: list[ev.CrashDumpWritten] = []
        timed_out: list[ev.CallTimedOut] = []

        async def spin() -> None:
            with pytest.raises(GuestTimeout) as info:
                await spinners.call("spin", timeout=0.2)
            timeouts.append(info.value)

        async def useful() -> None:
            for i in range(20):
                good.append(await workers.call("add", i, i))

        async with sup.subscribe(ev.CrashDumpWritten, ev.CallTimedOut) as stream:
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(spin)
                tg.start_soon(useful)
            while len(written) < 50 or len(timed_out) < 50:
                event = await stream.receive()
                if isinstance(event, ev.CrashDumpWritten):
                    written.append(event)
                elif isinstance(event, ev.CallTimedOut):
                    timed_out.append(event)
    assert good == [2 * i for i in range(20)]
    assert len(timeouts) == 50
    paths = [t.core_path for t in timeouts]
    assert all(p is not None and p.is_file() for p in paths)
    assert len(set(paths)) == 50
    assert all(t.kind == "wall" and t.elapsed >= 0.2 and t.function == "spin" for t in timeouts)
    assert {e.path for e in written} == set(paths)
    assert all(e.reason == "timeout" and e.function == "spin" for e in written)
    assert {e.core_path for e in timed_out} == set(paths)
    with CoreDump.open(paths[0]) as dump:  # type: ignore[arg-type]
        assert (dump.backtrace()[0].symbol or "").startswith("spin")
        assert dump.metadata["reason"] == "timeout"


async def test_cpu_timeout_counts_guest_cpu_not_waiting(kvm: Kvm, simpleguest: Path) -> None:
    def slow(x: int) -> int:
        time.sleep(0.5)  # blocked, not burning CPU
        return x * 2

    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(simpleguest, size=2, host_functions={"slow": slow})
        with pytest.raises(GuestTimeout) as info:
            await pool.call("spin", cpu_timeout=0.2)
        assert info.value.kind == "cpu" and info.value.core_path is not None
        with CoreDump.open(info.value.core_path) as dump:
            assert dump.metadata["reason"] == "cpu-timeout"
        assert await pool.call("call_host", "slow", 21, cpu_timeout=0.2) == 42
        assert await pool.call("add", 1, 2) == 3


async def test_watchdog_dumps_a_guest_blocked_in_a_sync_host_function(
    kvm: Kvm, simpleguest: Path
) -> None:
    release = threading.Event()
    returned = threading.Event()

    def stuck(x: int) -> int:
        release.wait(30)
        returned.set()
        return x

    async with Supervisor(workers=2) as sup:
        sb = await sup.create_sandbox(simpleguest, host_functions={"stuck": stuck})
        with pytest.raises(GuestTimeout) as info:
            await sb.call("call_host", "stuck", 1, timeout=0.3)
        assert not returned.is_set()  # answered while the host function was still blocked
        release.set()
        assert info.value.core_path is not None
        with CoreDump.open(info.value.core_path) as dump:
            assert (dump.backtrace()[0].symbol or "").startswith("hl_call_host_v")
        assert await sb.call("increment") == 1  # restored once the host function returned


async def test_async_host_functions_run_on_the_loop_and_are_cancelled(
    kvm: Kvm, simpleguest: Path
) -> None:
    loop_thread = threading.current_thread().name
    ran_on: list[str] = []
    cancelled: list[bool] = []

    async def fetch(x: int) -> int:
        ran_on.append(threading.current_thread().name)
        await anyio.sleep(0.01)
        return x + 1

    async def hang(x: int) -> int:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise
        return x

    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(
            simpleguest, size=1, host_functions={"fetch": fetch, "hang": hang}
        )
        assert await pool.call("call_host", "fetch", 41) == 42
        assert ran_on == [loop_thread]
        with pytest.raises(GuestTimeout) as info:
            await pool.call("call_host", "hang", 1, timeout=0.3)
        assert cancelled == [True]
        assert info.value.core_path is not None
        assert await pool.call("add", 2, 2) == 4


async def test_cancelling_the_caller_stops_and_restores_the_guest(
    kvm: Kvm, simpleguest: Path
) -> None:
    async with Supervisor(workers=1) as sup:
        sb = await sup.create_sandbox(simpleguest)
        assert await sb.call("increment") == 1
        with anyio.move_on_after(0.2) as scope:
            await sb.call("spin")  # never returns by itself
        assert scope.cancelled_caught  # the caller's deadline won
        assert await sb.call("increment") == 1  # restored to its initial state
        with anyio.fail_after(5):  # and the single worker is free again
            assert await sb.call("add", 1, 1) == 2
        assert sup.statistics().cancelled == 1


async def test_dump_on_cancel(kvm: Kvm, simpleguest: Path, dump_dir: Path) -> None:
    async with Supervisor(workers=1, dump_on_cancel=True) as sup:
        sb = await sup.create_sandbox(simpleguest)
        async with sup.subscribe(ev.CrashDumpWritten) as stream:
            with anyio.move_on_after(0.2):
                await sb.call("spin")
            with anyio.fail_after(10):
                event = await stream.receive()
    assert isinstance(event, ev.CrashDumpWritten) and event.reason == "cancelled"
    assert event.path.parent == dump_dir and event.function == "spin"


async def test_cancelling_a_queued_call_never_runs_it(kvm: Kvm, simpleguest: Path) -> None:
    calls: list[int] = []

    def note(x: int) -> int:
        calls.append(x)
        return x

    async with Supervisor(workers=1) as sup:
        blocker = await sup.create_sandbox(simpleguest)
        other = await sup.create_sandbox(simpleguest, host_functions={"note": note})
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: blocker.call("spin_for", 300_000_000))
            tg.start_soon(lambda: other.call("spin_for", 300_000_000))
            await anyio.sleep(0.01)
            with anyio.move_on_after(0.01):
                # Queued: behind the busy worker, and behind the call on its sandbox.
                await other.call("call_host", "note", 7)
        assert calls == []
        assert await other.call("call_host", "note", 8) == 8
        assert calls == [8]


async def test_backpressure_and_call_nowait(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=1, max_pending=3) as sup:
        sb = await sup.create_sandbox(simpleguest)
        pending = [sb.call_nowait("spin_for", 50_000_000) for _ in range(3)]
        with pytest.raises(SupervisorBusy):
            sb.call_nowait("add", 1, 2)
        assert sup.statistics().pending + sup.statistics().running == 3
        assert not any(p.done() for p in pending)
        assert [await p for p in pending] == [50_000_000] * 3
        assert all(p.done() for p in pending)
        assert await sb.call_nowait("add", 1, 2) == 3


async def test_a_pending_call_outlives_a_cancelled_waiter(kvm: Kvm, simpleguest: Path) -> None:
    """A task that awaits a PendingCall and is cancelled cancels the call;
    another task awaiting the same PendingCall gets that call's outcome
    (GuestCancelled), not the first task's cancellation."""
    with anyio.fail_after(30):
        async with Supervisor(workers=1) as sup:
            sb = await sup.create_sandbox(simpleguest)
            pending = sb.call_nowait("spin_for", 10**12)
            with anyio.move_on_after(0.2):
                await pending
            with pytest.raises(GuestCancelled):
                await pending
            assert pending.done()
            assert await sb.call("add", 1, 2) == 3


async def test_awaiting_a_finished_pending_call_is_a_checkpoint(
    kvm: Kvm, simpleguest: Path
) -> None:
    """As every await of anyio: a cancelled scope is honoured even when the
    outcome is already in."""
    with anyio.fail_after(30):
        async with Supervisor(workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1)
            pending = pool.call_nowait("add", 1, 1)
            while not pending.done():
                await anyio.sleep(0.01)
            got = None
            with anyio.CancelScope() as scope:
                scope.cancel()
                got = await pending
            assert got is None and scope.cancelled_caught
            assert await pending == 2


async def test_bad_calls_fail_before_queueing(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=1)
        with pytest.raises(ArgumentError):
            await pool.call("add", "1", 2)
        with pytest.raises(ValueError, match="timeout"):
            await pool.call("add", 1, 2, timeout=-1)
        with pytest.raises(GuestCrashed) as info:
            await pool.call("divide_by_zero")
        assert info.value.core_path is not None
        assert await pool.call("add", 1, 2) == 3  # the pool restored it
        assert sup.statistics().failed == 1
    with pytest.raises(SupervisorClosed):
        await pool.call("add", 1, 2)
    with pytest.raises(SupervisorClosed):
        await Supervisor().create_pool(simpleguest)


async def test_on_demand_dump_of_a_running_call(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=2) as sup:
        sb = await sup.create_sandbox(simpleguest)
        async with anyio.create_task_group() as tg:
            results: list[object] = []

            async def run() -> None:
                results.append(await sb.call("spin_for", 1_500_000_000))

            tg.start_soon(run)
            await anyio.sleep(0.1)
            path = await sup.generate_crashdump(sb)
        assert results == [1_500_000_000]
        with CoreDump.open(path) as dump:
            assert dump.metadata["function"] == "spin_for"


async def test_slow_subscriber_loses_counted_events_but_no_dump_events(
    kvm: Kvm, simpleguest: Path
) -> None:
    async with Supervisor(workers=2) as sup:
        sb = await sup.create_sandbox(simpleguest)
        async with sup.subscribe(ev.CallCompleted, ev.CrashDumpWritten, buffer=5) as stream:
            for i in range(40):
                await sb.call("add", i, 1)
            dumps = [await sup.generate_crashdump(sb) for _ in range(3)]
            for i in range(40):
                await sb.call("add", i, 1)
            await anyio.sleep(0.05)
            received: list[ev.Event] = []
            while True:
                try:
                    received.append(stream.receive_nowait())
                except anyio.WouldBlock:
                    break
            stats = stream.statistics()
            assert sup.statistics().events_dropped == stats.dropped
        assert stats.dropped == 80 - 5
        assert [e.path for e in received if isinstance(e, ev.CrashDumpWritten)] == dumps
        announced = sum(e.count for e in received if isinstance(e, ev.EventsDropped))
        assert announced == stats.dropped
        completed = [e for e in received if isinstance(e, ev.CallCompleted)]
        assert len(completed) == 5  # the newest ones (drop_oldest)


async def test_drop_newest_policy(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=1) as sup:
        sb = await sup.create_sandbox(simpleguest)
        async with sup.subscribe(ev.CallCompleted, buffer=3, overflow="drop_newest") as stream:
            ids = []
            for i in range(10):
                await sb.call("add", i, 1)
            await anyio.sleep(0.05)
            while True:
                try:
                    event = stream.receive_nowait()
                except anyio.WouldBlock:
                    break
                if isinstance(event, ev.CallCompleted):
                    ids.append(event.call_id)
        assert len(ids) == 3 and ids == sorted(ids)


async def test_events_describe_a_call(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=1) as sup:
        async with sup.subscribe() as stream:
            sb = await sup.create_sandbox(simpleguest)
            await sb.call("print_message", "hello events\n")
            with pytest.raises(GuestCrashed):
                await sb.call("undefined_instruction")
            kinds: list[type[ev.Event]] = []
            output = crash = None
            while len(kinds) < 8:
                with anyio.fail_after(5):
                    event = await stream.receive()
                kinds.append(type(event))
                if isinstance(event, ev.GuestOutput):
                    output = event
                if isinstance(event, ev.GuestCrashed):
                    crash = event
        assert kinds[0] is ev.SandboxCreated
        assert {ev.CallStarted, ev.CallCompleted, ev.CallFailed, ev.CrashDumpWritten} <= set(kinds)
        assert output is not None and output.text == "hello events\n"
        assert crash is not None and crash.vector_name == "#UD" and crash.core_path is not None
        assert all(e.sandbox_id == sb.id for e in [output, crash])


async def test_shutdown_with_calls_in_flight_leaks_nothing(kvm: Kvm, simpleguest: Path) -> None:
    process = psutil.Process()
    fds_before = settled_fds(simpleguest)
    assert _hlasync_threads() == []
    outcomes: list[BaseException] = []

    async def hang(target: object, name: str) -> None:
        try:
            await target.call(name)  # type: ignore[attr-defined]
        except (GuestCancelled, SupervisorClosed) as exc:
            outcomes.append(exc)

    async with (
        anyio.create_task_group() as tg,
        Supervisor(workers=2, shutdown_grace=0.1) as sup,
    ):
        pool = await sup.create_pool(simpleguest, size=3)
        sb = await sup.create_sandbox(simpleguest)
        for target in (pool, pool, pool, sb):
            tg.start_soon(hang, target, "spin")
        await anyio.sleep(0.2)
        if sup.processes:  # the vCPU threads are in the worker processes
            assert len(process.children()) == sup.processes
        else:
            threads = ["hlasync-vcpu-0", "hlasync-vcpu-1", "hlasync-watchdog"]
            names = _hlasync_threads()
            # (hlasync-stall too, with hot pools: HLASYNC_HOT_RESTORE=1.)
            ours = [n for n in names if not n.startswith("hlasync-owner-") and n != "hlasync-stall"]
            assert sorted(ours) == threads
            # One owner thread per sandbox (three pool members, one dedicated).
            assert len([n for n in names if n.startswith("hlasync-owner-")]) == 4
    assert len(outcomes) == 4
    assert _hlasync_threads() == []
    assert process.children() == []
    assert process.num_fds() == fds_before


async def test_pinned_workers(kvm: Kvm, simpleguest: Path) -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    # An importable reference runs where the sandbox is: on the pinned vCPU thread.
    where = {"where": "tests.hostfns:pinned_cpu"}
    async with Supervisor(workers=1, pin_cpus=[cpu]) as sup:
        pool = await sup.create_pool(simpleguest, size=1, host_functions=where)
        assert await pool.call("call_host", "where", 1) == 1000 + cpu
    with pytest.raises(ValueError, match="pin_cpus"):
        Supervisor(pin_cpus=[10_000])


async def test_host_functions_by_reference_run_where_the_sandbox_is(
    kvm: Kvm, simpleguest: Path
) -> None:
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(
            simpleguest, size=1, host_functions={"pid": "tests.hostfns:process_id"}
        )
        pid = await pool.call("call_host", "pid", 1)
        assert (pid == os.getpid()) == (sup.processes == 0)
        for bad, message in (
            ("tests.hostfns", "expected 'package.module:function'"),
            ("tests.no_such_module:f", "No module named"),
            ("tests.hostfns:missing", "has no missing"),
            ("tests.hostfns:not_allowed", "is an async def"),
        ):
            with pytest.raises(ValueError, match=message):
                await sup.create_pool(simpleguest, size=1, host_functions={"f": bad})
        with pytest.raises(TypeError, match="expected a callable"):
            await sup.create_pool(simpleguest, size=1, host_functions={"f": 42})  # type: ignore[dict-item]


async def test_config_and_guest_output_without_subscribers(
    kvm: Kvm, simpleguest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=1, config=SandboxConfig(memory_size=4 << 20))
        await pool.call("print_message", "nobody listens\n")
    assert "nobody listens" in capsys.readouterr().out


async def test_register_host_function_on_a_pool(kvm: Kvm, simpleguest: Path) -> None:
    async def triple(x: int) -> int:
        await anyio.sleep(0)
        return 3 * x

    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(simpleguest, size=3)
        pool.register_host_function("triple", triple)
        results: list[int] = []
        async with anyio.create_task_group() as tg:
            for i in range(12):

                async def one(i: int = i) -> None:
                    result = await pool.call("call_host", "triple", i)
                    assert isinstance(result, int)
                    results.append(result)

                tg.start_soon(one)
        assert sorted(results) == [3 * i for i in range(12)]


async def test_callers_waiting_for_room_get_supervisor_closed_at_shutdown(
    kvm: Kvm, simpleguest: Path
) -> None:
    outcomes: list[object] = []

    async def add(target: object, *call: object) -> None:
        try:
            outcomes.append(await target.call(*(call or ("add", 1, 2))))  # type: ignore[attr-defined]
        except (SupervisorClosed, GuestCancelled) as exc:
            outcomes.append(exc)

    async def busy_loop() -> None:
        for _ in range(200):
            time.sleep(0.003)  # keep the loop thread busy, as in a loaded service
            await anyio.sleep(0)

    with anyio.fail_after(30):
        async with (
            anyio.create_task_group() as tg,
            Supervisor(workers=1, max_pending=1, shutdown_grace=0.05) as sup,
        ):
            sb = await sup.create_sandbox(simpleguest)
            tg.start_soon(add, sb)  # takes the only slot ...
            tg.start_soon(add, sb, "spin_for", 10**11)
            for _ in range(3):
                tg.start_soon(add, sb)  # ... these wait for room
            tg.start_soon(busy_loop)
            await anyio.sleep(0.05)
    assert len(outcomes) == 5  # every caller got an answer; none hangs


async def test_one_stream_many_readers_and_bounded_announcements(
    kvm: Kvm, simpleguest: Path
) -> None:
    async with Supervisor(workers=1) as sup:
        sb = await sup.create_sandbox(simpleguest)
        async with sup.subscribe(ev.CallCompleted, buffer=5) as stream:
            for i in range(300):
                await sb.call("add", i, 1)
            await anyio.sleep(0.05)
            assert stream.statistics().buffered <= 6  # 5 events + one pending announcement
            first = stream.receive_nowait()
            assert isinstance(first, ev.EventsDropped) and first.count == 295
            for _ in range(5):
                stream.receive_nowait()
            got: list[ev.Event] = []

            async def reader() -> None:
                async for event in stream:
                    got.append(event)

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                tg.start_soon(reader)
                await anyio.sleep(0.01)
                for i in range(10):
                    await sb.call("add", i, 1)
                with anyio.fail_after(5):
                    while len(got) < 10:
                        await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
        assert len(got) == 10


async def test_timeout_dump_failure_is_reported_on_the_error(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(
            simpleguest, size=1, config=SandboxConfig(crashdump_dir="/proc")
        )
        with pytest.raises(GuestTimeout) as info:
            await pool.call("spin", timeout=0.2)
    assert info.value.core_path is None
    assert info.value.crashdump_error is not None


async def test_misbehaving_host_functions_under_the_supervisor(kvm: Kvm, simpleguest: Path) -> None:
    def raises(x: int) -> int:
        raise KeyError(x)

    def wrong_type(x: int) -> object:
        return {"not": "a value"}

    async def async_raises(x: int) -> int:
        await anyio.sleep(0)
        raise ValueError("async host function failed")

    host = {"raises": raises, "wrong": wrong_type, "async_raises": async_raises}
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(simpleguest, size=2, host_functions=host)
        for name, cause in (
            ("raises", KeyError),
            ("wrong", TypeError),
            ("async_raises", ValueError),
        ):
            with pytest.raises(HostFunctionError) as info:
                await pool.call("call_host", name, 1)
            assert isinstance(info.value.__cause__, cause), name
            assert info.value.host_function == name
        assert await pool.call("add", 20, 22) == 42
        assert sup.statistics().failed == 3


@threads_only
async def test_a_call_abandoned_before_it_began_does_not_cancel_the_next(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller gives up after a worker took its call but before the call began
    (held open here): the next call on that sandbox must run normally."""
    original = WorkerHost._run
    taken, release = threading.Event(), threading.Event()

    def held_run(self: WorkerHost, job: Any) -> None:
        if job.name == "spin_for":
            taken.set()
            release.wait(10)
        original(self, job)

    monkeypatch.setattr(WorkerHost, "_run", held_run)
    async with Supervisor(workers=1) as sup:
        sb = await sup.create_sandbox(simpleguest)
        async with anyio.create_task_group() as tg:

            async def give_up() -> None:
                with anyio.CancelScope() as scope:
                    tg.start_soon(lambda: _cancel_when(taken, scope))
                    await sb.call("spin_for", 10)

            tg.start_soon(give_up)
        release.set()
        with anyio.fail_after(10):
            assert await sb.call("add", 1, 2) == 3
            assert await sb.call("increment") == 1


async def _cancel_when(event: threading.Event, scope: anyio.CancelScope) -> None:
    while not event.is_set():
        await anyio.sleep(0.001)
    scope.cancel()


async def test_closing_a_sandbox_twice_at_once_ends_both(kvm: Kvm, simpleguest: Path) -> None:
    """Two tasks closing the same dedicated sandbox at once: with worker
    processes the second close's request took the place of the first's in
    the wait for the worker's answer, and the first waited forever, shielded
    from cancellation (found by tests/stress_supervisor.py). Both end now."""
    async with Supervisor(workers=1) as sup:
        sandbox = await sup.create_sandbox(simpleguest)
        assert await sandbox.call("add", 1, 2) == 3
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(sandbox.aclose)
                tasks.start_soon(sandbox.aclose)
        with pytest.raises(SupervisorClosed):
            await sandbox.call("add", 1, 2)
        other = await sup.create_sandbox(simpleguest)  # the supervisor goes on
        assert await other.call("add", 2, 3) == 5
