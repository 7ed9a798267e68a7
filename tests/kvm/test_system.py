from __future__ import annotations

import os

import pytest

from hlasync.errors import HlasyncError, IoctlError, KvmUnavailableError
from hlasync.kvm import Kvm, Vm, _abi, ioctl


def test_missing_device_gives_actionable_error(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(os.path.join(tmp_path, "no-kvm-here"))


def test_device_that_is_not_kvm_is_rejected() -> None:
    with pytest.raises(KvmUnavailableError, match="not a usable KVM device"):
        Kvm("/dev/null")


def test_permission_denied_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # Root (as in CI) bypasses file modes, so make open() itself refuse.
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("hlasync.kvm.system.os.open", refuse)
    with pytest.raises(KvmUnavailableError, match=r"no permission.*group"):
        Kvm("/dev/kvm")


def test_errors_share_one_root() -> None:
    assert issubclass(KvmUnavailableError, HlasyncError)
    assert issubclass(IoctlError, HlasyncError)
    assert issubclass(IoctlError, OSError)


def test_ioctl_error_names_the_ioctl(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vm.create_vcpu()
        with pytest.raises(IoctlError) as info:
            ioctl(vm.fd, _abi.KVM_CREATE_VCPU, 0)  # vCPU 0 exists already
        assert info.value.ioctl == "KVM_CREATE_VCPU"
        assert "KVM_CREATE_VCPU failed" in str(info.value)
    finally:
        vm.close()


def test_api_version_and_vcpu_mmap_size(kvm: Kvm) -> None:
    assert ioctl(kvm.fd, _abi.KVM_GET_API_VERSION) == 12
    assert kvm.vcpu_mmap_size >= 4096
