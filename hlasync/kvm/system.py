"""The ``/dev/kvm`` system handle."""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from ..errors import IoctlError, KvmUnavailableError
from . import _abi, owner

__all__ = ["Kvm", "ioctl"]

DEFAULT_DEVICE = "/dev/kvm"


def ioctl(fd: int, request: int, arg: object = 0) -> int:
    """``fcntl.ioctl`` that raises :class:`IoctlError` naming the request.

    A vCPU's ioctls go through its owner (:meth:`Vcpu._ioctl`); with
    ``HLASYNC_CHECK_OWNER=1`` one that comes here from another thread raises
    :class:`~hlasync.kvm.owner.OwnerViolation`."""
    if owner.CHECK:
        owner.check_fd(fd, request)
    try:
        return fcntl.ioctl(fd, request, arg)  # type: ignore[call-overload, no-any-return]
    except OSError as exc:
        name = _abi.IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise IoctlError(name, exc.errno or 0, exc.strerror or str(exc)) from None


class Kvm:
    """An open ``/dev/kvm``. Creates VMs; one per process is enough (see :meth:`shared`)."""

    _shared: Kvm | None = None
    _shared_lock = threading.Lock()

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        self.device = device
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{device} does not exist: this machine has no KVM. Enable virtualization "
                "(VT-x/AMD-V, or nested virtualization in your cloud VM) and load the kvm "
                "module (modprobe kvm_intel or kvm_amd)."
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {device}: add your user to the group that owns it "
                f"(usually 'kvm': sudo usermod -aG kvm $USER, then log in again)."
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {device}: {exc.strerror}") from None
        try:
            version = ioctl(self.fd, _abi.KVM_GET_API_VERSION)
            if version != _abi.KVM_API_VERSION:
                raise KvmUnavailableError(
                    f"{device} speaks KVM API version {version}, hlasync needs "
                    f"{_abi.KVM_API_VERSION}"
                )
            self.vcpu_mmap_size = ioctl(self.fd, _abi.KVM_GET_VCPU_MMAP_SIZE)
            self._cpuid: tuple[_abi.kvm_cpuid_entry2, ...] | None = None
            self._extensions: dict[int, int] = {}
        except IoctlError as exc:
            os.close(self.fd)
            raise KvmUnavailableError(f"{device} is not a usable KVM device: {exc}") from None
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def shared(cls) -> Kvm:
        """The process-wide handle, opened on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 where the capability is missing, else its value
        (asked once per capability)."""
        value = self._extensions.get(capability)
        if value is None:
            try:
                value = ioctl(self.fd, _abi.KVM_CHECK_EXTENSION, capability)
            except IoctlError:
                value = 0
            self._extensions[capability] = value
        return value

    def supported_cpuid(self) -> tuple[_abi.kvm_cpuid_entry2, ...]:
        """The CPUID leaves KVM can offer a guest on this host (``KVM_GET_SUPPORTED_CPUID``)."""
        if self._cpuid is None:
            table = _abi.kvm_cpuid2(nent=_abi.CPUID_MAX_ENTRIES)
            ioctl(self.fd, _abi.KVM_GET_SUPPORTED_CPUID, table)
            self._cpuid = tuple(table.entries[: table.nent])
        return self._cpuid

    def create_vm_fd(self) -> int:
        """A new VM file descriptor (close-on-exec)."""
        while True:
            try:
                fd = ioctl(self.fd, _abi.KVM_CREATE_VM, 0)
                break
            except IoctlError as exc:
                if exc.errno != errno.EINTR:
                    raise
        os.set_inheritable(fd, False)
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
