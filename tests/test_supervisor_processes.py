"""Worker processes (``Supervisor(processes=N)``): calls spread over them,
and a worker that dies never hangs a caller: its calls fail with WorkerLost,
WorkerDied is published, a new worker takes its shards, and the supervisor
goes on serving."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from hlasync import GuestCancelled, GuestTimeout, SandboxConfig, WorkerLost
from hlasync import events as ev
from hlasync.kvm import Kvm
from hlasync.supervisor import Pool, Supervisor
from hlasync.supervisor.proc_handle import WorkerHandle
from hlasync.supervisor.processes import HOT_QUEUE_DEPTH, ProcessBackend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _workers() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children()
        if "hlasync.supervisor.worker" in " ".join(child.cmdline())
    ]


async def test_calls_spread_over_the_worker_processes(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(processes=2, workers=1) as sup:
        assert len(_workers()) == 2 and sup.workers == 2
        pool = await sup.create_pool(
            simpleguest, size=4, host_functions={"pid": "tests.hostfns:process_id"}
        )
        assert len(pool.sandbox_ids) == 4
        seen: set[int] = set()
        async with anyio.create_task_group() as tg:
            for _ in range(40):

                async def one() -> None:
                    seen.add(await pool.call("call_host", "pid", 1))  # type: ignore[arg-type]

                tg.start_soon(one)
        assert seen == {p.pid for p in _workers()}  # both processes ran calls
        statistics = sup.statistics()
        assert (statistics.processes, statistics.completed, statistics.sandboxes) == (2, 40, 4)
        assert statistics.started == 40
    assert _workers() == []


async def test_a_call_waiting_for_a_host_answer_ends_cancelled_at_shutdown(
    kvm: Kvm, simpleguest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker asked to stop while its guest waits for a host function's answer:
    the call ends GuestCancelled however slowly the worker stops its calls. (The
    worker once released the waiting host call first: on a busy machine the call
    then finished as HostFunctionError(SupervisorClosed("no answer")).) The
    worker processes import this sitecustomize, which slows that step down."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import time
            import hlasync.supervisor.host as host

            original = host.WorkerHost.shutdown_begin

            def shutdown_begin(self):
                time.sleep(0.3)
                original(self)

            host.WorkerHost.shutdown_begin = shutdown_begin
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    entered, release = threading.Event(), threading.Event()

    def stuck(x: int) -> int:
        entered.set()
        release.wait(30)
        return x

    outcomes: list[BaseException] = []
    try:
        async with (
            anyio.create_task_group() as tg,
            Supervisor(processes=1, workers=1, shutdown_grace=0.2) as sup,
        ):
            pool = await sup.create_pool(simpleguest, size=1, host_functions={"stuck": stuck})

            async def call() -> None:
                try:
                    await pool.call("call_host", "stuck", 1)
                except Exception as exc:  # noqa: BLE001 - the outcome is the subject
                    outcomes.append(exc)

            tg.start_soon(call)
            with anyio.fail_after(10):
                while not entered.is_set():
                    await anyio.sleep(0.005)
    finally:
        release.set()
    assert len(outcomes) == 1 and isinstance(outcomes[0], GuestCancelled), outcomes


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV"])
async def test_a_worker_that_dies_fails_its_calls_and_is_replaced(
    kvm: Kvm, simpleguest: Path, how: str
) -> None:
    async with (
        Supervisor(processes=2, workers=2) as sup,
        sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as events,
    ):
        pool = await sup.create_pool(
            simpleguest,
            size=4,
            host_functions={
                "pid": "tests.hostfns:process_id",
                "crash": "tests.hostfns:crash_worker",
            },
        )
        dedicated = await sup.create_sandbox(simpleguest)
        assert [await dedicated.call("increment") for _ in range(2)] == [1, 2]
        outcomes: list[object] = []
        victim = _workers()[0]

        async def spin() -> None:
            try:
                outcomes.append(await pool.call("spin_for", 2_000_000_000, timeout=20))
            except WorkerLost as exc:
                outcomes.append(exc)

        with anyio.fail_after(30):  # nobody may hang
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(spin)
                await anyio.sleep(0.5)  # all four are running, two in each worker
                if how == "SIGKILL":
                    victim.send_signal(signal.SIGKILL)
                    tg.cancel_scope.deadline = anyio.current_time() + 3  # the others spin on
                else:
                    with pytest.raises(WorkerLost):
                        await pool.call("call_host", "crash", 1)
                    tg.cancel_scope.cancel()
            died = await events.receive()
            assert isinstance(died, ev.WorkerDied)
            lost = [o for o in outcomes if isinstance(o, WorkerLost)]
            if how == "SIGKILL":
                assert died.pid == victim.pid and died.exit_status == -signal.SIGKILL
                assert died.lost_calls == 2 and len(lost) == 2
                assert all(e.exit_status == -signal.SIGKILL for e in lost)
                assert "killed by SIGKILL" in str(lost[0])
            else:
                assert died.exit_status == -signal.SIGSEGV
            started = await events.receive()
            assert isinstance(started, ev.WorkerStarted) and started.worker == died.worker
            assert started.pid != died.pid
            # The supervisor goes on: every call works again, on both processes.
            for _ in range(8):
                assert await pool.call("add", 2, 3) == 5
            assert len(pool.sandbox_ids) == 4
            first = await dedicated.call("increment")
            assert first in (1, 3)  # a dedicated sandbox in the dead worker starts over
        assert sup.statistics().workers_lost == 1
        assert len(_workers()) == 2


def test_workers_never_outlive_their_supervisor(
    kvm: Kvm, simpleguest: Path, tmp_path: Path
) -> None:
    """The supervisor's process is killed: its workers see the channel close,
    stop their sandboxes and exit."""
    script = tmp_path / "supervise.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import anyio, os, sys
            from hlasync.supervisor import Supervisor

            async def main():
                async with Supervisor(processes=2, workers=1) as sup:
                    pool = await sup.create_pool({str(simpleguest)!r}, size=2)
                    await pool.call("add", 1, 2)
                    print("ready", flush=True)
                    await anyio.sleep(60)

            anyio.run(main)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        workers = [
            p
            for p in psutil.Process(child.pid).children()
            if "supervisor.worker" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        child.kill()
        child.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], "worker processes outlived their supervisor"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def test_processes_setting(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="processes"):
        Supervisor(processes=-1)
    monkeypatch.setenv("HLASYNC_PROCESSES", "3")
    assert Supervisor().processes == 3
    assert Supervisor(processes=0).processes == 0
    monkeypatch.setenv("HLASYNC_PROCESSES", "many")
    with pytest.raises(ValueError, match="HLASYNC_PROCESSES"):
        Supervisor()
    started = time.monotonic()
    async with Supervisor(processes=1, workers=3) as sup:
        assert sup.workers == 3 and "1 processes x 3 workers" in repr(sup)
    assert time.monotonic() - started < 10


async def test_a_hot_pool_sends_calls_ahead_and_a_queued_call_can_be_cancelled(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A hot pool's worker gets up to HOT_QUEUE_DEPTH calls per member at once
    (a hot call is shorter than the channel's round trip). A call queued in the
    worker behind a hung one is cancelled there without running, and the
    member serves the next call once the watchdog has stopped the hung one."""
    recorded: list[int] = []

    def record(value: int) -> int:
        recorded.append(value)
        return value

    async with Supervisor(processes=1) as sup:
        pool = await sup.create_pool(
            simpleguest,
            size=1,
            config=SandboxConfig(hot_restore=True),
            host_functions={"record": record},
        )
        shard = pool._shards[0]  # type: ignore[attr-defined]
        assert shard.capacity == HOT_QUEUE_DEPTH > 1
        peak = 0

        async def caller(i: int) -> None:
            nonlocal peak
            for n in range(50):
                assert await pool.call("add", i, n) == i + n
                peak = max(peak, shard.inflight)

        async with anyio.create_task_group() as tg:
            for i in range(2 * HOT_QUEUE_DEPTH):
                tg.start_soon(caller, i)
        assert peak > 1  # calls were in the worker before the one ahead ended

        async def hung() -> None:
            with pytest.raises(GuestTimeout):
                await pool.call("spin", timeout=1.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hung)
            await anyio.sleep(0.2)
            with anyio.move_on_after(0.2):  # sent to the worker, queued behind spin
                await pool.call("call_host", "record", 7)
        assert await pool.call("call_host", "record", 8) == 8
        assert recorded == [8]


async def test_calls_go_to_a_free_member_not_behind_a_long_call(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A hot pool with one member in each of 2 worker processes: while one member
    runs a long call, short calls go to the other member (before, every other
    one was sent ahead to the busy worker and waited there for the long call)."""
    async with Supervisor(processes=2, workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=2, config=SandboxConfig(hot_restore=True))
        for n in range(20):  # both members answer, and go hot
            assert await pool.call("add", n, 1) == n + 1
        order: list[str] = []

        async def long() -> None:
            with pytest.raises(GuestTimeout):
                await pool.call("spin", timeout=3.0)
            order.append("long")

        async def short(i: int) -> None:
            assert await pool.call("add", i, i) == 2 * i
            order.append("short")

        async with anyio.create_task_group() as tg:
            tg.start_soon(long)
            await anyio.sleep(0.1)  # it runs
            for i in range(8):
                tg.start_soon(short, i)
        assert order == ["short"] * 8 + ["long"]


async def test_calls_sent_ahead_to_a_worker_that_dies_run_elsewhere(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hot pool's calls sent ahead into a worker wait there, as its statistics
    say (pending, not running); when the worker dies, the call that ran fails
    with WorkerLost and the ones that never started run on its replacement."""
    monkeypatch.setattr(ProcessBackend, "queue_ahead_window", 60.0)  # send ahead whatever
    async with (
        Supervisor(processes=1, workers=1) as sup,
        sup.subscribe(ev.WorkerDied) as events,
    ):
        pool = await sup.create_pool(simpleguest, size=1, config=SandboxConfig(hot_restore=True))
        assert await pool.call("add", 1, 1) == 2
        outcomes: list[object] = []

        async def call(*args: object) -> None:
            try:
                outcomes.append(await pool.call(*args, timeout=20))  # type: ignore[arg-type]
            except WorkerLost as exc:
                outcomes.append(exc)

        with anyio.fail_after(30):  # nobody may hang
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "spin")
                await anyio.sleep(0.3)  # it runs
                for i in range(6):
                    tg.start_soon(call, "add", i, 10)
                await anyio.sleep(0.3)
                statistics = sup.statistics()
                shard = pool._shards[0]  # type: ignore[attr-defined]
                assert shard.inflight == HOT_QUEUE_DEPTH  # 3 sent ahead, 3 wait here
                assert (statistics.running, statistics.pending) == (1, 6)
                _workers()[0].send_signal(signal.SIGKILL)
        died = await events.receive()
        assert isinstance(died, ev.WorkerDied) and died.lost_calls == 1
    assert isinstance(outcomes[0], WorkerLost)
    assert sorted(o for o in outcomes[1:] if isinstance(o, int)) == [10 + i for i in range(6)]


async def test_outcomes_reach_the_loop_several_to_a_frame(kvm: Kvm, simpleguest: Path) -> None:
    """A worker with more calls to start holds a finished call's outcome so
    that a run of outcomes reaches the event loop in one frame (one wake-up):
    with 32 callers on a hot pool of 2, frames carry several messages each
    (one each before outcomes were held)."""
    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=2, config=SandboxConfig(hot_restore=True))
        before = sup.statistics()

        async def caller(i: int) -> None:
            for n in range(100):
                assert await pool.call("add", i, n) == i + n

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(caller, i)
        after = sup.statistics()
    frames = after.channel_frames - before.channel_frames
    messages = after.channel_messages - before.channel_messages
    assert messages >= 3200  # every outcome, and nothing else
    assert messages / frames > 1.5, (frames, messages)


async def _sent(shard: object, count: int) -> None:
    """Until ``count`` calls were sent to ``shard``'s worker and are unanswered
    (trio starts tasks in any order: a test that needs an order waits)."""
    with anyio.fail_after(10):
        while shard.inflight < count:  # type: ignore[attr-defined]
            await anyio.sleep(0.001)


async def _queue_then_kill(
    pool: Any,
    calls: Sequence[tuple[object, ...]],
    before_kill: Callable[[], Awaitable[None]],
    outcomes: dict[str, object],
) -> None:
    """Send ``calls`` ((name, function, arguments...)) to a hot pool of one
    member in one worker process, each queued behind the one before (those
    past the worker's capacity wait here), await ``before_kill``, kill the
    worker with SIGKILL; each call's result or WorkerLost in ``outcomes``, by
    name."""
    shard = pool._shards[0]

    async def call(name: str, *args: object) -> None:
        try:
            outcomes[name] = await pool.call(*args, timeout=20)
        except WorkerLost as exc:
            outcomes[name] = exc

    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            for sent, (name, *args) in enumerate(calls, 1):
                tg.start_soon(call, str(name), *args)
                if sent <= shard.capacity:
                    await _sent(shard, sent)
            await before_kill()
            _workers()[0].send_signal(signal.SIGKILL)


async def test_a_held_outcome_does_not_wait_for_a_long_call(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome held while the worker has another call to start goes out
    within the hold limit even when that call is long: a call answers while
    the long one queued behind it on the same member still runs."""
    monkeypatch.setattr(ProcessBackend, "queue_ahead_window", 60.0)  # send ahead whatever
    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=1, config=SandboxConfig(hot_restore=True))
        assert await pool.call("add", 1, 1) == 2
        shard = pool._shards[0]  # type: ignore[attr-defined]
        running_then: list[int] = []

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def first() -> None:  # some tens of milliseconds
                    assert await pool.call("spin_for", 4 * 10**8) == 4 * 10**8
                    running_then.append(sup.statistics().running)
                    tg.cancel_scope.cancel()  # the long one is stopped

                async def long() -> None:  # never ends on its own
                    await pool.call("spin")

                tg.start_soon(first)
                await _sent(shard, 1)
                tg.start_soon(long)  # queued in the worker behind the first
                await _sent(shard, 2)
    # The first answered while the long one ran (held until that one ended,
    # its answer would never have come: fail_after ends the test).
    assert running_then == [1]


async def test_a_dead_worker_fails_the_calls_that_ran_and_resends_the_others(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while it held a finished call's outcome: that call ran,
    so it fails with WorkerLost (and does not run again), as does the call
    running at the kill; the calls that waited in the worker run once on its
    replacement. The worker's start marks say which is which: by their order
    alone, the running call would have looked unstarted and run twice."""
    monkeypatch.setenv("HLASYNC_HOLD_LIMIT", "60")  # held until the kill
    monkeypatch.setattr(ProcessBackend, "queue_ahead_window", 60.0)  # send ahead whatever
    recorded: list[int] = []

    def record(value: int) -> int:
        recorded.append(value)
        return value

    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(
            simpleguest,
            size=1,
            config=SandboxConfig(hot_restore=True),
            host_functions={"record": record},
        )
        assert await pool.call("add", 1, 1) == 2

        async def before_kill() -> None:
            with anyio.fail_after(10):
                while recorded != [1]:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)  # its outcome is held, the spin runs
            assert "ran" not in outcomes

        outcomes: dict[str, object] = {}
        # The member is busy with the first while the others queue behind it
        # (the last waits here: the worker has room for 4).
        calls: list[tuple[object, ...]] = [
            ("first", "spin_for", 4 * 10**8),
            ("ran", "call_host", "record", 1),
            ("running", "spin"),
            ("waiting-1", "call_host", "record", 3),
            ("waiting-2", "call_host", "record", 4),
        ]
        await _queue_then_kill(pool, calls, before_kill, outcomes)
    assert outcomes["first"] == 4 * 10**8  # its outcome went out with the host call
    assert isinstance(outcomes["ran"], WorkerLost)
    assert isinstance(outcomes["running"], WorkerLost)
    assert (outcomes["waiting-1"], outcomes["waiting-2"]) == (3, 4)
    assert recorded == [1, 3, 4]


def test_the_hold_limit_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """HLASYNC_HOLD_LIMIT is seconds from 0 to 60; anything else is refused
    when the supervisor is made, naming the variable."""
    for bad in ("-1", "soon", "nan", "61"):
        monkeypatch.setenv("HLASYNC_HOLD_LIMIT", bad)
        with pytest.raises(ValueError, match="HLASYNC_HOLD_LIMIT"):
            Supervisor(processes=1)
    monkeypatch.setenv("HLASYNC_HOLD_LIMIT", "0")
    Supervisor(processes=1)


async def test_an_outcome_is_not_held_for_another_targets_waiting_call(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker holds an outcome only while a call it could start waits: a
    lone call of one pool is answered at once while another pool's call waits
    in the same worker behind a call that never ends (before, every outcome of
    the first pool waited for the hold limit: here 60 s)."""
    monkeypatch.setenv("HLASYNC_HOLD_LIMIT", "60")
    monkeypatch.setattr(ProcessBackend, "queue_ahead_window", 60.0)  # send ahead whatever
    hot = SandboxConfig(hot_restore=True)
    async with Supervisor(processes=1, workers=2) as sup:
        busy = await sup.create_pool(simpleguest, size=1, config=hot)
        lone = await sup.create_pool(simpleguest, size=1, config=hot)
        assert await busy.call("add", 1, 1) == 2
        shard = busy._shards[0]  # type: ignore[attr-defined]

        async def spin() -> None:
            with pytest.raises(GuestTimeout):
                await busy.call("spin", timeout=20)

        async with anyio.create_task_group() as tg:
            tg.start_soon(spin)
            await _sent(shard, 1)
            tg.start_soon(spin)  # waits in the worker behind the first
            await _sent(shard, 2)
            with anyio.fail_after(10):
                for n in range(20):
                    assert await lone.call("add", n, 1) == n + 1
            tg.cancel_scope.cancel()


async def test_a_calls_events_arrive_with_its_outcome_or_not_at_all(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's outcome events travel in one frame with its outcome: a worker
    that dies while it holds a finished call's outcome takes the call's
    CallCompleted with it (before, subscribers were told the call completed
    while its caller got WorkerLost)."""
    monkeypatch.setenv("HLASYNC_HOLD_LIMIT", "60")  # held until the kill
    monkeypatch.setattr(ProcessBackend, "queue_ahead_window", 60.0)  # send ahead whatever
    async with (
        Supervisor(processes=1, workers=1) as sup,
        sup.subscribe(ev.CallCompleted) as events,
    ):
        pool = await sup.create_pool(simpleguest, size=1, config=SandboxConfig(hot_restore=True))
        assert await pool.call("add", 1, 1) == 2
        first = await events.receive()
        calls: list[tuple[object, ...]] = [
            ("first", "spin_for", 4 * 10**8),
            ("ran", "add", 20, 22),
            ("running", "spin"),
        ]
        # The first ends, then "ran"; the spin runs.
        outcomes: dict[str, object] = {}
        await _queue_then_kill(pool, calls, lambda: anyio.sleep(1.0), outcomes)
        assert isinstance(first, ev.CallCompleted)
        completed = [first.function]
        while True:
            with anyio.move_on_after(0.5):
                completed.append((await events.receive()).function)  # type: ignore[attr-defined]
                continue
            break
    # Both ran to their end, their outcomes held behind the spin: lost with the
    # worker, and so were their events (only the first call's came).
    assert isinstance(outcomes["first"], WorkerLost)
    assert isinstance(outcomes["ran"], WorkerLost)
    assert completed == ["add"]


async def test_the_hold_limit_is_read_once_not_at_each_relaunch(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HLASYNC_HOLD_LIMIT is read when the supervisor is made, and every launch
    of its workers gets that value: one made wrong later (for supervisors made
    afterwards) does not crash-loop the replacement of a dead worker."""
    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=1)
        assert await pool.call("add", 1, 2) == 3
        monkeypatch.setenv("HLASYNC_HOLD_LIMIT", "soon")
        _workers()[0].send_signal(signal.SIGKILL)
        with anyio.fail_after(20):
            while True:
                try:
                    assert await pool.call("add", 1, 2) == 3
                    break
                except WorkerLost:
                    await anyio.sleep(0.05)
        assert sup.statistics().workers_lost == 1


@contextlib.asynccontextmanager
async def _one_worker(guest: Path) -> AsyncIterator[tuple[Pool, WorkerHandle, int]]:
    """A supervisor with one worker process and a pool of one that has
    answered a call: the pool, the worker's handle, its channel's descriptor."""
    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(guest, size=1)
        assert await pool.call("add", 1, 2) == 3
        (worker,) = sup._backend._workers  # type: ignore[attr-defined]
        assert worker.sock is not None
        yield pool, worker, worker.sock.fileno()


async def test_a_closed_channel_is_no_longer_watched_by_the_loop(
    kvm: Kvm, simpleguest: Path, anyio_backend: str
) -> None:
    """Closing a worker's channel ends its reader at once and the worker,
    cut off, is replaced as a dead one is (trio: its reader waits in
    wait_readable, woken by notify_closing). asyncio reads a channel with a
    callback the loop keeps on its socket: the close stops that watch at once
    (a closed descriptor left in the selector would be watched again when
    its number comes back)."""
    selector_map: Any = None
    if anyio_backend == "asyncio":
        import asyncio

        selector_map = asyncio.get_running_loop()._selector.get_map()  # type: ignore[attr-defined]
    with anyio.fail_after(60):
        async with _one_worker(simpleguest) as (pool, worker, fd):
            assert selector_map is None or fd in selector_map
            worker.close_channel()
            assert selector_map is None or fd not in selector_map
            assert await pool.call("add", 2, 3) == 5


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_reused_descriptor_keeps_its_new_watch(kvm: Kvm, simpleguest: Path) -> None:
    """A channel closed while its reader watches it: the number comes back at
    once for the application's next socket, and the ending reader must not
    remove that socket's watch (it removes its own once, at the close)."""
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    with anyio.fail_after(60):
        async with _one_worker(simpleguest) as (pool, worker, fd):
            worker.close_channel()
            mine, theirs = socket.socketpair()
            try:
                mine.setblocking(False)
                assert mine.fileno() == fd  # the number came back
                loop.call_later(0.1, theirs.send, b"hello")
                got = None
                with anyio.move_on_after(5):
                    got = await loop.sock_recv(mine, 10)
                assert got == b"hello"
            finally:
                mine.close()
                theirs.close()
            assert await pool.call("add", 2, 3) == 5


async def test_a_shielded_call_is_answered_after_the_scope_around_the_supervisor_ends(
    kvm: Kvm, simpleguest: Path
) -> None:
    """The channel tasks are the supervisor's, shielded from the scopes of the
    code that entered it: a shielded call still gets its outcome when the
    scope around ``async with Supervisor`` is cancelled meanwhile (the readers
    were cancelled with it, and the call waited forever)."""
    got = None
    with anyio.fail_after(60), anyio.CancelScope() as outer:
        async with Supervisor(processes=1, workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1)
            # A deadline of its own: the shield keeps the outer scopes out.
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + 30) as bound:
                outer.cancel()  # the scope around the supervisor, while the call runs
                got = await pool.call("spin_for", 2_000_000_000)
    assert not bound.cancelled_caught, "the shielded call was never answered"
    assert got == 2_000_000_000 and outer.cancel_called


async def test_a_task_started_after_the_tasks_were_stopped_never_runs(
    kvm: Kvm, simpleguest: Path
) -> None:
    """The backend's tasks are shielded and ended by stop_tasks() at
    shutdown; one whose start was scheduled before that and runs after it
    (a relaunch spawned as the supervisor closes) must end too, or the task
    group's exit would wait for it forever."""
    outcome: list[str] = []

    async def late() -> None:
        try:
            await anyio.sleep(10)
            outcome.append("ran")
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise

    with anyio.fail_after(60):
        async with Supervisor(processes=1, workers=1) as sup:
            backend = sup._backend
            assert isinstance(backend, ProcessBackend)
            backend._spawn(late)  # scheduled, not started yet
            backend.stop_tasks()  # as the supervisor's shutdown does
            for _ in range(100):
                if outcome:
                    break
                await anyio.sleep(0.01)
            assert outcome == ["cancelled"]


def _policies(answer: int) -> dict[str, set[str]]:
    """Thread group -> the policies of its threads (see tests.hostfns.thread_policies)."""
    from tests.hostfns import POLICY_BITS, POLICY_GROUPS

    return {
        group: {name for name, bit in POLICY_BITS.items() if (answer >> 3 * index) & bit}
        for index, group in enumerate(POLICY_GROUPS)
    }


@pytest.mark.parametrize("setting", ["", "other", "BATCH"])
async def test_worker_processes_run_under_the_scheduling_policy_set(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """SCHED_BATCH by default (a worker woken by the supervisor's write does
    not take the CPU from the loop that wrote), every thread of the worker
    but the watchdog (its wake-up must not wait); ``HLASYNC_WORKER_SCHED=other``
    keeps the normal policy."""
    monkeypatch.setenv("HLASYNC_WORKER_SCHED", setting)
    expected = "other" if setting == "other" else "batch"
    async with Supervisor(processes=1, workers=2) as sup:
        pool = await sup.create_pool(
            simpleguest,
            size=2,
            config=SandboxConfig(hot_restore=True),
            host_functions={"policies": "tests.hostfns:thread_policies"},
        )
        for _ in range(20):
            assert await pool.call("add", 1, 2) == 3
        answer = await pool.call("call_host", "policies", 0)
        assert isinstance(answer, int)
        policies = _policies(answer)
        assert policies.pop("hlasync-watchdog") == {"other"}
        assert policies == {group: {expected} for group in policies}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the supervisor's own: untouched


def test_a_policy_chosen_for_the_supervisor_is_kept_by_its_workers(
    kvm: Kvm, simpleguest: Path
) -> None:
    """Found by an attacker: a worker made itself SCHED_BATCH whatever it
    inherited; a supervisor put under SCHED_IDLE on purpose had workers
    competing at normal weight."""
    script = f"""
        import os, anyio
        from hlasync.supervisor import Supervisor
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        async def main():
            async with Supervisor(processes=1, workers=1) as sup:
                pool = await sup.create_pool(
                    {str(simpleguest)!r}, size=1,
                    host_functions={{"policies": "tests.hostfns:thread_policies"}},
                )
                print(await pool.call("call_host", "policies", 0))
        anyio.run(main)
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert done.returncode == 0, done.stderr
    policies = _policies(int(done.stdout.strip()))
    assert policies == {group: {"idle"} for group in policies}


def test_a_wrong_worker_policy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HLASYNC_WORKER_SCHED", "fifo")
    with pytest.raises(ValueError, match="HLASYNC_WORKER_SCHED must be batch or other"):
        Supervisor(processes=1)
    Supervisor(processes=0)  # threads: no worker process to schedule
