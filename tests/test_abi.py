"""The host/guest ABI: constants agree with the C header, frames are bounds-checked."""

from __future__ import annotations

import contextlib
import pickle
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlasync import abi
from hlasync._build import sdk_dir
from hlasync.abi import FrameError, FunctionSignature, ValueType
from tests.conftest import fuzz_examples

_RESULT_TYPES = "int, float, bool, str, bytes or None"


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


def _signature(*params: ValueType) -> FunctionSignature:
    return FunctionSignature("f", 1, params, ValueType.VOID, 0)


def test_encoder_writes_nothing_when_a_later_argument_does_not_fit() -> None:
    # The first string fits, the second does not: before the fix the first was
    # already in the buffer (guest memory) when the error was raised.
    buffer = memoryview(bytearray(b"\xaa" * 4096))
    encode = abi.make_call_encoder(_signature(ValueType.STR, ValueType.BYTES))
    with pytest.raises(abi.EncodeError) as info:
        encode(buffer, ("secret" * 100, bytes(5000)))
    assert bytes(buffer) == b"\xaa" * 4096
    needed = 16 + 2 * 16 + 608 + 5008  # header, slots, "secret"*100 + NUL, 5000 + NUL, aligned
    assert (info.value.needed, info.value.available) == (needed, 4096)
    assert str(info.value) == f"arguments need {needed:,} bytes; the input buffer holds 4,096"
    assert isinstance(info.value, ValueError)


def test_int_encoder_says_what_it_needs() -> None:
    buffer = memoryview(bytearray(b"\xaa" * 64))
    with pytest.raises(abi.EncodeError) as info:
        abi.make_call_encoder(_signature(*[ValueType.INT] * 8))(buffer, tuple(range(8)))
    assert (info.value.needed, info.value.available) == (16 + 8 * 16, 64)
    assert bytes(buffer) == b"\xaa" * 64


def test_encode_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(abi.EncodeError(307_212, 262_144)))
    assert (error.needed, error.available) == (307_212, 262_144)
    assert str(error) == "arguments need 307,212 bytes; the input buffer holds 262,144"


_ARGUMENTS: dict[ValueType, st.SearchStrategy[object]] = {
    ValueType.INT: st.integers(abi.INT64_MIN, abi.INT64_MAX),
    ValueType.BOOL: st.booleans(),
    ValueType.FLOAT: st.floats(allow_nan=False),
    ValueType.STR: st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=300
    ),
    ValueType.BYTES: st.binary(max_size=300),
}


@st.composite
def _calls(draw: st.DrawFn) -> tuple[FunctionSignature, tuple[object, ...]]:
    params = draw(st.lists(st.sampled_from(list(_ARGUMENTS)), max_size=abi.MAX_ARGS))
    return _signature(*params), tuple(draw(_ARGUMENTS[p]) for p in params)


def _decode_call(buffer: memoryview, signature: FunctionSignature) -> tuple[object, ...]:
    """Read a call frame back the way the guest's dispatcher does."""
    magic, index, argc, _ = struct.unpack_from("<IIII", buffer, 0)
    assert (magic, index, argc) == (abi.MAGIC_CALL, signature.index, len(signature.params))
    values: list[object] = []
    for i, expected in enumerate(signature.params):
        kind, length, value = struct.unpack_from("<IIQ", buffer, 16 + 16 * i)
        assert kind == expected
        if kind in (ValueType.STR, ValueType.BYTES):
            assert buffer[value + length] == 0 and value % 8 == 0
            data = bytes(buffer[value : value + length])
            values.append(data.decode() if kind == ValueType.STR else data)
        else:
            values.append(abi.decode_payload(kind, value, b""))
    return tuple(values)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(_calls(), st.integers(0, 3000))
def test_encoder_writes_a_whole_frame_or_nothing(
    call: tuple[FunctionSignature, tuple[object, ...]], size: int
) -> None:
    signature, args = call
    encode = abi.make_call_encoder(signature)
    roomy = memoryview(bytearray(1 << 16))
    frame_size = encode(roomy, args)
    assert _decode_call(roomy, signature) == args
    buffer = memoryview(bytearray(b"\xaa" * size))
    try:
        written = encode(buffer, args)
    except abi.EncodeError as exc:
        assert (exc.needed, exc.available) == (frame_size, size)
        assert frame_size > size
        assert bytes(buffer) == b"\xaa" * size  # untouched
    else:
        assert written == frame_size <= size
        assert bytes(buffer[:written]) == bytes(roomy[:written])
        assert bytes(buffer[written:]) == b"\xaa" * (size - written)  # nothing past the frame


@pytest.mark.parametrize(
    ("value", "index"), [("a\ud800b", 1), ("\udfff", 0), ("üx\udc80", 2), ("\ud83d\ude00", 0)]
)
def test_lone_surrogates_are_reported_as_encoding_problems(value: str, index: int) -> None:
    problem = abi.check_value(ValueType.STR, value)
    assert problem == (
        f"str is not valid UTF-8 text: lone surrogate {value[index]!r} at index {index}"
    )


def test_valid_text_is_accepted() -> None:
    for value in ("", "plain", "ü€😀", "x" * 100_000):
        assert abi.check_value(ValueType.STR, value) is None


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


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [
        ([1], TypeError, "returned a list; host functions may return " + _RESULT_TYPES),
        (object(), TypeError, "returned an object; host functions may return " + _RESULT_TYPES),
        ({}, TypeError, "returned a dict; host functions may return " + _RESULT_TYPES),
        (2**64, TypeError, "returned an int outside the signed 64-bit range"),
        (10**5000, TypeError, "returned an int outside the signed 64-bit range"),
        ("a\0b", ValueError, "returned a str that contains a NUL character"),
        ("a\ud800b", ValueError, "returned a str that is not valid UTF-8 text: lone surrogate"),
        (bytes(100), abi.EncodeError, "result needs 125 bytes; the output buffer holds 64"),
        ("é" * 50, abi.EncodeError, "result needs 125 bytes; the output buffer holds 64"),
    ],
    ids=[
        "list",
        "object",
        "dict",
        "big-int",
        "huge-int",
        "nul",
        "surrogate",
        "big-bytes",
        "big-str",
    ],
)
def test_write_result_explains_and_writes_nothing(
    value: object, kind: type[Exception], message: str
) -> None:
    buffer = memoryview(bytearray(b"\xaa" * 64))
    with pytest.raises(kind) as info:
        abi.write_result(buffer, value)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)
    assert bytes(buffer) == b"\xaa" * 64


def test_oversized_result_says_what_it_needs() -> None:
    with pytest.raises(abi.EncodeError) as info:
        abi.write_result(memoryview(bytearray(4096)), b"x" * 5000)
    assert (info.value.needed, info.value.available) == (24 + 5000 + 1, 4096)


@pytest.mark.parametrize(
    "value", [None, True, 0, -(2**63), 2**63 - 1, 1.5, "", "ü", b"", bytearray(3), memoryview(b"x")]
)
def test_sendable_results_have_no_problem(value: object) -> None:
    assert abi.describe_unsendable(value) is None
    abi.infer_type(value)


def test_infer_type_says_what_the_host_function_returned() -> None:
    with pytest.raises(TypeError, match=r"^returned a tuple; host functions may return int, "):
        abi.infer_type((1, 2))


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=80),  # lone surrogates and NULs included
        st.binary(max_size=80),
        st.lists(st.integers(), max_size=2),
    ),
    st.integers(0, 120),
)
def test_write_result_writes_a_whole_frame_or_nothing(value: object, size: int) -> None:
    buffer = memoryview(bytearray(b"\xaa" * size))
    try:
        written = abi.write_result(buffer, value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        assert bytes(buffer) == b"\xaa" * size
        assert isinstance(exc, abi.EncodeError) or str(exc).startswith("returned ")
    else:
        assert bytes(buffer[written:]) == b"\xaa" * (size - written)
        decoded, error = abi.read_result(buffer, abi.infer_type(value))
        assert error is None
        assert decoded == value or decoded != decoded  # NaN


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
