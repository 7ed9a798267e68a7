"""The supervisor on a bad day, under asyncio and trio: dump directories that
fight back, many hung guests at once, sandboxes that cannot be restored,
operations that never finish, host functions that never return, guests that
print without end. Nothing may wedge it, kill one of its threads or grow
without bound."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import psutil
import pytest

from hlasync import (
    CoreDump,
    GuestCancelled,
    GuestCrashed,
    GuestImageError,
    GuestTimeout,
    RetentionPolicy,
    Sandbox,
    SandboxConfig,
    SupervisorClosed,
)
from hlasync import events as ev
from hlasync._build import build_guest
from hlasync.kvm import Kvm
from hlasync.sandbox import CrashdumpRecord, live_sandboxes
from hlasync.supervisor import STOP_TIMEOUT, Supervisor
from tests.conftest import settled_fds, threads_only

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("supervisor_mode")]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def hang_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hostile guest with an entry point that never reaches the dispatcher."""
    source = Path(__file__).parent / "guests" / "hostile.c"
    target = tmp_path_factory.mktemp("hang") / "hang_at_entry.elf"
    return build_guest([source], target, extra_flags=["-Wl,--entry=hang_at_entry"])


def _members(pool_ids: list[str]) -> list[Sandbox]:
    return [sb for sb in live_sandboxes() if sb.id in pool_ids]


@pytest.fixture
def trapped_dump_dir(dump_dir: Path) -> Path:
    """A dump directory holding a symlink loop with a dump's name (anyone may plant
    one where dumps fall back to the world-writable temp directory)."""
    (dump_dir / "hl_core_trap.elf").symlink_to("hl_core_trap.elf")
    return dump_dir


def test_a_dump_directory_trap_never_replaces_the_guest_error(
    kvm: Kvm, simpleguest: Path, trapped_dump_dir: Path
) -> None:
    config = SandboxConfig(crashdump_retention=RetentionPolicy(max_files=1))
    with Sandbox(simpleguest, config) as sb:
        with pytest.raises(GuestCrashed) as info:
            sb.call("divide_by_zero")
        assert info.value.core_path is not None or info.value.crashdump_error is not None
    assert (trapped_dump_dir / "hl_core_trap.elf").is_symlink()  # not ours: left alone


async def test_the_watchdog_survives_a_dump_directory_trap(
    kvm: Kvm, simpleguest: Path, trapped_dump_dir: Path
) -> None:
    """A timeout while the guest waits in a host function, with a hostile dump
    directory: the caller gets GuestTimeout, and later timeouts are still enforced."""
    release = threading.Event()

    def nap(x: int) -> int:
        release.wait(5)
        return x

    config = SandboxConfig(crashdump_retention=RetentionPolicy(max_files=1))
    try:
        async with Supervisor(workers=2) as sup:
            pool = await sup.create_pool(
                simpleguest, size=2, config=config, host_functions={"nap": nap}
            )
            with anyio.fail_after(10):
                with pytest.raises(GuestTimeout):
                    await pool.call("call_host", "nap", 1, timeout=0.2)
                release.set()
                for _ in range(3):
                    with pytest.raises(GuestTimeout) as info:
                        await pool.call("spin", timeout=0.2)
                    assert info.value.core_path is not None
            if sup.processes == 0:
                assert "hlasync-watchdog" in {t.name for t in threading.enumerate()}
    finally:
        release.set()


@threads_only
async def test_simultaneous_timeouts_are_enforced_concurrently(kvm: Kvm, simpleguest: Path) -> None:
    """Four calls time out together: their dumps must be written side by side, not
    one after the other by the watchdog. Each dump's listener waits at a barrier
    for the other three: dumps written one at a time never get there."""
    barrier = threading.Barrier(4, timeout=15)
    broken: list[str] = []

    def listener(record: CrashdumpRecord) -> None:
        if record.reason == "timeout":
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                broken.append(record.sandbox_id)

    errors: list[BaseException] = []

    async with Supervisor(workers=4) as sup:
        pool = await sup.create_pool(simpleguest, size=4)
        for sandbox in _members(pool.sandbox_ids):
            sandbox.add_crashdump_listener(listener)

        async def hang() -> None:
            try:
                await pool.call("spin", timeout=0.3)
            except GuestTimeout as exc:
                errors.append(exc)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(hang)
    assert not broken, f"dumps were written one after the other ({len(broken)} waited in vain)"
    assert len(errors) == 4 and all(e.core_path is not None for e in errors)  # type: ignore[attr-defined]


@threads_only
async def test_a_sandbox_that_cannot_be_restored_leaves_its_pool(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A host function closes the sandbox running it: its restore fails, so the pool
    must replace it (not keep waiting for it) and say what happened."""
    pool_ids: list[str] = []

    def close_my_sandbox(x: int) -> int:
        for sandbox in _members(pool_ids):
            if sandbox.current_call is not None:
                sandbox.close()
        return x

    async with (
        Supervisor(workers=1) as sup,
        sup.subscribe(ev.SupervisorError, ev.SandboxCreated) as events,
    ):
        pool = await sup.create_pool(
            simpleguest, size=1, host_functions={"close_me": close_my_sandbox}
        )
        pool_ids.extend(pool.sandbox_ids)
        first = pool.sandbox_ids[0]
        with pytest.raises(GuestCancelled):
            await pool.call("call_host", "close_me", 1)
        with anyio.fail_after(10):
            assert await pool.call("add", 1, 2) == 3
            assert len(pool.sandbox_ids) == 1 and pool.sandbox_ids != [first]
            seen: list[type[ev.Event]] = []
            while ev.SupervisorError not in seen or seen.count(ev.SandboxCreated) < 2:
                seen.append(type(await events.receive()))
            await pool.aclose()


async def test_creation_that_never_finishes_is_bounded(
    kvm: Kvm, simpleguest: Path, hang_guest: Path
) -> None:
    async with Supervisor() as sup:
        with anyio.fail_after(20):
            with pytest.raises(GuestImageError, match="init_timeout"):
                await sup.create_pool(hang_guest, size=2, config=SandboxConfig(init_timeout=0.3))
            pool = await sup.create_pool(simpleguest, size=1)
            assert await pool.call("add", 1, 2) == 3


async def test_operations_do_not_wait_behind_each_other_and_can_be_cancelled(
    kvm: Kvm, simpleguest: Path, hang_guest: Path
) -> None:
    async with Supervisor() as sup:
        dedicated = await sup.create_sandbox(simpleguest)
        async with anyio.create_task_group() as tg:
            slow_config = SandboxConfig(init_timeout=3.0)

            async def slow_creation() -> None:
                with pytest.raises(GuestImageError):
                    await sup.create_pool(hang_guest, size=1, config=slow_config)

            tg.start_soon(slow_creation)
            await anyio.sleep(0.1)
            with anyio.fail_after(2.5):  # not behind the creation, which takes 3 s
                path = await dedicated.generate_crashdump()
            assert path.exists()
            with anyio.move_on_after(0.01) as scope:  # a cancelled caller stops waiting
                await sup.create_pool(hang_guest, size=1, config=slow_config)
            assert scope.cancelled_caught
        # The abandoned creation goes on in its thread until its guest times out.
        with anyio.fail_after(20):
            while any(t.name.startswith("hlasync-op-") for t in threading.enumerate()):
                await anyio.sleep(0.01)


async def test_closing_after_shutdown_returns(kvm: Kvm, simpleguest: Path) -> None:
    sup = Supervisor()
    async with sup:
        pool = await sup.create_pool(simpleguest, size=1)
        dedicated = await sup.create_sandbox(simpleguest)
    with anyio.fail_after(5):
        await sup.close_sandbox(dedicated)
        await pool.aclose()


async def test_shutdown_is_bounded_when_a_sync_host_function_is_stuck(
    kvm: Kvm, simpleguest: Path
) -> None:
    process = psutil.Process()
    fds = settled_fds(simpleguest)
    entered, release = threading.Event(), threading.Event()
    returned = threading.Event()

    def stuck(x: int) -> int:
        entered.set()
        release.wait(60)
        returned.set()
        return x

    outcomes: list[BaseException] = []
    try:
        async with anyio.create_task_group() as tg:
            async with Supervisor(workers=1, shutdown_grace=0.2) as sup:
                pool = await sup.create_pool(simpleguest, size=1, host_functions={"stuck": stuck})

                async def call() -> None:
                    try:
                        await pool.call("call_host", "stuck", 1)
                    except (SupervisorClosed, GuestCancelled) as exc:
                        outcomes.append(exc)

                tg.start_soon(call)
                while not entered.is_set():
                    await anyio.sleep(0.005)
            # aclose() has returned: bounded, while the host function still blocks.
            assert not returned.is_set(), "aclose() waited for the stuck host function"
        # A vCPU thread of this process cannot leave the host function: SupervisorClosed.
        # A worker process's guest waits for the answer and is stopped: GuestCancelled.
        expected = GuestCancelled if sup.processes else SupervisorClosed
        assert len(outcomes) == 1 and isinstance(outcomes[0], expected)
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while process.num_fds() > fds and time.monotonic() < deadline:
        await anyio.sleep(0.01)
    assert process.num_fds() <= fds  # the VM went once the host function returned
    assert STOP_TIMEOUT < 10


async def test_guest_output_events_are_bounded(kvm: Kvm, simpleguest: Path) -> None:
    text = "x" * (200 * 1024) + "\n"
    async with Supervisor() as sup:
        pool = await sup.create_pool(simpleguest, size=1, output=lambda t: None)
        async with sup.subscribe(ev.GuestOutput, max_bytes=1 << 20) as unread:
            async with sup.subscribe(ev.GuestOutput) as events:
                for _ in range(20):
                    await pool.call("print_message", text)
                first = await events.receive()
            assert isinstance(first, ev.GuestOutput)
            assert len(first.text) <= ev.GUEST_OUTPUT_LIMIT < len(text)
            assert first.truncated == len(text.encode()) - len(first.text.encode())
            stats = unread.statistics()
            assert stats.buffered_bytes <= 1 << 20
            assert stats.dropped > 0


@threads_only
async def test_a_timeout_in_an_async_host_function_is_dumped_however_slow_the_stop(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog cancelled the async host function first and asked for the
    dump second: when the guest's call ended in between (the cancelled
    function returned at once), the caller got GuestTimeout with neither
    core_path nor crashdump_error (1-3 in 20 timeouts, threads and processes).
    Here the stop is slowed down, which made it happen every time."""
    stop = Sandbox._stop

    def slow_stop(self: Sandbox, *args: object, **kwargs: object) -> object:
        time.sleep(0.2)  # the loop runs the host function's cancellation meanwhile
        return stop(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Sandbox, "_stop", slow_stop)

    async def fetch(x: int) -> int:
        await anyio.sleep(10)
        return x

    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(simpleguest, size=1, host_functions={"fetch": fetch})
        with anyio.fail_after(20), pytest.raises(GuestTimeout) as info:
            await pool.call("call_host", "fetch", 1, timeout=0.2)
        assert info.value.core_path is not None, info.value.crashdump_error
        with CoreDump.open(info.value.core_path) as dump:
            assert dump.metadata["reason"] == "timeout"
        assert await pool.call("add", 1, 2) == 3
