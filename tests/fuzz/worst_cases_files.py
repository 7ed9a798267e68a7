"""The worst files tried against each parser of files that others control,
as a markdown table: ``python -m tests.fuzz.worst_cases_files``.

Parsers: the core reader (``CoreDump.open`` and ``report()``), dump
identification (``is_hlasync_dump``, what retention and the Ray node use),
the guest ELF a dump's metadata names (``GuestImage.load`` through
``CoreDump.guest_problem``; for the hostile ELFs of :mod:`tests.guest.hostile`
also the unwinder's table and lookups) and a Ray node's ``read_node_dump``. Each row
gives the outcome, the time (one run, not under tracemalloc), the peak of
Python allocations (tracemalloc) and, for the core parsers, the bytes
``pread`` returned. Needs no KVM (the cores are built by
:mod:`tests.crashdump.hostile`); with KVM a real dump is measured too.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hlasync import CoreDump, GuestImage, guests
from hlasync.crashdump import _format as fmt
from hlasync.crashdump.placement import is_hlasync_dump
from hlasync.crashdump.unwind import CallFrameTable
from hlasync.guest.image import PF_X
from hlasync.ray.actor import read_node_dump
from tests.crashdump import hostile
from tests.fuzz.budget import measure
from tests.guest import hostile as hostile_elf


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def _outcome(value: object) -> str:
    """The outcome in a table cell: its kind and the end of its text."""
    if isinstance(value, bytes):
        text = f"{_size(len(value))} returned"
    elif isinstance(value, BaseException):
        text = f"{type(value).__name__}: …{str(value)[-60:]}"
    elif isinstance(value, str) and len(value) > 60:
        text = f"…{value[-60:]}"
    else:
        text = repr(value)
    return text.replace("|", "\\|")


def _row(parser: str, what: str, work: Callable[[], object]) -> str:
    gc.collect()  # the last row's garbage is not this row's time
    with hostile.counting_reads() as counter:
        measured = measure(work)
    read = f"{_size(counter.read // 2)}" if counter.read else "-"  # measure() runs it twice
    return (
        f"| {parser} | {what} | {_outcome(measured.outcome)} | {measured.seconds * 1e3:.2f} ms "
        f"| {_size(measured.peak)} | {read} |"
    )


def _open_and_report(path: Path) -> Callable[[], object]:
    def work() -> object:
        with CoreDump.open(path) as dump:
            dump.report()
            return "report"

    return work


def _identify(path: Path) -> Callable[[], object]:
    def work() -> object:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return is_hlasync_dump(fd)
        finally:
            os.close(fd)

    return work


def _metadata_in_a_hole(out: Path) -> Path:
    """The hlasync note's header says 1 MiB (the limit) that lie in a hole."""
    data = bytearray(hostile.minimal(out).read_bytes())
    offset = data.find(b"HLASYNC\0") - fmt.NHDR.size
    data[offset + 4 : offset + 8] = fmt.MAX_METADATA_BYTES.to_bytes(4, "little")
    desc = offset + fmt.NHDR.size + 8
    note = hostile.program_headers(bytes(data))[0]
    note[5] = desc + fmt.MAX_METADATA_BYTES - note[2]
    data[fmt.EHDR.size : fmt.EHDR.size + fmt.PHDR.size] = fmt.PHDR.pack(*note)
    out.write_bytes(bytes(data[:desc]))
    os.truncate(out, desc + fmt.MAX_METADATA_BYTES)
    return out


def _most_read(out: Path) -> Path:
    """A core the reader accepts that makes it read the most it ever reads:
    1,024 program headers, 256 notes, the three notes it uses at 64 KiB each
    and 1 MiB of metadata."""
    meta = {"format": 1, "sandbox_id": "s", "reason": "r", "timestamp": "t", "regions": []}
    meta["message"] = ""
    meta["message"] = "x" * (fmt.MAX_METADATA_BYTES - len(json.dumps(meta)))
    big = bytes(fmt.MAX_NOTE_BYTES)
    notes = b"".join(
        fmt.note(fmt.NOTE_NAME_CORE, kind, big)
        for kind in (fmt.NT_PRSTATUS, fmt.NT_PRPSINFO, fmt.NT_AUXV)
    )
    notes += fmt.note(b"", 0, b"") * (fmt.MAX_NOTES - 4)
    notes += fmt.note(fmt.NOTE_NAME_HLASYNC, fmt.NT_HLASYNC, json.dumps(meta).encode())
    count = fmt.MAX_PROGRAM_HEADERS
    offset = fmt.EHDR.size + count * fmt.PHDR.size
    ident = fmt.ELFMAG + bytes([fmt.ELFCLASS64, fmt.ELFDATA2LSB, fmt.EV_CURRENT]) + bytes(9)
    ehdr = fmt.EHDR.pack(
        ident, fmt.ET_CORE, fmt.EM_X86_64, fmt.EV_CURRENT, 0, fmt.EHDR.size, 0, 0,
        fmt.EHDR.size, fmt.PHDR.size, count, 0, 0, 0,
    )  # fmt: skip
    load = fmt.PHDR.pack(fmt.PT_LOAD, fmt.PF_R, 0, 0x1000, 0, 64, 64, 0x1000)
    note = fmt.PHDR.pack(fmt.PT_NOTE, 0, offset, 0, 0, len(notes), 0, 4)
    out.write_bytes(ehdr + note + load * (count - 1) + notes)
    return out


def _json_worst(out: Path) -> Path:
    """1 MiB of ``[],[],...`` as metadata: the most decoding allocates."""
    count = (fmt.MAX_METADATA_BYTES - 2) // 3
    text = "[" + "[]," * count
    hostile.minimal(out)
    data = out.read_bytes()
    start = data.find(b"HLASYNC\0") + 8
    payload = (text[: fmt.MAX_METADATA_BYTES - 3] + "[]]").encode()
    notes = data[fmt.EHDR.size + fmt.PHDR.size : start - 8 - fmt.NHDR.size]
    notes += fmt.note(fmt.NOTE_NAME_HLASYNC, fmt.NT_HLASYNC, payload)
    note = hostile.program_headers(data)[0]
    note[5] = len(notes)
    out.write_bytes(data[: fmt.EHDR.size] + fmt.PHDR.pack(*note) + notes)
    return out


def _show_guest(work: Path, elf: Path, pcs: tuple[int, ...] = ()) -> Callable[[], object]:
    """What showing a dump that names ``elf`` does with it: load it, unwind,
    and look up the rows of ``pcs``. Says what the caps left out, if anything."""
    named = hostile.minimal(work / f"names-{elf.stem}.elf", {"guest": str(elf)})

    def show() -> object:
        GuestImage._cache.clear()  # measure() runs this twice: both load the file
        with CoreDump.open(named) as dump:
            image = dump.guest_image()
            if image is None:
                return dump.guest_problem()
            dump.backtrace()
            table = CallFrameTable(image)
            rows = sum(table.row(pc) is not None for pc in pcs)
        found = f"loaded, {len(image.symbols)} symbols, {rows}/{len(pcs)} rows"
        return "; ".join(image.truncated) or found

    return show


def _guest_rows(work: Path) -> list[str]:
    """The hostile guest ELFs, each at most MAX_IMAGE_FILE (64 MiB)."""
    label = "guest ELF named by a dump: load + unwind"
    real = guests.path("simpleguest")
    base = real.read_bytes()
    code = next(s for s in GuestImage.load(real).segments if s.flags & PF_X)
    start, size = code.vaddr, code.memsz
    pcs = tuple(range(start, start + size, size // 64))[:64]  # a backtrace's most lookups
    h = hostile_elf
    cases: list[tuple[str, Callable[[], bytes], tuple[int, ...]]] = [
        ("65,535 section headers", lambda: h.many_sections(base, 0xFFFF), ()),
        ("65,534 program headers", lambda: h.many_program_headers(base, 0xFFFE), ()),
        ("60 MiB of section names without a NUL, 1,000 sections named into them",
         lambda: h.nameless_strings(base, 60 << 20, 1000), ()),
        ("1.3 M symbols (37 MiB)", lambda: h.many_symbols(base, 1_300_000), ()),
        ("32,768 symbols named into a string table without a NUL (most symbol memory)",
         lambda: h.long_symbol_names(base, 1 << 15, (1 << 15) + 2048), ()),
        ("1 M exported functions (61 MiB)", lambda: h.many_functions(base, 1_000_000, start), ()),
        ("5 M notes before the build-id (57 MiB)", lambda: h.many_notes(base, 5_000_000), ()),
        ("4 PT_LOAD loading the same 60 MiB",
         lambda: h.overlapping_segments(base, 4, 60 << 20), ()),
        (".eh_frame of 1.4 M CIEs and 1.4 M FDEs (59 MiB)",
         lambda: h.call_frames(base, h.fde_pairs(1_400_000, start, size)), pcs),
        (".eh_frame: one FDE of 60 M instructions",
         lambda: h.call_frames(base, h.cfi_long_program(start, size, 60 << 20)), pcs),
        ("FDE: rules for 1,000 registers, 1,000 remembered rows",
         lambda: h.call_frames(base, h.cfi_many_registers(start, size, 1000, 1000)), pcs),
        ("an FDE that is its own CIE",
         lambda: h.call_frames(base, h.cfi_self_referencing(start, size)), pcs),
        ("compressed .debug_info: 1 GiB of zeros in 1 MiB",
         lambda: h.compressed(base, b".debug_info", 1 << 30), ()),
        ("compressed .hl_functions: 1 GiB of zeros in 1 MiB",
         lambda: h.compressed(base, b".hl_functions", 1 << 30), ()),
    ]  # fmt: skip
    js = guests.path("jsruntime")
    what = f"jsruntime.elf, the bundled QuickJS guest ({_size(js.stat().st_size)})"
    out = [_row(label, what, _show_guest(work, js))]
    elf = work / "guest.elf"
    for what, build, lookups in cases:
        elf.write_bytes(build())
        out.append(_row(label, what, _show_guest(work, elf, lookups)))
        elf.unlink()  # up to 64 MiB each
    return out


def _real_dump(directory: Path) -> Path | None:
    from hlasync.errors import KvmUnavailableError
    from hlasync.kvm import Kvm

    try:
        Kvm.shared()
    except KvmUnavailableError:
        return None
    return hostile.real_dump(directory, guests.path("simpleguest"))


def rows(work: Path) -> list[str]:
    reader, ident, guest, ray = (
        "core reader: open + report",
        "is_hlasync_dump",
        "guest ELF named by a dump",
        "Ray read_node_dump",
    )
    base = hostile.minimal(work / "minimal.elf")
    real = _real_dump(work / "real")
    plant = hostile.planted(work / "hl_core_planted.elf")
    plant_1024 = hostile.planted(work / "planted-1024.elf", count=fmt.MAX_PROGRAM_HEADERS)
    out = []
    if real is not None:
        held = _size(real.stat().st_blocks * 512)
        what = f"a real dump ({_size(real.stat().st_size)}, {held} on disk)"
        out.append(_row(reader, what, _open_and_report(real)))
        out.append(_row(ident, what, _identify(real)))
    sparse = hostile.sparse_note(base, work / "sparse.elf", 1536 << 20)
    sparse_max = hostile.sparse_note(base, work / "sparse32.elf", fmt.MAX_NOTE_SEGMENT_BYTES)
    hole = _metadata_in_a_hole(work / "hole.elf")
    most = _most_read(work / "most.elf")
    worst_json = _json_worst(work / "json.elf")
    for what, path in (
        ("sparse, 8 KiB on disk, PT_NOTE claims 1.5 GiB", sparse),
        ("sparse, PT_NOTE claims 32 MiB (the limit) of zeros", sparse_max),
        ("hlasync note claims 1 MiB lying in a hole", hole),
        ("accepted, reads the most: 1,024 phdrs, 256 notes, 1 MiB metadata", most),
        ("1 MiB metadata of `[],[],…` (most decoding memory)", worst_json),
        ("planted: 4,096 PT_NOTE over one 1 MiB hole (228 KiB on disk)", plant),
        ("planted at the limit: 1,024 PT_NOTE over one 1 MiB hole", plant_1024),
    ):
        out.append(_row(reader, what, _open_and_report(path)))
    out.append(_row(ident, "planted: 4,096 PT_NOTE over one 1 MiB hole", _identify(plant)))
    out.append(_row(ident, "accepted, most read (1,024 phdrs, 256 notes)", _identify(most)))
    out.append(_row(ident, "sparse, PT_NOTE claims 1.5 GiB", _identify(sparse)))

    fifo = work / "guest-fifo"
    os.mkfifo(fifo)
    for what, target in (
        ("a FIFO", str(fifo)),
        ("/dev/zero", "/dev/zero"),
        ("/proc/self/pagemap (says 0 bytes, holds 256 TiB)", "/proc/self/pagemap"),
        ("/proc/self/status (not ELF)", "/proc/self/status"),
    ):
        named = hostile.minimal(work / "named.elf", {"guest": target})

        def problem(named: Path = named) -> object:
            with CoreDump.open(named) as dump:
                return dump.guest_problem()

        out.append(_row(guest, what, problem))
    out += _guest_rows(work)

    dumps = work / "node_dumps"
    private = work / "private"
    dumps.mkdir()
    private.mkdir()
    hostile.minimal(private / "hl_core_secret.elf")
    os.mkfifo(dumps / "hl_core_fifo.elf")
    (dumps / "hl_core_link").symlink_to(private)
    planted_in = hostile.planted(dumps / "hl_core_planted.elf")
    requests = [
        ("`node_dumps/../private/hl_core_secret.elf`", f"{dumps}/../private/hl_core_secret.elf"),
        ("through a symlinked directory", f"{dumps}/hl_core_link/hl_core_secret.elf"),
        ("a FIFO named like a dump", str(dumps / "hl_core_fifo.elf")),
        ("the planted file, in the directory", str(planted_in)),
    ]
    if real is not None:
        (dumps / real.name).hardlink_to(real)
        requests.append(("a real dump (7.1 MiB apparent)", str(dumps / real.name)))
    for what, request in requests:

        def fetch(request: str = request) -> object:
            return read_node_dump(request, [dumps])

        out.append(_row(ray, what, fetch))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hl-worst-") as temp:
        work = Path(temp)
        (work / "real").mkdir()
        table = rows(work)
    print("| parser | input | outcome | time | peak memory | bytes read |")
    print("|---|---|---|---:|---:|---:|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
