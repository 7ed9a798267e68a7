"""The host/guest ABI: constants agree with the C header, frames are bounds-checked."""

from __future__ import annotations

import contextlib
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlasync import abi
from hlasync._build import sdk_dir
from hlasync.abi import FrameError, FunctionSignature, ValueType
from tests.conftest import fuzz_examples


def test_header_constants_match_python() -> None:
    header = (sdk_dir() / "include" / "hlasync_guest.h").read_text()
    defines = dict(re.findall(r"#define HL_([A-Z0-9_]+) (0x[0-9a-fA-F]+|\d+)", header))
    assert len(defines) > 20
    for name, value in defines.items():
        if name in ("VOID", "INT", "FLOAT", "BOOL", "STR", "BYTES"):
            assert int(value, 0) == ValueType[name], name
        else:
            assert int(value, 0) == getattr(abi, name), name


def test_call_frame_layout() -> None:
    signature = FunctionSignature(
        "f", 3, (ValueType.INT, ValueType.STR, ValueType.FLOAT), ValueType.INT, 0
    )
    buffer = memoryview(bytearray(256))
    size = abi.make_call_encoder(signature)(buffer, (-2, "hi", 0.5))
    magic, index, argc, total = struct.unpack_from("<IIII", buffer, 0)
    assert (magic, index, argc, total) == (abi.MAGIC_CALL, 3, 3, size)
    assert struct.unpack_from("<IIq", buffer, 16) == (ValueType.INT, 0, -2)
    kind, length, offset = struct.unpack_from("<IIQ", buffer, 32)
    assert (kind, length) == (ValueType.STR, 2)
    assert bytes(buffer[offset : offset + 3]) == b"hi\0"
    assert struct.unpack_from("<IId", buffer, 48) == (ValueType.FLOAT, 0, 0.5)


def test_encoder_refuses_small_buffers() -> None:
    signature = FunctionSignature("f", 0, (ValueType.BYTES,), ValueType.VOID, 0)
    with pytest.raises(ValueError):
        abi.make_call_encoder(signature)(memoryview(bytearray(64)), (bytes(100),))


@pytest.mark.parametrize(
    "value", [0, -1, 2**63 - 1, -(2**63), 1.25, True, False, "", "ü", b"", b"\0x", None]
)
def test_result_round_trip(value: abi.Value) -> None:
    buffer = memoryview(bytearray(128))
    abi.write_result(buffer, value)
    decoded, error = abi.read_result(buffer, abi.infer_type(value))
    assert error is None and decoded == value and type(decoded) is type(value)


def test_result_type_mismatch_is_a_frame_error() -> None:
    buffer = memoryview(bytearray(64))
    abi.write_result(buffer, 5)
    with pytest.raises(FrameError, match="does not match"):
        abi.read_result(buffer, ValueType.STR)


def test_write_result_refuses_unencodable_values() -> None:
    buffer = memoryview(bytearray(64))
    for bad in (object(), 2**64, [1]):
        with pytest.raises(TypeError):
            abi.write_result(buffer, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        abi.write_result(buffer, bytes(100))


def _hostcall(
    name: bytes, slots: list[tuple[int, int, int]], data: bytes, total: int | None = None
) -> memoryview:
    buffer = bytearray(512)
    body = b"".join(struct.pack("<IIQ", *s) for s in slots) + name + data
    size = 16 + len(body) if total is None else total
    struct.pack_into("<IIII", buffer, 0, abi.MAGIC_HOSTCALL, len(name), len(slots), size)
    buffer[16 : 16 + len(body)] = body
    return memoryview(buffer)


def test_host_call_frame_decodes() -> None:
    name_end = 16 + 2 * 16 + 3
    frame = _hostcall(b"dbl", [(ValueType.INT, 0, 2**64 - 5), (ValueType.STR, 2, name_end)], b"ok")
    call = abi.read_host_call(frame)
    assert call.name == "dbl" and call.args == (-5, "ok")


@pytest.mark.parametrize(
    "frame",
    [
        _hostcall(b"x", [(ValueType.STR, 10, 0)], b""),  # argument overlaps the header
        _hostcall(b"x", [(ValueType.BYTES, 400, 33)], b""),  # past the frame
        _hostcall(b"x", [(9, 0, 0)], b""),  # unknown type
        _hostcall(b"x", [(ValueType.VOID, 0, 0)], b""),
        _hostcall(b"", [], b""),  # empty name
        _hostcall(b"\xff\xfe", [], b""),  # not UTF-8
        _hostcall(b"x", [], b"", total=4096),  # larger than the buffer
        _hostcall(b"x", [(ValueType.INT, 0, 0)] * 9, b""),  # too many arguments
    ],
)
def test_malformed_host_calls_are_frame_errors(frame: memoryview) -> None:
    with pytest.raises(FrameError):
        abi.read_host_call(frame)


@settings(max_examples=fuzz_examples(500), deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_decoders_only_raise_frame_errors(data: bytes) -> None:
    buffer = memoryview(bytearray(data))
    for decode in (
        lambda: abi.read_host_call(buffer),
        lambda: abi.read_result(buffer, ValueType.BYTES),
        lambda: abi.read_result(buffer, ValueType.INT),
        lambda: abi.read_message(buffer, abi.MAGIC_PRINT),
    ):
        with contextlib.suppress(FrameError):
            decode()


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    st.lists(
        st.sampled_from([ValueType.INT, ValueType.STR, ValueType.BYTES, ValueType.FLOAT]),
        max_size=4,
    ),
    st.integers(abi.INT64_MIN, abi.INT64_MAX),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=50),
)
def test_host_call_args_survive_encoding(types: list[ValueType], number: int, text: str) -> None:
    values = {
        ValueType.INT: number,
        ValueType.STR: text,
        ValueType.BYTES: text.encode(),
        ValueType.FLOAT: 0.25,
    }
    args = [values[t] for t in types]
    name = b"fn"
    data = b""
    slots = []
    offset = 16 + 16 * len(types) + len(name)
    for kind, value in zip(types, args, strict=True):
        if kind is ValueType.INT:
            slots.append((int(kind), 0, number & (2**64 - 1)))
        elif kind is ValueType.FLOAT:
            slots.append((int(kind), 0, abi.float_bits(0.25)))
        else:
            blob = value.encode() if isinstance(value, str) else value
            assert isinstance(blob, bytes)
            slots.append((int(kind), len(blob), offset + len(data)))
            data += blob
    buffer = bytearray(4096)
    body = b"".join(struct.pack("<IIQ", *s) for s in slots) + name + data
    struct.pack_into("<IIII", buffer, 0, abi.MAGIC_HOSTCALL, len(name), len(types), 16 + len(body))
    buffer[16 : 16 + len(body)] = body
    assert abi.read_host_call(memoryview(buffer)).args == tuple(args)
