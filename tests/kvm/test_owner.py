"""One owner per vCPU (hlasync/kvm/owner.py): every KVM_RUN and vCPU ioctl
runs on the vCPU's owner thread, guest memory is unmapped only there, kicks
reach the guest from any thread, and HLASYNC_CHECK_OWNER turns a bypass into
an error."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hlasync import GuestCancelled, Sandbox, SandboxConfig
from hlasync.errors import IoctlError, OwnerBusy
from hlasync.kvm import Kvm, _abi, _libc, owner
from hlasync.kvm.exits import Interrupted
from hlasync.kvm.owner import OwnerViolation


def _thread_cpu(tid: int) -> float:
    """CPU seconds thread ``tid`` of this process has used (user + system)."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_guest_runs_on_the_owner_thread_not_on_the_caller(kvm: Kvm, simpleguest: Path) -> None:
    """A call's guest burns the owner thread's CPU time; the caller only waits."""
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        tid = sb._machine.vcpu.owner._record.tid
        assert tid != threading.get_native_id()
        owner_before, caller_before = _thread_cpu(tid), time.thread_time()
        sb.call("spin_for", 400_000_000)
        owner_used = _thread_cpu(tid) - owner_before
        caller_used = time.thread_time() - caller_before
    assert owner_used > 0.05, owner_used
    assert caller_used < owner_used / 2, (caller_used, owner_used)


def test_a_kick_from_any_thread_stops_the_owners_run(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        threading.Timer(0.2, sb.interrupt).start()
        started = time.monotonic()
        with pytest.raises(GuestCancelled):
            sb.call("spin")  # forever, until stopped
        assert time.monotonic() - started < 5


def test_a_kick_between_runs_stops_the_next_run_at_once(kvm: Kvm, simpleguest: Path) -> None:
    """A kick that finds no KVM_RUN is kept: the next one returns at once
    (without running the guest), then the kick is spent."""
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        vcpu = sb._machine.vcpu
        runs = vcpu.owner.counters["runs"]
        vcpu.kick()
        vcpu.kick()  # still one pending kick
        assert vcpu.owner.kick_pending
        assert isinstance(vcpu.run(), Interrupted)
        assert not vcpu.owner.kick_pending
        assert vcpu.owner.counters["runs"] == runs + 1
        assert vcpu.owner.counters["kicks"] >= 1
        # The guest did not run: the vCPU is where it was, and calls go on.
        assert sb.call("add", 2, 3) == 5


def test_a_drained_kick_does_not_stop_the_next_run(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        vcpu = sb._machine.vcpu
        vcpu.kick()
        vcpu.owner.drain()
        assert not vcpu.owner.kick_pending
        assert sb.call("add", 1, 1) == 2


def test_a_direct_vcpu_ioctl_is_a_violation_when_checked(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HLASYNC_CHECK_OWNER: an ioctl of an owned vCPU that bypasses its owner
    fails loudly (and is counted); through the owner it passes."""
    monkeypatch.setattr(owner, "CHECK", True)
    monkeypatch.setattr(owner, "violations", [])
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        vcpu = sb._machine.vcpu
        regs = _abi.kvm_regs()
        with pytest.raises(OwnerViolation, match="KVM_GET_REGS"):
            from hlasync.kvm.system import ioctl

            ioctl(vcpu.fd, _abi.KVM_GET_REGS, regs)
        assert len(owner.violations) == 1
        assert vcpu.get_regs().rip != 0  # through the owner: fine
        assert sb.call("add", 1, 2) == 3
        assert len(owner.violations) == 1


def test_a_direct_unmap_of_guest_memory_is_a_violation_when_checked(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owner, "CHECK", True)
    monkeypatch.setattr(owner, "violations", [])
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        memory = sb._machine.memory
        assert memory is not None
        with pytest.raises(OwnerViolation, match="munmap of guest memory"):
            _libc.munmap(memory.address + 0x1000, 0x1000)
        with pytest.raises(OwnerViolation, match="fixed mmap of guest memory"):
            _libc.mmap(
                memory.address,
                0x1000,
                _libc.PROT_READ,
                _libc.MAP_PRIVATE | _libc.MAP_FIXED | _libc.MAP_ANONYMOUS,
                -1,
            )
        with pytest.raises(OwnerViolation, match=r"MADV_DONTNEED.* of guest memory"):
            _libc.madvise(memory.address, 0x1000, _libc.MADV_DONTNEED)
        assert sb.call("add", 1, 2) == 3  # nothing was unmapped
    # close() unmapped it on the owner: no violation, and the range is forgotten.
    assert len(owner.violations) == 3


def test_a_second_poster_gets_ownerbusy_after_the_deadline(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every wait has a bound: while the owner runs a guest that does not
    stop, another request waits POST_WAIT seconds, then gets OwnerBusy."""
    monkeypatch.setattr(owner, "POST_WAIT", 0.2)
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        vcpu = sb._machine.vcpu
        errors: list[BaseException] = []
        caller = threading.Thread(target=lambda: _call_catching(sb, errors))
        caller.start()
        deadline = time.monotonic() + 5
        while not vcpu.owner.in_run and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(OwnerBusy, match=r"more than 0\.2 s"):
            vcpu.owner.ioctl(vcpu.fd, _abi.KVM_GET_REGS, _abi.kvm_regs())
        assert time.monotonic() - started < 2
        sb.interrupt()
        caller.join(5)
        assert not caller.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], GuestCancelled)


def _call_catching(sb: Sandbox, errors: list[BaseException]) -> None:
    try:
        sb.call("spin")
    except BaseException as exc:  # noqa: BLE001 - the test looks at it
        errors.append(exc)


def test_the_owner_thread_ends_with_its_sandbox(kvm: Kvm, simpleguest: Path) -> None:
    sb = Sandbox(simpleguest, SandboxConfig(spin=0))
    thread = sb._machine.vcpu.owner.thread
    assert thread.is_alive()
    sb.call("add", 1, 2)
    sb.close()
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(OwnerBusy, match="ended"):
        sb._machine.vcpu.owner.call(1)


def test_an_ioctl_error_names_the_request(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
        vcpu = sb._machine.vcpu
        with pytest.raises(IoctlError) as info:
            vcpu.owner.ioctl(vcpu.fd, 0xAEFF, 0)  # no such vCPU ioctl
        assert info.value.errno in (errno.ENOTTY, errno.EINVAL)


def test_idle_owners_take_no_cpu(kvm: Kvm, simpleguest: Path) -> None:
    """An idle owner sleeps on a futex (no polling)."""
    sandboxes = [Sandbox(simpleguest, SandboxConfig(spin=0)) for _ in range(20)]
    try:
        for sb in sandboxes:
            sb.call("add", 1, 2)
        time.sleep(0.05)  # past every owner's short spin
        tids = [sb._machine.vcpu.owner._record.tid for sb in sandboxes]
        before = sum(_thread_cpu(tid) for tid in tids)
        time.sleep(1.0)
        used = sum(_thread_cpu(tid) for tid in tids) - before
    finally:
        for sb in sandboxes:
            sb.close()
    assert used < 0.05, used


def test_the_sandbox_path_has_no_violation_with_the_check_on(
    kvm: Kvm, simpleguest: Path, tmp_path: Path
) -> None:
    """With HLASYNC_CHECK_OWNER=1 in the environment, the whole sandbox path
    (boot, calls, an idle trim, dumps, restore, close) runs without a violation."""
    script = textwrap.dedent(
        f"""
        import sys
        from hlasync import Sandbox, SandboxConfig, GuestCrashed
        from hlasync.kvm import owner
        assert owner.CHECK
        import time
        from hlasync.sandbox import trim
        config = SandboxConfig(spin=0, crashdump_dir={str(tmp_path)!r}, idle_trim=0.05)
        with Sandbox({str(simpleguest)!r}, config) as sb:
            assert sb.call("add", 1, 2) == 3
            deadline = time.monotonic() + 10
            while trim.pending() and time.monotonic() < deadline:  # an idle trim
                time.sleep(0.01)
            assert not trim.pending()
            snap = sb.snapshot()
            try:
                sb.call("divide_by_zero")
            except GuestCrashed:
                pass
            sb.generate_crashdump()
            sb.restore(snap)
            assert sb.call("add", 2, 2) == 4
        print("violations", len(owner.violations))
        """
    )
    env = dict(os.environ, HLASYNC_CHECK_OWNER="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "violations 0" in result.stdout


def test_a_forked_child_releases_the_parents_sandbox_without_an_owner(
    kvm: Kvm, simpleguest: Path
) -> None:
    """The owner thread stays in the parent: a forked child closes its copies
    itself, and the parent's sandbox goes on."""
    sb = Sandbox(simpleguest, SandboxConfig(spin=0))
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                from hlasync.errors import SandboxClosed

                try:
                    sb.call("add", 1, 2)
                    code = 3
                except SandboxClosed:
                    pass
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sb.call("add", 1, 2) == 3
    finally:
        sb.close()


def test_every_spin_slot_is_given_back(kvm: Kvm, simpleguest: Path) -> None:
    """Waiters and owners spin only with one of the process's few spin slots:
    once sandboxes are idle or closed, none is held (a leaked slot made every
    later call wait on futexes instead: 2.5x slower)."""
    from hlasync.kvm.helper import library

    lib = library()
    for _ in range(20):
        with Sandbox(simpleguest, SandboxConfig(spin=0)) as sb:
            for _ in range(20):
                sb.call("add", 1, 2)
    idle = Sandbox(simpleguest, SandboxConfig(spin=0))
    try:
        idle.call("add", 1, 2)
        time.sleep(0.05)  # past the owner's spin for a next request
        assert lib.hl_owner_spinners() == 0
    finally:
        idle.close()
    assert lib.hl_owner_spinners() == 0


def test_a_keyboardinterrupt_during_a_run_leaves_no_guest_running(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A signal handler that raises while the caller waits for the owner's
    KVM_RUN (here in the very first wait, which is in C) stops the guest
    before the exception goes on: nothing keeps running on the owner, and the
    sandbox is usable after restore()."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    sb = Sandbox(simpleguest, SandboxConfig(spin=0))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.03)
        with pytest.raises(KeyboardInterrupt):
            sb.call("spin")  # forever
        owner_ = sb._machine.vcpu.owner
        assert not owner_.in_run
        tid = owner_._record.tid
        before = _thread_cpu(tid)
        time.sleep(0.3)
        assert _thread_cpu(tid) - before < 0.05  # no guest burning the owner's CPU
        sb.restore()
        assert sb.call("add", 2, 2) == 4
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sb.close()


def test_a_hot_guests_long_run_holds_no_spin_slot(kvm: Kvm, simpleguest: Path) -> None:
    """While a hot sandbox's guest spins on the doorbell (a long KVM_RUN of
    its owner), no spin slot is held for it: other callers may still spin."""
    from hlasync.kvm.helper import library

    lib = library()
    with Sandbox(simpleguest, SandboxConfig(spin=0.5)) as sb:
        for _ in range(5):
            sb.call("add", 1, 2)
        owner_ = sb._machine.vcpu.owner
        deadline = time.monotonic() + 2
        while not owner_.in_run and time.monotonic() < deadline:
            time.sleep(0.001)
        assert owner_.in_run  # the guest spins in the owner's KVM_RUN
        time.sleep(0.01)
        assert lib.hl_owner_spinners() == 0


def test_a_helper_library_that_cannot_be_rebuilt_is_used_stale_with_a_warning() -> None:
    """As for the bundled guests: a changed native source that fails to build
    no longer runs the old library without a word (an attacker's mutant of
    hl_owner.c went unnoticed that way)."""
    from hlasync import _build

    if "libhlwait" not in _build.bundled_builds():
        pytest.skip("not a source checkout: the helper library is never rebuilt")
    script = """
        import warnings
        from hlasync import _build
        from hlasync.kvm import helper

        def fail(*args, **kwargs):
            raise _build.GuestBuildError("no compiler today")

        _build.build_bundled = fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            helper.library().hl_owner_spinners()
        print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert done.returncode == 0, done.stderr
    assert "rebuilding the helper library failed, using the stale" in done.stdout
    assert "no compiler today" in done.stdout
