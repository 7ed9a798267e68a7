"""The resources of one sandbox: its VM, vCPU and guest memory, and which
pages of that memory changed since its backing image was mapped.

A :class:`Machine` holds no reference to its :class:`~hlasync.Sandbox`, so a
``weakref.finalize`` can release it without touching any lock.
"""

from __future__ import annotations

from .. import abi
from ..errors import IoctlError
from ..guest.layout import MemoryLayout
from ..guest.memory import GuestMemory, MemoryImage
from ..kvm import Kvm, Vcpu, Vm, _abi
from . import cpu

__all__ = ["COOL_EVERY", "HOT_AFTER", "HOT_LIMIT", "RESET_COPY_LIMIT", "Machine", "WrittenPages"]

PAGE_SIZE = 0x1000
#: Above this many written pages, a reset drops them all (madvise) instead of copying.
RESET_COPY_LIMIT = 512
#: A page the guest wrote before this many resets in a row stays writable (hot).
HOT_AFTER = 2
#: At most this many hot pages per sandbox (each is copied on every reset).
HOT_LIMIT = 256
#: Every this many resets, all pages are write-protected again.
COOL_EVERY = 64


#: Byte ranges of the doorbell page that a reset in the park puts back: all
#: but the spin, go and parked words, which hl_park reads or wrote.
_BELL_RESET = (
    (0, abi.DOORBELL_SPIN - abi.DOORBELL_ADDR),
    (abi.DOORBELL_SPIN + 8 - abi.DOORBELL_ADDR, abi.DOORBELL_GO - abi.DOORBELL_ADDR),
    (abi.DOORBELL_GO + 8 - abi.DOORBELL_ADDR, abi.DOORBELL_PARKED - abi.DOORBELL_ADDR),
    (abi.DOORBELL_PARKED + 8 - abi.DOORBELL_ADDR, PAGE_SIZE),
)


class WrittenPages:
    """Pages of guest memory changed since the backing image was mapped: by the
    guest (KVM's dirty log, fetched and accumulated here) and by the host (every
    frame it writes into the buffers is noted with :meth:`host_wrote`).

    Where KVM offers manual dirty-log protection (``manual``), pages the guest
    writes on every call ("hot": written before each of the last
    :data:`HOT_AFTER` resets) stay writable: KVM keeps reporting them dirty, so
    every reset copies them back, and the guest no longer takes a
    write-protection fault (~2 us each on a PVM host) on its first write to
    each of them per call. All pages are protected again every
    :data:`COOL_EVERY` resets, so a page that went quiet stops being copied.
    """

    def __init__(self, vm: Vm, size: int, *, logged: bool, manual: bool = False) -> None:
        self._vm = vm
        self._size = size
        self._pages: set[int] = set()
        self._guest_pages: set[int] = set()  # the part KVM reported
        self.logged = logged
        self.manual = logged and manual
        self._streak: dict[int, int] = {}  # page -> resets in a row that found it written
        self.hot: frozenset[int] = frozenset()
        #: At most this many hot pages (0: every written page is protected again).
        self.hot_limit = HOT_LIMIT
        self._resets = 0

    def host_wrote(self, start: int, length: int) -> None:
        if length > 0:
            self._pages.update(range(start // PAGE_SIZE, (start + length - 1) // PAGE_SIZE + 1))

    def collect(self) -> set[int] | None:
        """Every page written so far (None when the guest's writes are not logged);
        with manual protection, the hot pages too."""
        if not self.logged:
            return None
        logged = self._vm.get_dirty_log(0, self._size)
        self._pages.update(logged)
        if self.manual:
            self._guest_pages.update(logged)
        return self._pages

    def clear(self, *, cool: bool = False) -> None:
        """Forget everything: the memory now equals its backing image again.

        Callers :meth:`collect` first (the guest has not run since), so KVM's
        log holds nothing that is not in the set being dropped. ``cool`` (or
        every :data:`COOL_EVERY` calls) write-protects the hot pages too.
        """
        if self.manual:
            self._protect(cool)
        self._pages = set()
        self._guest_pages = set()

    def _protect(self, cool: bool) -> None:
        """Write-protect the written pages that are not hot (``KVM_CLEAR_DIRTY_LOG``)."""
        pages = self._guest_pages
        self._resets += 1
        if cool or self._resets % COOL_EVERY == 0:
            self._streak = {}
            hot: frozenset[int] = frozenset()
        else:
            previous = self._streak
            # Only what the guest wrote: pages the host alone wrote are not
            # protected in KVM to begin with.
            self._streak = {page: previous.get(page, 0) + 1 for page in pages}
            chosen = [page for page, runs in self._streak.items() if runs >= HOT_AFTER]
            hot = frozenset(chosen[: self.hot_limit])
        self.hot = hot
        self._vm.clear_dirty_log(0, self._size, pages - hot if hot else pages)


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
                # Before the slot exists: KVM then leaves re-protecting written
                # pages to us, so the hot ones can stay writable.
                self.vm.enable_cap(
                    _abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    _abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                )
                manual = True
            except IoctlError:  # pragma: no cover - Linux < 5.8
                manual = False
            try:
                # KVM logs the pages the guest writes: a reset copies back just those.
                self.vm.set_user_memory_region(0, 0, size, address, _abi.KVM_MEM_LOG_DIRTY_PAGES)
                logged = True
            except IoctlError:  # pragma: no cover - every KVM we know supports it
                self.vm.set_user_memory_region(0, 0, size, address)
                logged = False
            self.pages = WrittenPages(self.vm, size, logged=logged, manual=manual)
            self.vcpu: Vcpu = self.vm.create_vcpu()
            # From here only the vCPU's owner thread maps over or unmaps guest memory.
            self.memory.owner = self.vcpu.owner
            self.vcpu.owner.own_range(address, size)
            cpu.configure_vcpu(self.vcpu, Kvm.shared())
        except BaseException:
            self.release()
            raise
        view = self.memory.view
        self.input = view[layout.input_addr : layout.input_addr + layout.input_size]
        self.output = view[layout.output_addr : layout.output_addr + layout.output_size]
        self.doorbell = view[abi.DOORBELL_ADDR : abi.DOORBELL_ADDR + 0x1000]
        #: The doorbell as 64-bit words (abi.WORD_*): every access is one aligned
        #: 8-byte load or store, which a guest running meanwhile sees whole.
        self.bell = self.doorbell.cast("Q")

    def write_bell(self, word: int, value: int) -> None:
        """Store doorbell word ``word`` (abi.WORD_*) and record the host's write,
        so that a restore puts the guest's page back as it was."""
        self.bell[word] = value  # one aligned 8-byte store: a running guest never sees it torn
        self.pages.host_wrote(abi.DOORBELL_ADDR + 8 * word, 8)

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

    def reset_parked(self, answer_ticks: int) -> bool:
        """Make guest memory equal its backing image again while the guest waits
        in ``hl_park`` (abi.FEATURE_PARK), which meanwhile touches nothing but
        the doorbell's spin, go and parked words: those stay as they are (the
        host wrote the spin after the call), and the answer spin is the
        host's ``answer_ticks``. False, with nothing changed, when more pages
        were written than are worth copying one by one."""
        assert self.memory is not None
        pages = self.pages.collect()
        if pages is None or len(pages) > RESET_COPY_LIMIT:
            return False
        # Protected again *before* the copy: a write of a guest that only said it
        # parked, made after its page was put back, then faults and is logged
        # (the next restore undoes it), where after the copy it would be lost
        # from the log for good.
        pages = set(pages)
        self.pages.clear()
        bell_page = abi.DOORBELL_ADDR // PAGE_SIZE
        self.memory.reset_pages(page for page in pages if page != bell_page)
        for start, end in _BELL_RESET:
            self.memory.reset_range(abi.DOORBELL_ADDR + start, end - start)
        self.bell[abi.WORD_ANSWER_SPIN] = answer_ticks
        self.pages.host_wrote(abi.DOORBELL_ADDR, PAGE_SIZE)  # its park words differ
        return True

    def trim(self) -> int:
        """Drop the unchanged backing-image pages of guest memory from this
        process's mappings (see :meth:`GuestMemory.trim`); the bytes dropped."""
        if self.memory is None:
            return 0
        return self.memory.trim()

    def remap(self, image: MemoryImage) -> None:
        assert self.memory is not None
        self.pages.collect()  # writes before the remap do not count
        self.memory.remap(image)
        self.pages.clear(cool=True)

    def data_runs(self) -> list[tuple[int, int]]:
        """Byte ranges of guest memory that may hold data (all else reads zero)."""
        assert self.memory is not None
        return self.memory.data_runs(self.pages.collect())

    def release(self) -> None:
        """Unmap guest memory and close the VM (idempotent; takes no lock).

        Both on the vCPU's owner thread, after any KVM_RUN returned: the guest
        is kicked first, so a running one does not hold the release up."""
        self.input = self.output = self.doorbell = memoryview(b"")
        self.bell = memoryview(b"").cast("Q")
        vm = self.vm
        if vm is not None and vm.vcpus:
            vm.vcpus[0].kick()
        if self.memory is not None:
            memory, self.memory = self.memory, None
            memory.close()
        if vm is not None:
            self.vm = None
            vm.close()
