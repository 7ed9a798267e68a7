"""Where dumps go, their names, atomicity, permissions, sparseness, retention."""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from hlasync import (
    CoreDump,
    CrashdumpError,
    CrashdumpRecord,
    GuestCrashed,
    GuestProtocolError,
    RetentionPolicy,
    Sandbox,
    SandboxConfig,
)
from hlasync.kvm import Kvm

NAME = re.compile(r"^hl_core_\d{8}_T\d{6}\.\d{3}_\d+-\d+-[0-9a-f]{4}\.elf$")


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The "system temp directory" for this test."""
    directory = tmp_path / "system-temp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_directory_precedence(
    kvm: Kvm, simpleguest: Path, tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_dir, config_dir, explicit = tmp_path / "env", tmp_path / "config", tmp_path / "explicit"
    for directory in (env_dir, config_dir, explicit):
        directory.mkdir()
    monkeypatch.setenv("HYPERLIGHT_CORE_DUMP_DIR", str(env_dir))
    with Sandbox(simpleguest, SandboxConfig(crashdump_dir=str(config_dir))) as sb:
        assert sb.generate_crashdump(explicit).parent == explicit
        assert sb.generate_crashdump().parent == config_dir
    with Sandbox(simpleguest) as sb:
        assert sb.generate_crashdump().parent == env_dir
        monkeypatch.delenv("HYPERLIGHT_CORE_DUMP_DIR")
        assert sb.generate_crashdump().parent == temp_dir


def test_missing_directory_warns_and_falls_back_to_temp(
    kvm: Kvm, simpleguest: Path, tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPERLIGHT_CORE_DUMP_DIR", str(tmp_path / "does-not-exist"))
    with Sandbox(simpleguest) as sb:
        with pytest.warns(RuntimeWarning, match="does not exist"):
            path = sb.generate_crashdump()
        assert path.parent == temp_dir
        with pytest.warns(RuntimeWarning, match="the directory argument"):
            assert sb.generate_crashdump(tmp_path / "nope").parent == temp_dir


def test_name_mode_and_no_temporary_left(kvm: Kvm, simpleguest: Path, dump_dir: Path) -> None:
    with Sandbox(simpleguest) as sb:
        path = sb.generate_crashdump()
    assert NAME.match(path.name), path.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(dump_dir) == [path.name]


def test_dump_is_sparse(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(memory_size=8 << 20)) as sb:
        sb.call("echo_bytes", bytes(1000))
        path = sb.generate_crashdump()
    st = path.stat()
    assert st.st_size > 7 << 20  # the whole 8 MiB of guest memory is addressable
    assert st.st_blocks * 512 <= 1 << 20  # but untouched memory takes no disk space


def test_path_is_printed_and_logged(
    kvm: Kvm,
    simpleguest: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        Sandbox(simpleguest) as sb,
        caplog.at_level(logging.ERROR, "hlasync.crashdump"),
        pytest.raises(GuestCrashed) as info,
    ):
        sb.call("divide_by_zero")
    path = info.value.core_path
    assert path is not None
    assert f"Core dump created: {path}" in capsys.readouterr().err
    assert any(r.levelno == logging.ERROR and str(path) in r.getMessage() for r in caplog.records)


def test_disabled_sandbox_writes_nothing(kvm: Kvm, simpleguest: Path, dump_dir: Path) -> None:
    with Sandbox(simpleguest, SandboxConfig(crashdump_enabled=False)) as sb:
        with pytest.raises(GuestCrashed) as info:
            sb.call("null_pointer_write")
        assert info.value.core_path is None
        with pytest.raises(CrashdumpError, match="disabled"):
            sb.generate_crashdump()
    assert os.listdir(dump_dir) == []


def test_automatic_dump_for_protocol_errors(kvm: Kvm, hostile_guest: Path) -> None:
    with Sandbox(hostile_guest) as sb:
        for function in ("bad_result_frame", "bad_host_call"):
            with pytest.raises(GuestProtocolError) as info:
                sb.call(function)
            assert info.value.core_path is not None
            with CoreDump.open(info.value.core_path) as dump:
                assert dump.metadata["reason"] == "protocol-error"
                assert dump.metadata["function"] == function
            sb.restore()


def test_unwritable_directory_is_an_error_with_no_stray_file(
    kvm: Kvm, simpleguest: Path, tmp_path: Path
) -> None:
    unwritable = Path("/proc/self")  # a directory nobody, not even root, can create files in
    with Sandbox(simpleguest) as sb:
        with pytest.raises(CrashdumpError, match="cannot create a core dump"):
            sb.generate_crashdump(unwritable)
        with Sandbox(simpleguest, SandboxConfig(crashdump_dir=str(unwritable))) as other:
            with pytest.raises(GuestCrashed) as info:
                other.call("divide_by_zero")
            assert info.value.core_path is None
            assert isinstance(info.value.crashdump_error, CrashdumpError)
    assert not any(p.name.startswith(("hl_core_", ".hl_core_")) for p in unwritable.iterdir())


def test_full_disk_is_an_error_with_no_stray_file(
    kvm: Kvm, simpleguest: Path, dump_dir: Path
) -> None:
    with Sandbox(simpleguest) as sb:
        sb.call("echo_bytes", os.urandom(200_000))  # some memory that must be written
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            with pytest.raises(CrashdumpError, match="failed"):
                sb.generate_crashdump()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
    assert os.listdir(dump_dir) == []


def test_two_hundred_concurrent_dumps(kvm: Kvm, simpleguest: Path, dump_dir: Path) -> None:
    sandboxes = [Sandbox(simpleguest) for _ in range(4)]
    paths: list[Path] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(50)

    def dump_four(sb: Sandbox) -> None:
        barrier.wait()
        for _ in range(4):
            try:
                path = sb.generate_crashdump()
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    paths.append(path)

    threads = [threading.Thread(target=dump_four, args=(sandboxes[i % 4],)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sb in sandboxes:
        sb.close()
    assert errors == []
    assert len(paths) == 200 and len(set(paths)) == 200
    assert sorted(os.listdir(dump_dir)) == sorted(p.name for p in paths)
    for path in paths:
        with CoreDump.open(path) as dump:  # complete and readable
            assert dump.registers["rip"] != 0


def test_retention_keeps_the_newest(kvm: Kvm, simpleguest: Path, dump_dir: Path) -> None:
    config = SandboxConfig(crashdump_retention=RetentionPolicy(max_files=3))
    with Sandbox(simpleguest, config) as sb:
        made = [sb.generate_crashdump() for _ in range(6)]
    assert sorted(os.listdir(dump_dir)) == sorted(p.name for p in made[-3:])
    byte_limit = SandboxConfig(crashdump_retention=RetentionPolicy(max_bytes=1))
    with Sandbox(simpleguest, byte_limit) as sb:
        last = sb.generate_crashdump()
    assert os.listdir(dump_dir) == [last.name]  # the one just written always stays
    with pytest.raises(ValueError):
        RetentionPolicy(max_files=0)


def test_listeners_hear_of_every_dump(kvm: Kvm, simpleguest: Path) -> None:
    records: list[CrashdumpRecord] = []
    with Sandbox(simpleguest) as sb:
        sb.add_crashdump_listener(records.append)

        def broken(record: CrashdumpRecord) -> None:
            raise RuntimeError("listener bug")

        sb.add_crashdump_listener(broken)  # a broken listener changes nothing
        path = sb.generate_crashdump()
        with pytest.raises(CrashdumpError):
            sb.generate_crashdump("/proc/self")
    assert [r.reason for r in records] == ["on-demand", "on-demand"]
    assert records[0].path == path and records[0].size == path.stat().st_size
    assert records[0].sandbox_id == sb.id and records[0].error is None
    assert records[1].path is None and isinstance(records[1].error, CrashdumpError)


def _foreign_core(ours: Path, path: Path) -> Path:
    """An ELF core another program (Hyperlight) might leave under our name pattern."""
    data = ours.read_bytes()
    assert data.count(b"HLASYNC\0") == 1
    path.write_bytes(data.replace(b"HLASYNC\0", b"HYPERLT\0"))  # no hlasync note any more
    os.utime(path, (1, 1))  # older than every hlasync dump
    return path


def test_retention_only_removes_hlasync_dumps(
    kvm: Kvm, simpleguest: Path, dump_dir: Path, tmp_path: Path
) -> None:
    with Sandbox(simpleguest) as sb:
        first = sb.generate_crashdump(tmp_path)
    foreign = _foreign_core(first, dump_dir / "hl_core_hyperlight_1234.elf")
    text = dump_dir / "hl_core_notes.elf"
    text.write_text("not a core file\n")
    os.utime(text, (1, 1))
    outside = tmp_path / "hl_core_elsewhere.elf"
    first.rename(outside)
    linked = dump_dir / "hl_core_link.elf"
    linked.symlink_to(outside)  # an hlasync dump, but only through a symlink
    config = SandboxConfig(crashdump_retention=RetentionPolicy(max_files=1))
    with Sandbox(simpleguest, config) as sb:
        made = [sb.generate_crashdump() for _ in range(3)]
    left = sorted(os.listdir(dump_dir))
    assert left == sorted([foreign.name, text.name, linked.name, made[-1].name])
    assert outside.is_file()


def test_odd_entries_never_break_a_dump(
    kvm: Kvm, simpleguest: Path, dump_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = dump_dir / "hl_core_loop.elf"
    loop.symlink_to(loop)  # stat() of it fails with ELOOP
    (dump_dir / "hl_core_dangling.elf").symlink_to(dump_dir / "gone")
    (dump_dir / "hl_core_directory.elf").mkdir()
    os.mkfifo(dump_dir / "hl_core_fifo.elf")  # opening it to read would block
    odd = sorted(os.listdir(dump_dir))
    config = SandboxConfig(crashdump_retention=RetentionPolicy(max_files=1, max_bytes=1))
    with Sandbox(simpleguest, config) as sb:
        paths = [sb.generate_crashdump() for _ in range(2)]
        with pytest.raises(GuestCrashed) as info:
            sb.call("divide_by_zero")
    assert info.value.crashdump_error is None and info.value.core_path is not None
    assert sorted(os.listdir(dump_dir)) == sorted([*odd, info.value.core_path.name])
    assert not any(p.exists() for p in paths)


def test_dump_is_synced_before_it_gets_its_name(
    kvm: Kvm, simpleguest: Path, dump_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), sorted(os.listdir(dump_dir))))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with Sandbox(simpleguest) as sb:
        path = sb.generate_crashdump()
    assert len(synced) == 1
    synced_name, listing = synced[0]
    assert Path(synced_name).name.startswith(".hl_core_")  # still the hidden temporary
    assert path.name not in listing


@pytest.mark.parametrize("problem", ["name too long", "symlink loop"])
def test_an_unusable_directory_is_a_crashdump_error(
    kvm: Kvm, simpleguest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    if problem == "name too long":
        directory = tmp_path / ("x" * 300)
    else:
        directory = tmp_path / "loop"
        directory.symlink_to(directory)
    with Sandbox(simpleguest) as sb:
        with pytest.raises(CrashdumpError, match="cannot use core dump directory"):
            sb.generate_crashdump(directory)
        monkeypatch.setenv("HYPERLIGHT_CORE_DUMP_DIR", str(directory))
        with pytest.raises(GuestCrashed) as info:
            sb.call("divide_by_zero")
    assert isinstance(info.value.crashdump_error, CrashdumpError)
    assert info.value.core_path is None
