"""Loading guest images: the bundled guest, and every kind of bad file."""

from __future__ import annotations

import contextlib
import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlasync import GuestImage, GuestImageError, Sandbox, SandboxConfig, ValueType, abi
from hlasync._build import build_guest
from hlasync.kvm import Kvm
from tests.conftest import fuzz_examples


def _write(tmp_path: Path, data: bytes, name: str = "guest.elf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_bundled_guest_loads(simpleguest: Path) -> None:
    image = GuestImage.load(simpleguest)
    assert image.entry == image.symbol_at(image.entry).address  # type: ignore[union-attr]
    assert image.symbolize(image.entry) == "_hl_start"
    names = [fn.name for fn in image.functions]
    assert names.index("add") == image.function("add").index  # type: ignore[union-attr]
    assert image.function("echo_bytes").params == (ValueType.BYTES,)  # type: ignore[union-attr]
    assert GuestImage.load(simpleguest) is image  # cached per file version


def test_build_id_identifies_the_build_and_loads_with_the_headers(
    tmp_path: Path, simpleguest: Path
) -> None:
    image = GuestImage.load(simpleguest)
    assert image.build_id is not None and len(image.build_id) == 40  # --build-id=sha1
    readelf = subprocess.run(
        ["readelf", "-n", str(simpleguest)], capture_output=True, text=True, check=True
    )
    assert f"Build ID: {image.build_id}" in readelf.stdout
    # The note lies in the first loaded segment, so it is in guest memory (and in dumps).
    headers = image.segments[0]
    assert headers.vaddr == abi.IMAGE_BASE and bytes.fromhex(image.build_id) in headers.data
    source = tmp_path / "other.c"
    source.write_text(
        "#include <hlasync_guest.h>\nint64_t one(void) { return 1; }\nHL_EXPORT(one, HL_INT);\n"
    )
    other = GuestImage.load(build_guest([source], tmp_path / "other.elf"))
    assert other.build_id is not None and other.build_id != image.build_id
    bare = build_guest([source], tmp_path / "bare.elf", extra_flags=["-Wl,--build-id=none"])
    assert GuestImage.load(bare).build_id is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError, match="cannot read"):
        GuestImage.load(tmp_path / "absent.elf")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError):
        GuestImage.load(tmp_path)


@pytest.mark.parametrize("data", [b"", b"\x7fEL", b"MZ\x90\x00" * 100, b"\x7fELF" + bytes(60)])
def test_garbage_is_rejected(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(GuestImageError):
        GuestImage.load(_write(tmp_path, data))


def test_random_bytes_are_rejected(tmp_path: Path) -> None:
    rng = random.Random(3)
    for i in range(200):
        data = rng.randbytes(rng.randrange(0, 4096))
        if i % 2:
            data = b"\x7fELF" + data
        with pytest.raises(GuestImageError):
            GuestImage.load(_write(tmp_path, data, f"r{i}.elf"))


def test_truncated_guest_is_rejected(tmp_path: Path, simpleguest: Path) -> None:
    data = simpleguest.read_bytes()
    for cut in [16, 64, 100, 200, 0x1000, 0x3000, len(data) // 2, len(data) - 100]:
        with pytest.raises(GuestImageError):
            GuestImage.load(_write(tmp_path, data[:cut], f"cut{cut}.elf"))


def test_host_executables_are_rejected_with_reason(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError, match=r"ET_EXEC|dynamically linked|outside"):
        GuestImage.load("/bin/true")


def test_wrong_machine_is_rejected(tmp_path: Path, simpleguest: Path) -> None:
    data = bytearray(simpleguest.read_bytes())
    struct.pack_into("<H", data, 18, 0xB7)  # EM_AARCH64
    with pytest.raises(GuestImageError, match="EM_X86_64"):
        GuestImage.load(_write(tmp_path, bytes(data)))


def test_shared_object_type_is_rejected(tmp_path: Path, simpleguest: Path) -> None:
    data = bytearray(simpleguest.read_bytes())
    struct.pack_into("<H", data, 16, 3)  # ET_DYN
    with pytest.raises(GuestImageError, match="ET_EXEC"):
        GuestImage.load(_write(tmp_path, bytes(data)))


def _phdr_offsets(data: bytes) -> list[int]:
    """File offsets of the PT_LOAD program headers."""
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    offsets = [phoff + i * phentsize for i in range(phnum)]
    return [offset for offset in offsets if struct.unpack_from("<I", data, offset)[0] == 1]


def test_overlapping_segments_are_rejected(tmp_path: Path, simpleguest: Path) -> None:
    data = bytearray(simpleguest.read_bytes())
    first, second = _phdr_offsets(bytes(data))[:2]
    (vaddr,) = struct.unpack_from("<Q", data, first + 16)
    struct.pack_into("<Q", data, second + 16, vaddr)  # second segment on top of the first
    with pytest.raises(GuestImageError, match="overlap"):
        GuestImage.load(_write(tmp_path, bytes(data)))


def test_segment_outside_guest_area_is_rejected(tmp_path: Path, simpleguest: Path) -> None:
    data = bytearray(simpleguest.read_bytes())
    struct.pack_into("<Q", data, _phdr_offsets(bytes(data))[0] + 16, 0x1000)  # over page tables
    with pytest.raises(GuestImageError, match="outside the guest image area"):
        GuestImage.load(_write(tmp_path, bytes(data)))


def test_segment_past_end_of_file_is_rejected(tmp_path: Path, simpleguest: Path) -> None:
    data = bytearray(simpleguest.read_bytes())
    struct.pack_into("<Q", data, _phdr_offsets(bytes(data))[1] + 32, 1 << 30)  # p_filesz
    struct.pack_into("<Q", data, _phdr_offsets(bytes(data))[1] + 40, 1 << 30)  # p_memsz
    with pytest.raises(GuestImageError, match="past the end of the file"):
        GuestImage.load(_write(tmp_path, bytes(data)))


def test_image_too_large_for_memory(kvm: Kvm, tmp_path: Path, simpleguest: Path) -> None:
    data = bytearray(simpleguest.read_bytes())
    last = _phdr_offsets(bytes(data))[-1]
    struct.pack_into("<Q", data, last + 40, 40 << 20)  # .bss of 40 MiB
    path = _write(tmp_path, bytes(data))
    with pytest.raises(GuestImageError, match="more than memory_size"):
        Sandbox(path, SandboxConfig(memory_size=8 << 20))


@settings(
    max_examples=fuzz_examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_mutated_guest_never_escapes_the_error_tree(
    tmp_path: Path, simpleguest: Path, data: st.DataObject
) -> None:
    image = bytearray(simpleguest.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        offset = data.draw(st.integers(0, min(len(image) - 1, 0x4000)))
        image[offset] = data.draw(st.integers(0, 255))
    path = _write(tmp_path, bytes(image), "mutant.elf")
    with contextlib.suppress(GuestImageError):
        GuestImage.load(path)
