"""Shared fixtures. Tests that need /dev/kvm use the ``kvm`` fixture (or a
fixture built on it): they skip where KVM is unusable, and fail instead when
``HLASYNC_REQUIRE_KVM=1`` (CI sets it)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hlasync import Sandbox, guests
from hlasync.errors import KvmUnavailableError
from hlasync.kvm import Kvm


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With HLASYNC_CHECK_OWNER=1, any vCPU ioctl or guest-memory unmap that ran
    off its owner thread fails the session, also one raised on a background
    thread where no test saw it."""
    from hlasync.kvm import owner

    if owner.CHECK and owner.violations:
        print(f"\nHLASYNC_CHECK_OWNER: {len(owner.violations)} violation(s):", file=sys.stderr)
        for violation in owner.violations[:20]:
            print(f"  {violation}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _kvm_problem() -> str | None:
    try:
        Kvm.shared()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


#: What hlasync leaves in the temp directory when nobody names another place.
_TEMP_LEFTOVERS = ("hl_core_*.elf", "hlasync-*")


@pytest.fixture(scope="session", autouse=True)
def system_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's own "system temp directory" (``TMPDIR`` and :mod:`tempfile`),
    so that no test, nor a process it starts, writes to the machine's shared one."""
    directory = tmp_path_factory.mktemp("system-temp")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(directory)
    yield directory
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


@pytest.fixture(autouse=True)
def nothing_left_in_temp(system_temp_dir: Path) -> Iterator[None]:
    """Fail a test that leaves core dumps or dump-all lists in the temp directory."""
    yield
    left = sorted(
        path
        for path in system_temp_dir.iterdir()
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in _TEMP_LEFTOVERS)
    )
    for path in left:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if left:
        pytest.fail(
            f"the test left {[p.name for p in left]} in the temp directory: give it a directory "
            "of its own (tmp_path; crashdump_dir, HYPERLIGHT_CORE_DUMP_DIR or TMPDIR)"
        )


@pytest.fixture(autouse=True)
def dump_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its core dumps into its own directory."""
    directory = tmp_path / "dumps"
    directory.mkdir()
    monkeypatch.setenv("HYPERLIGHT_CORE_DUMP_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def kvm() -> Kvm:
    problem = _kvm_problem()
    if problem is not None:
        if os.environ.get("HLASYNC_REQUIRE_KVM") == "1":
            pytest.fail(f"HLASYNC_REQUIRE_KVM=1 but KVM is unusable: {problem}")
        pytest.skip(f"KVM unusable: {problem}")
    return Kvm.shared()


@pytest.fixture(scope="session")
def simpleguest() -> Path:
    return guests.path("simpleguest")


def settled_fds(guest: Path) -> int:
    """This process's open descriptors once the process-wide caches a sandbox of
    ``guest`` fills (its template) exist: a later count then shows only what a
    test itself left open, whichever test ran first."""
    Sandbox(guest).close()
    return psutil.Process().num_fds()


@pytest.fixture
def sandbox(kvm: Kvm, simpleguest: Path) -> Iterator[Sandbox]:
    with Sandbox(simpleguest) as sb:
        yield sb


@pytest.fixture(scope="session")
def hostile_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/hostile.c, built with the SDK."""
    from hlasync._build import build_guest

    source = Path(__file__).parent / "guests" / "hostile.c"
    return build_guest([source], tmp_path_factory.mktemp("guests") / "hostile.elf")


def fuzz_examples(count: int) -> int:
    """Examples per fuzz test: ``count`` in CI, scaled by ``HLASYNC_FUZZ_SCALE``
    for longer runs on demand (e.g. ``HLASYNC_FUZZ_SCALE=100 python -m pytest -k fuzz``)."""
    return max(1, int(count * float(os.environ.get("HLASYNC_FUZZ_SCALE", "1"))))


#: For supervisor tests that patch or inspect the worker host inside this process.
threads_only = pytest.mark.threads_only


@pytest.fixture(params=["threads", "processes"])
def supervisor_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with ``Supervisor()`` in the thread mode and with two worker
    processes (through HLASYNC_PROCESSES, the default of ``processes``)."""
    mode = str(request.param)
    if mode == "processes" and request.node.get_closest_marker("threads_only") is not None:
        pytest.skip("white-box: patches or inspects this process's worker host")
    monkeypatch.setenv("HLASYNC_PROCESSES", "0" if mode == "threads" else "2")
    return mode


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, fail in CI (HLASYNC_REQUIRE_KVM=1)."""
    import shutil

    found = shutil.which(name)
    if found is None:
        if os.environ.get("HLASYNC_REQUIRE_KVM") == "1":
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return found


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m hlasync ARGS`` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "hlasync", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=timeout,
        check=False,
    )
