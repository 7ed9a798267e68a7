"""Shared fixtures. Tests that need /dev/kvm use the ``kvm`` fixture (or a
fixture built on it): they skip where KVM is unusable, and fail instead when
``HLASYNC_REQUIRE_KVM=1`` (CI sets it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hlasync import Sandbox, guests
from hlasync.errors import KvmUnavailableError
from hlasync.kvm import Kvm


def _kvm_problem() -> str | None:
    try:
        Kvm.shared()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


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


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, fail in CI (HLASYNC_REQUIRE_KVM=1)."""
    import shutil

    found = shutil.which(name)
    if found is None:
        if os.environ.get("HLASYNC_REQUIRE_KVM") == "1":
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return found
