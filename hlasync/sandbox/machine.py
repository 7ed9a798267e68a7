"""The resources of one sandbox: its VM, vCPU and guest memory, and which
pages of that memory changed since its backing image was mapped.

A :class:`Machine` holds no reference to its :class:`~hlasync.Sandbox`, so a
``weakref.finalize`` can release it without touching any lock.
"""

from __future__ import annotations

from ..errors import IoctlError
from ..guest.layout import MemoryLayout
from ..guest.memory import GuestMemory, MemoryImage
from ..kvm import Kvm, Vcpu, Vm, _abi
from . import cpu

__all__ = ["RESET_COPY_LIMIT", "Machine", "WrittenPages"]

PAGE_SIZE = 0x1000
#: Above this many written pages, a reset drops them all (madvise) instead of copying.
RESET_COPY_LIMIT = 512


class WrittenPages:
    """Pages of guest memory changed since the backing image was mapped: by the
    guest (KVM's dirty log, fetched and accumulated here) and by the host (every
    frame it writes into the buffers is noted with :meth:`host_wrote`)."""

    def __init__(self, vm: Vm, size: int, *, logged: bool) -> None:
        self._vm = vm
        self._size = size
        self._pages: set[int] = set()
        self.logged = logged

    def host_wrote(self, start: int, length: int) -> None:
        if length > 0:
            self._pages.update(range(start // PAGE_SIZE, (start + length - 1) // PAGE_SIZE + 1))

    def collect(self) -> set[int] | None:
        """Every page written so far (None when the guest's writes are not logged)."""
        if not self.logged:
            return None
        self._pages.update(self._vm.get_dirty_log(0, self._size))
        return self._pages

    def clear(self) -> None:
        """Forget everything: the memory now equals its backing image again.

        Callers :meth:`collect` first (the guest has not run since), so KVM's
        log holds nothing that is not in the set being dropped.
        """
        self._pages = set()


class Machine:
    """One VM with one vCPU and ``layout.memory_size`` bytes of guest memory
    mapped from ``image``."""

    def __init__(self, layout: MemoryLayout, image: MemoryImage) -> None:
        self.layout = layout
        self.memory: GuestMemory | None = GuestMemory(image)
        self.vm: Vm | None = None
        try:
            self.vm = Vm(Kvm.shared())
            size, address = layout.memory_size, self.memory.address
            try:
                # KVM logs the pages the guest writes: a reset copies back just those.
                self.vm.set_user_memory_region(0, 0, size, address, _abi.KVM_MEM_LOG_DIRTY_PAGES)
                logged = True
            except IoctlError:  # pragma: no cover - every KVM we know supports it
                self.vm.set_user_memory_region(0, 0, size, address)
                logged = False
            self.pages = WrittenPages(self.vm, size, logged=logged)
            self.vcpu: Vcpu = self.vm.create_vcpu()
            cpu.configure_vcpu(self.vcpu, Kvm.shared())
        except BaseException:
            self.release()
            raise
        view = self.memory.view
        self.input = view[layout.input_addr : layout.input_addr + layout.input_size]
        self.output = view[layout.output_addr : layout.output_addr + layout.output_size]

    @property
    def released(self) -> bool:
        return self.memory is None

    def reset_memory(self) -> None:
        """Make guest memory equal its backing image again."""
        assert self.memory is not None
        pages = self.pages.collect()
        if pages is None or len(pages) > RESET_COPY_LIMIT:
            self.memory.reset()  # cheaper than copying this many pages back
        else:
            self.memory.reset_pages(pages)
        self.pages.clear()

    def remap(self, image: MemoryImage) -> None:
        assert self.memory is not None
        self.pages.collect()  # empties KVM's log: writes before the remap do not count
        self.memory.remap(image)
        self.pages.clear()

    def data_runs(self) -> list[tuple[int, int]]:
        """Byte ranges of guest memory that may hold data (all else reads zero)."""
        assert self.memory is not None
        return self.memory.data_runs(self.pages.collect())

    def release(self) -> None:
        """Close the VM and unmap guest memory (idempotent; takes no lock)."""
        self.input = self.output = memoryview(b"")
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
