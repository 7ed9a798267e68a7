"""The core reader and dump identification fuzzed (issue 18): real dumps with
bytes changed, header fields set to hostile values (``e_phnum``, ``p_offset``,
``p_filesz``, note sizes), cut short or stretched into sparse files, hostile
metadata, and arbitrary bytes. ``CoreDump.open`` and everything a reader does
next give a result or the documented error (InvalidCoreDump; GuestImageError
for a build-id naming another build; ValueError for memory not in the dump),
within a time and memory budget per input, and read a bounded number of bytes
whatever the file claims. ``is_hlasync_dump`` answers reading a few KiB."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hlasync import (
    CoreDump,
    GuestImageError,
    InvalidCoreDump,
)
from hlasync.crashdump import _format as fmt
from hlasync.crashdump.placement import is_hlasync_dump
from hlasync.kvm import Kvm
from tests.conftest import fuzz_examples
from tests.crashdump import hostile
from tests.fuzz.budget import SECONDS, Measured, measure, memory_budget

#: The most CoreDump.open reads beyond the bytes a file holds: its program
#: headers, note headers and the three small notes it uses, read as zeros from
#: holes at worst (the hlasync note is never read from a hole).
OPEN_READS = (
    fmt.EHDR.size
    + fmt.MAX_PROGRAM_HEADERS * fmt.PHDR.size
    + fmt.MAX_NOTES * (fmt.NHDR.size + fmt.MAX_NOTE_NAME_BYTES)
    + 3 * fmt.MAX_NOTE_BYTES
)
#: The most identification reads, whatever the file.
IDENTIFY_READS = (
    fmt.EHDR.size + fmt.PHDR.size + fmt.IDENTIFY_NOTES * (fmt.NHDR.size + fmt.MAX_NOTE_NAME_BYTES)
)

_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def real_core(tmp_path_factory: pytest.TempPathFactory, kvm: Kvm, simpleguest: Path) -> Path:
    return hostile.real_dump(tmp_path_factory.mktemp("fuzz-core"), simpleguest)


# ---------------------------------------------------------------- inputs
_U32 = st.one_of(
    st.sampled_from([0, 1, 3, 4, 12, 255, 256, 257, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
_U64 = st.one_of(
    _U32,
    st.sampled_from(
        [fmt.MAX_NOTE_SEGMENT_BYTES, fmt.MAX_NOTE_SEGMENT_BYTES + 1, 1536 << 20, 2**63, 2**64 - 1]
    ),
    st.integers(0, 2**64 - 1),
)


#: Mutations, the ones that let the reader go deeper more often.
_KINDS = ["flip"] * 4 + ["metadata-bytes", "note", "phdr"] * 2 + ["phnum", "phoff"]


@st.composite
def _mutations(draw: st.DrawFn, blob: bytes, size: int) -> tuple[bytes, int]:
    """(bytes, apparent size): the headers and notes of a real dump of ``size``
    bytes changed; the file keeps its size (its guest memory reads as zeros),
    or ends after them, or is stretched."""
    data = bytearray(blob)
    headers = hostile.program_headers(blob)
    note = headers[0]
    note_heads, at = [], note[2]
    for name, _, desc in hostile.iter_notes(blob[note[2] : note[2] + note[5]]):
        note_heads.append(at)
        at += fmt.NHDR.size + ((len(name) + 1 + 3) & ~3) + ((len(desc) + 3) & ~3)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(_KINDS))
        event(kind)
        if kind == "flip":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "phnum":
            struct.pack_into("<H", data, 56, draw(st.integers(0, 0xFFFF)))
        elif kind == "phoff":
            struct.pack_into("<Q", data, 32, draw(_U64))
        elif kind == "phdr":
            index = draw(st.integers(0, len(headers) - 1))
            field = draw(st.sampled_from([(0, "<I"), (8, "<Q"), (16, "<Q"), (32, "<Q")]))
            value = draw(_U32 if field[1] == "<I" else _U64)
            struct.pack_into(field[1], data, 64 + index * fmt.PHDR.size + field[0], value)
        elif kind == "note":
            where = draw(st.sampled_from(note_heads)) + draw(st.sampled_from([0, 4, 8]))
            struct.pack_into("<I", data, where, draw(_U32))
        elif kind == "metadata-bytes":
            start = data.find(b"HLASYNC\0") + 8
            data[draw(st.integers(start, len(data) - 1))] = draw(st.sampled_from(b'{}[]",:\\\x00'))
    if draw(st.integers(0, 3)) == 0:
        event("cut")
        del data[draw(st.integers(0, len(data))) :]
    size = draw(st.sampled_from([size, size, size, len(data), 1 << 20, 1536 << 20]))
    return bytes(data), max(size, len(data))


def _write(path: Path, data: bytes, size: int) -> Path:
    path.write_bytes(data)
    os.truncate(path, size)  # the rest is a hole that reads as zeros
    return path


# ---------------------------------------------------------------- checks
def _exercise(path: Path) -> object:
    """Everything a reader of a dump does; returns the report."""
    with CoreDump.open(path) as dump:
        dump.summary()
        text = dump.report()
        dump.backtrace()
        for region in dump.regions[:4]:
            with contextlib.suppress(ValueError):  # documented: memory not in the dump
                dump.read(region.start, min(region.size, 64))
                dump.read_string(region.start, 64)
        return text


def _check(measured: Measured, held: int, label: str) -> None:
    outcome = measured.outcome
    if isinstance(outcome, GuestImageError):
        # A changed build-id names another build of the guest: refused with the
        # hint a guest rebuilt since the dump gets.
        assert "not the guest this dump was taken from" in str(outcome), label
    else:
        assert outcome is None or isinstance(outcome, str | InvalidCoreDump), (label, outcome)
    if isinstance(outcome, str):
        assert "\x1b" not in outcome
    assert measured.seconds < SECONDS, f"{label}: {measured.seconds:.3f} s"
    assert measured.peak < memory_budget(held), f"{label}: {measured.peak} bytes at the peak"


def _opened_reads(path: Path) -> int:
    with hostile.counting_reads() as counter, contextlib.suppress(InvalidCoreDump):
        CoreDump.open(path).close()
    return counter.read


def _identify(path: Path) -> tuple[bool, int]:
    with hostile.counting_reads() as counter:
        fd = os.open(path, os.O_RDONLY)
        try:
            found = is_hlasync_dump(fd)
        finally:
            os.close(fd)
    return found, counter.read


@settings(_SETTINGS, max_examples=fuzz_examples(150))
@given(data=st.data())
def test_mutated_dumps_give_a_report_or_invalid_core_dump_in_budget(
    real_core: Path, tmp_path: Path, data: st.DataObject
) -> None:
    blob = real_core.read_bytes()[: 2 * hostile.PAGE]  # headers and notes
    mutated, size = data.draw(_mutations(blob, real_core.stat().st_size))
    path = _write(tmp_path / "mutant.elf", mutated, size)
    label = f"{len(mutated)} bytes, {size} apparent"
    measured = measure(lambda: _exercise(path))
    event(f"outcome: {type(measured.outcome).__name__}")
    _check(measured, len(mutated), label)
    assert _opened_reads(path) <= len(mutated) + OPEN_READS, label
    found, read = _identify(path)
    assert read <= IDENTIFY_READS, label
    event(f"identified: {found}")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_FIELDS = ["format", "sandbox_id", "reason", "timestamp", "regions", "function", "message",
           "guest", "build_id", "vector", "vector_name", "error_code", "cr2", "pid",
           "js_stack", "js_stack_unavailable", "special_registers"]  # fmt: skip


@settings(_SETTINGS, max_examples=fuzz_examples(40))
@given(
    changes=st.dictionaries(
        st.sampled_from(_FIELDS),
        _JSON | st.sampled_from(["\x1b[2J", "/dev/zero", "/proc/self/mem", "a\x00b", "\u202e"]),
        min_size=1,
        max_size=4,
    )
)
def test_hostile_metadata_gives_a_report_or_invalid_core_dump(
    real_core: Path, tmp_path: Path, changes: dict[str, Any]
) -> None:
    path = hostile.with_metadata(
        real_core, tmp_path / "meta.elf", lambda meta: meta.update(changes)
    )
    held = path.stat().st_blocks * 512
    _check(measure(lambda: _exercise(path)), held, json.dumps(changes, default=str))


@st.composite
def _arbitrary(draw: st.DrawFn) -> bytes:
    """Any bytes, or any bytes after a valid x86-64 core header."""
    tail = draw(st.binary(max_size=2048))
    if draw(st.booleans()):
        return tail
    ident = fmt.ELFMAG + bytes([fmt.ELFCLASS64, fmt.ELFDATA2LSB, fmt.EV_CURRENT]) + bytes(9)
    header = fmt.EHDR.pack(
        ident, fmt.ET_CORE, fmt.EM_X86_64, fmt.EV_CURRENT, 0, fmt.EHDR.size, 0, 0,
        fmt.EHDR.size, fmt.PHDR.size, draw(st.integers(0, 0xFFFF)), 0, 0, 0,
    )  # fmt: skip
    return header + tail


@settings(_SETTINGS, max_examples=fuzz_examples(150))
@given(blob=_arbitrary(), stretch=st.sampled_from([0, 0, 1 << 20, 1 << 30]))
def test_arbitrary_bytes_give_invalid_core_dump_in_budget(
    tmp_path: Path, blob: bytes, stretch: int
) -> None:
    path = _write(tmp_path / "bytes.elf", blob, len(blob) + stretch)
    _check(measure(lambda: _exercise(path)), len(blob), f"{len(blob)} bytes")
    assert _opened_reads(path) <= len(blob) + OPEN_READS
    found, read = _identify(path)
    assert not found and read <= IDENTIFY_READS


def test_identification_of_real_and_planted_files(real_core: Path, tmp_path: Path) -> None:
    """A dump hlasync wrote is recognised, reading under 4 KiB; the planted
    file of issue 18 (4096 PT_NOTE of one hole) is not, reading as little."""
    assert _identify(real_core) == (True, _identify(real_core)[1])
    assert _identify(real_core)[1] < 4096
    plant = hostile.planted(tmp_path / "hl_core_planted.elf")
    found, read = _identify(plant)
    assert not found and read <= IDENTIFY_READS
    measured = measure(lambda: _identify(plant))
    assert measured.seconds < SECONDS and measured.peak < memory_budget(0)


def test_the_worst_case_table_runs(tmp_path: Path) -> None:
    """``python -m tests.fuzz.worst_cases_files`` (docs/security.md's numbers):
    every hostile file is refused with the documented error."""
    from tests.fuzz import worst_cases_files

    (tmp_path / "real").mkdir()
    rows = [row.split(" | ") for row in worst_cases_files.rows(tmp_path)]
    assert len(rows) >= 18 and all(len(cells) == 6 for cells in rows)
    for cells in rows:
        kind = cells[2].split(":", 1)[0]
        assert not kind.endswith(("Error", "Exception")) or kind == "PermissionError", cells
