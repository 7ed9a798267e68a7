"""Restores without a VM exit (``SandboxConfig(hot_restore=True)``): after each
call the guest parks in ``hl_park``, which resets what registers hold, and
``restore()`` of the hot sandbox puts memory back around the running guest.
Everything a restore promises still holds (the secret scan of every class of
state this host lets a call set), and whatever cannot be done in place takes
the exit path."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import anyio
import pytest

from hlasync import (
    CoreDump,
    GuestCancelled,
    GuestTimeout,
    HostFunctionError,
    Sandbox,
    SandboxConfig,
    SandboxState,
    abi,
)
from hlasync.kvm import Kvm
from hlasync.sandbox import machine as machine_module
from tests.sandbox.hot_helpers import make_hot, wait_until
from tests.sandbox.test_fresh_state import CLASSES

HOT_RESTORE = SandboxConfig(spin=0.2, hot_restore=True)


class InPlace:
    """Counts the restores done in the park (a spy on the real reset)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = machine_module.Machine.reset_parked

        def reset_parked(machine: machine_module.Machine, answer_ticks: int) -> bool:
            done = real(machine, answer_ticks)
            self.count += done
            return done

        monkeypatch.setattr(machine_module.Machine, "reset_parked", reset_parked)


def runs(sb: Sandbox) -> int:
    return sb._machine.vcpu.owner.counters["runs"]


def test_hot_restore_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="hot_restore must be a bool"):
        SandboxConfig(hot_restore=1)  # type: ignore[arg-type]
    monkeypatch.delenv("HLASYNC_HOT_RESTORE", raising=False)
    assert SandboxConfig().hot_restore is False
    monkeypatch.setenv("HLASYNC_HOT_RESTORE", "1")
    assert SandboxConfig().hot_restore is True
    monkeypatch.setenv("HLASYNC_HOT_RESTORE", "yes")
    with pytest.raises(ValueError, match="HLASYNC_HOT_RESTORE must be 0 or 1"):
        SandboxConfig()


def test_calls_and_restores_make_no_exit(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = InPlace(monkeypatch)
    with Sandbox(simpleguest, HOT_RESTORE) as sb:
        make_hot(sb)
        sb.restore()
        before = runs(sb)
        for n in range(300):
            assert sb.call("add", n, 1) == n + 1
            sb.restore()
        # One KVM_RUN on the hot thread served the calls and restores (a guest
        # whose thread lost the CPU for long as it parked may cost an exit).
        assert spy.count >= 290
        assert runs(sb) - before <= 10
        assert sb._holder is sb._hot


def test_memory_is_put_back_in_place(kvm: Kvm, hostile_guest: Path) -> None:
    with Sandbox(hostile_guest, HOT_RESTORE, output=lambda text: None) as sb:
        heap = sb.layout.heap_addr
        before = sb.read_memory(heap, 4096)
        make_hot(sb, "cpuid_leaf", 0)
        in_place = runs(sb)
        for offset in range(0, 4096, 512):
            sb.call("poke", heap + offset, 0x5A5A_5A5A)
            assert sb.read_memory(heap, 4096) != before
        sb.restore()
        assert sb.read_memory(heap, 4096) == before
        assert runs(sb) - in_place <= 1


@pytest.mark.parametrize("name", [name for name in CLASSES])
def test_no_secret_survives_a_restore_in_place(
    kvm: Kvm, hostile_guest: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bit = CLASSES[name]
    key = random.Random(21).getrandbits(63)
    spy = InPlace(monkeypatch)
    with Sandbox(hostile_guest, HOT_RESTORE, output=lambda text: None) as sb:
        try:
            seen = sb.call("plant_and_scan", key, bit)
        except Exception as exc:  # noqa: BLE001 - not settable here (no AVX-512, ...)
            pytest.skip(f"{name} cannot be set by guest code on this host: {exc}")
        assert seen == bit
        sb.restore()
        for _ in range(5):
            make_hot(sb, "cpuid_leaf", 0)
            sb.restore()
            counted = spy.count
            if bit == CLASSES["memory"]:  # all of it is too many pages to copy in place
                sb.call("plant_some_memory", key)
            else:
                sb.call("plant_secrets", key, bit)
            sb.restore()
            assert spy.count == counted + 1, "the restore was not done in place"
            assert sb.call("scan_secrets", key, bit) == 0, f"{name} survived"
            sb.restore()


def test_the_parked_guest_holds_nothing_of_the_call(kvm: Kvm, simpleguest: Path) -> None:
    """A dump of the parked guest: it waits in hl_park with zeroed registers but
    the park's token and the doorbell's address, and with clean x87/SSE."""
    with Sandbox(simpleguest, HOT_RESTORE) as sb:
        make_hot(sb)
        secret = 0x5EC2E7_5EC2E7
        assert sb.call("add", secret, 1) == secret + 1
        sb.restore()
        wait_until(lambda: sb._machine.bell[abi.WORD_PARKED] == sb._park_token)
        path = sb.generate_crashdump()
        try:
            with CoreDump.open(path) as dump:
                regs = dump.registers
                park = sb.image.symbol("hl_park")
                assert park is not None
                assert park.address <= regs["rip"] < park.address + park.size
                assert regs["r8"] == sb._park_token and regs["r9"] == abi.DOORBELL_ADDR
                for name in ("rbx", "rcx", "rsi", "rdi", "rbp", "r12", "r13", "r14", "r15"):
                    assert regs[name] == 0, name
                assert regs["eflags"] & 0x40400 == 0  # DF and AC clear
                assert regs["fs_base"] == 0 and regs["gs_base"] == 0
        finally:
            path.unlink()


def test_a_cold_sandbox_restores_on_the_exit_path(kvm: Kvm, simpleguest: Path) -> None:
    """The spin ran out: the guest left KVM_RUN from its park; calls and
    restores go on (the next call lets it out of the park)."""
    with Sandbox(simpleguest, SandboxConfig(spin=0.0003, hot_restore=True)) as sb:
        for n in range(20):
            assert sb.call("add", n, 2) == n + 2
            time.sleep(0.005)  # longer than the spin
            assert sb.call("add", n, 3) == n + 3
            sb.restore()
            time.sleep(0.005)
        assert sb.state is SandboxState.READY


def test_snapshots_of_a_parked_guest_restore_and_run(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, HOT_RESTORE) as sb:
        make_hot(sb)
        snap = sb.snapshot()  # parks the hot guest: the vCPU stops in hl_park
        for n in range(5):
            assert sb.call("add", n, 4) == n + 4
            sb.restore(snap)
            assert sb.call("add", n, 5) == n + 5
            sb.restore()


def test_what_cannot_be_done_in_place_takes_the_exit_path(
    kvm: Kvm, hostile_guest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = InPlace(monkeypatch)
    with Sandbox(hostile_guest, HOT_RESTORE, output=lambda text: None) as sb:
        # A failed host call: restored on the exit path.
        make_hot(sb, "cpuid_leaf", 0)
        sb.register_host_function("fail", lambda x: 1 // 0)
        with pytest.raises(HostFunctionError):
            sb.call("host_then_spin", "fail", 1)
        sb.restore()
        # Many pages written: copied back on the exit path.
        make_hot(sb, "cpuid_leaf", 0)
        counted = spy.count
        sb.call("fill_heap", 4 * 1024 * 1024)
        sb.restore()
        assert spy.count == counted
        assert sb.call("cpuid_leaf", 0) != 0
        sb.restore()


def test_interrupting_a_hot_call_of_a_parking_guest(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, HOT_RESTORE) as sb:
        make_hot(sb)
        outcome: list[BaseException | object] = []
        thread = threading.Thread(
            target=lambda: outcome.append(_call_or_error(sb, "spin_for", 10**12))
        )
        thread.start()
        wait_until(lambda: sb.current_call is not None)
        time.sleep(0.05)
        assert sb.interrupt()
        thread.join(10)
        assert isinstance(outcome[0], GuestCancelled)
        sb.restore()
        assert sb.call("add", 1, 2) == 3


def _call_or_error(sb: Sandbox, name: str, *args: int) -> object:
    try:
        return sb.call(name, *args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        return exc


# ----------------------------------------------------------- forged parks
FORGE = Path(__file__).resolve().parents[1] / "guests" / "forge_park.c"


@pytest.fixture(scope="module")
def forge_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/forge_park.c: functions that say they parked without parking."""
    from hlasync._build import build_guest

    return build_guest([FORGE], tmp_path_factory.mktemp("guests") / "forge_park.elf")


@pytest.mark.parametrize("attempt", range(3))
def test_a_write_after_its_page_was_put_back_is_undone_next_time(
    kvm: Kvm, forge_guest: Path, attempt: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that only says it parked writes 64 pages again as soon as the
    in-place copy has put each back (a review found the write lost from the
    dirty log for good: copied, then protected). Now they are protected
    first: the write faults, is logged, and the next restore undoes it."""
    spy = InPlace(monkeypatch)
    secret = 0x5EC2E7
    with Sandbox(forge_guest, HOT_RESTORE) as sb:
        for _ in range(20):
            make_hot(sb)
            sb.restore()
            make_hot(sb)
            sb.call("plant_racing_many", secret, 400)
            counted = spy.count
            sb.restore()
            if spy.count > counted:
                break  # done in place (else the budget parked it: try again)
        else:
            pytest.skip("no restore was done in place")
        time.sleep(0.5)  # cold: the next restores take the exit path
        assert sb._holder is None
        sb.restore()
        assert sb.call("count_victims", secret) == 0


def test_a_forged_park_carries_memory_into_one_call_at_most(kvm: Kvm, forge_guest: Path) -> None:
    """What docs/security.md says a guest that subverts its park can do: a
    write made after the host's copy reaches the next call, and the restore
    after that call undoes it."""
    with Sandbox(forge_guest, HOT_RESTORE) as sb:
        make_hot(sb)
        sb.restore()
        make_hot(sb)
        sb.call("plant_after_go", 0xABCD)
        sb.restore()
        sb.call("read_victim", 1)  # may see it
        sb.restore()
        assert sb.call("read_victim", 1) == 0


@pytest.mark.anyio
async def test_a_pool_call_does_not_wait_for_a_restore_on_the_exit_path(
    kvm: Kvm, forge_guest: Path
) -> None:
    """A member whose guest never parks is restored on the exit path (a kick
    after 50 ms): the call that comes meanwhile goes to the free member, on
    the idle worker (a review found it waiting for the slow restore). A round
    whose `answer_and_spin` ran on the exit path (the member was not hot: it
    then never answers and times out) shows nothing and is not counted."""
    from hlasync.events import CallStarted
    from hlasync.supervisor import Supervisor

    counted = 0
    async with Supervisor(workers=2, processes=0) as sup:
        pool = await sup.create_pool(forge_guest, size=2, config=HOT_RESTORE)
        async with sup.subscribe(CallStarted) as events:
            for _ in range(5):
                for _ in range(20):
                    await pool.call("add", 1, 2)
                try:
                    await pool.call("answer_and_spin", timeout=2.0)
                except GuestTimeout:
                    hot = False
                else:
                    hot = True
                assert await pool.call("add", 1, 2) == 3
                started = [events.receive_nowait() for _ in range(22)]
                stuck, after = started[20:]
                assert isinstance(stuck, CallStarted) and isinstance(after, CallStarted)
                assert (stuck.function, after.function) == ("answer_and_spin", "add")
                if hot:
                    counted += 1
                    assert after.sandbox_id != stuck.sandbox_id
                await anyio.sleep(0.2)  # the stuck member is back meanwhile
                while True:  # events of the restore's aftermath, if any
                    try:
                        events.receive_nowait()
                    except anyio.WouldBlock:
                        break
    if not counted:
        pytest.skip("no member was hot when answer_and_spin ran")
