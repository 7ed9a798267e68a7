"""Choosing the compiler, and what each one builds: a guest that loads (W^X,
build-id note in the headers segment, entry point), has unwind tables and
runs, with gcc and with the pinned zig cc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from hlasync import Sandbox
from hlasync._build import GuestBuildError, build_bundled, build_guest, bundled_sources, toolchain
from hlasync.guest.image import GuestImage
from hlasync.kvm import Kvm
from tests.conftest import require_tool

PINNED = toolchain.describe("zig")


def test_the_order_of_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    require_tool("gcc")
    gcc = toolchain.describe("gcc")
    assert "gcc" in gcc and gcc != PINNED
    monkeypatch.setenv("CC", "zig")
    monkeypatch.setenv("HLASYNC_CC", "gcc")
    assert toolchain.describe() == gcc  # HLASYNC_CC before CC
    assert toolchain.describe("zig") == PINNED  # --cc before both
    monkeypatch.delenv("HLASYNC_CC")
    assert toolchain.describe() == PINNED  # then CC
    monkeypatch.delenv("CC")
    assert toolchain.describe() == gcc  # then gcc, when it is on PATH
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without gcc
    assert toolchain.describe() == PINNED


def test_an_unknown_compiler_says_what_to_do() -> None:
    with pytest.raises(GuestBuildError, match=r"not found: install gcc .* --cc zig"):
        toolchain.select("no-such-compiler-cc")


@pytest.mark.parametrize("cc", ["gcc", "zig"])
def test_each_compiler_builds_a_guest_that_loads_and_runs(
    kvm: Kvm, tmp_path: Path, cc: str
) -> None:
    if cc == "gcc":
        require_tool("gcc")
    elf = build_guest([bundled_sources()["simpleguest"]], tmp_path / f"{cc}.elf", cc=cc)
    image = GuestImage.load(elf)  # segments, W^X and the function table are checked here
    with open(elf, "rb") as handle:
        reader = ELFFile(handle)
        producer = next(reader.get_dwarf_info().iter_CUs()).get_top_DIE().attributes
        compiler = producer["DW_AT_producer"].value.decode()
        assert ("clang" in compiler) == (cc == "zig")
        symbols: Any = reader.get_section_by_name(".symtab")
        eh_frame: Any = reader.get_section_by_name(".eh_frame")
        assert reader.header.e_entry == symbols.get_symbol_by_name("_hl_start")[0]["st_value"]
        assert eh_frame.data_size > 0  # CFI for unwinders
        headers, note = reader.get_segment(0), reader.get_segment(reader.num_segments() - 1)
        assert note.header.p_type == "PT_NOTE"
        assert headers.header.p_vaddr <= note.header.p_vaddr < headers.header.p_vaddr + 4096
    assert image.build_id is not None
    with Sandbox(elf) as sb:
        assert sb.call("add", 2, 3) == 5
        assert sb.call("heap_roundtrip", 5000) == sum(i % 256 for i in range(5000))
        assert sb.call("fib", 20) == 6765


def test_a_change_of_compiler_rebuilds_the_bundled_guests(tmp_path: Path) -> None:
    require_tool("gcc")
    built = build_bundled(tmp_path, names=["simpleguest"], cc="gcc")
    assert built == [tmp_path / "simpleguest.elf"]
    assert build_bundled(tmp_path, only_stale=True, names=["simpleguest"], cc="gcc") == []
    assert build_bundled(tmp_path, only_stale=True, names=["simpleguest"], cc="zig") == built
