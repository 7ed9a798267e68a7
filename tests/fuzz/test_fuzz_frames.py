"""Frames fuzzed: the guest's output-buffer frames (results, host calls, print
and abort messages; :mod:`hlasync.abi`) give a value or ``FrameError``, and the
worker channel's framing (:class:`hlasync.supervisor.channel.Decoder`) splits
any bytes, however they arrive, into the frames they hold or says the channel
is corrupt; each within a time and memory budget.

The channel's frame bodies are pickles, and only the supervisor's own worker
processes write them (trusted, see :mod:`hlasync.supervisor.channel`): the
framing is fuzzed with the unpickling replaced, never ``pickle`` itself."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any
from unittest import mock

from hypothesis import event, given, settings
from hypothesis import strategies as st

from hlasync import abi
from hlasync.abi import FrameError, ValueType
from hlasync.supervisor import channel
from tests.conftest import fuzz_examples
from tests.fuzz.budget import SECONDS, Measured, measure, memory_budget

_U32 = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
_U64 = st.one_of(
    st.integers(0, 4096), st.sampled_from([2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)
)
_SENDABLE = st.sampled_from([k for k in ValueType if k is not ValueType.VOID])
_KINDS = st.one_of(st.sampled_from(list(ValueType)), st.integers(0, 2**32 - 1))


_PAYLOADS = st.one_of(
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=40),
    st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\x1b[2J"]),
)


@st.composite
def _damaged(draw: st.DrawFn, frame: bytes) -> memoryview:
    """``frame`` in an output buffer, with a few of its header and slot fields
    overwritten (boundary values, garbage), sometimes cut short, then the
    rest of the buffer (zeros or leftovers)."""
    buffer = bytearray(frame)
    fields = min(len(buffer), 16 + 16 * abi.MAX_ARGS) // 4
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        if fields:
            at = 4 * draw(st.integers(0, fields - 1))
            struct.pack_into("<I", buffer, at, draw(_U32))
    if draw(st.integers(0, 9)) == 0:
        del buffer[draw(st.integers(0, len(buffer))) :]
    buffer += draw(st.sampled_from([0, 1, 64, 4096])) * draw(st.sampled_from([b"\0", b"\xff"]))
    return memoryview(buffer)


def _check(buffer: memoryview, measured: Measured) -> None:
    outcome = measured.outcome
    event("FrameError" if isinstance(outcome, FrameError) else type(outcome).__name__)
    assert not isinstance(outcome, Exception) or isinstance(outcome, FrameError), repr(outcome)
    assert measured.seconds < SECONDS, f"{len(buffer)} bytes took {measured.seconds:.3f} s"
    assert measured.peak < memory_budget(len(buffer)), f"{len(buffer)} bytes: {measured.peak}"


# ------------------------------------------------------------- guest frames
@st.composite
def _result_frames(draw: st.DrawFn) -> bytes:
    kind = draw(_KINDS)
    payload = draw(_PAYLOADS) if kind in (ValueType.STR, ValueType.BYTES) else b""
    status = draw(st.sampled_from([abi.STATUS_OK, abi.STATUS_OK, abi.STATUS_ERROR]))
    if status == abi.STATUS_ERROR:
        payload = draw(_PAYLOADS)
    header = abi.RESULT.pack(abi.MAGIC_RESULT, status, kind, len(payload), draw(_U64))
    return header + payload + b"\0"


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(data=st.data(), frame=_result_frames(), expected=st.sampled_from(list(ValueType)))
def test_result_frames_give_a_value_or_frame_error(
    data: st.DataObject, frame: bytes, expected: ValueType
) -> None:
    buffer = data.draw(_damaged(frame))
    measured = measure(lambda: abi.read_result(buffer, expected))
    _check(buffer, measured)
    if isinstance(measured.outcome, tuple):
        _, error = measured.outcome
        assert error is None or isinstance(error, str)


@st.composite
def _host_call_frames(draw: st.DrawFn) -> bytes:
    name = draw(st.one_of(st.text(min_size=1, max_size=20), st.just("f"))).encode(
        "utf-8", "surrogatepass"
    )
    kinds = draw(st.lists(st.one_of(_SENDABLE, _SENDABLE, _KINDS), max_size=abi.MAX_ARGS))
    payloads = [draw(_PAYLOADS) for _ in kinds]
    offset = abi.HEADER.size + abi.SLOT.size * len(kinds) + len(name)
    slots, data = b"", b""
    for kind, payload in zip(kinds, payloads, strict=True):
        if kind in (ValueType.STR, ValueType.BYTES):
            slots += abi.SLOT.pack(kind, len(payload), offset + len(data))
            data += payload
        else:
            slots += abi.SLOT.pack(kind, 0, draw(_U64))
    body = slots + name + data
    header = abi.HEADER.pack(abi.MAGIC_HOSTCALL, len(name), len(kinds), abi.HEADER.size + len(body))
    return header + body


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(data=st.data(), frame=_host_call_frames())
def test_host_call_frames_give_a_call_or_frame_error(data: st.DataObject, frame: bytes) -> None:
    buffer = data.draw(_damaged(frame))
    measured = measure(lambda: abi.read_host_call(buffer))
    _check(buffer, measured)
    call = measured.outcome
    if isinstance(call, abi.HostCall):
        assert call.name and len(call.args) <= abi.MAX_ARGS


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(
    data=st.data(),
    magic=st.sampled_from([abi.MAGIC_PRINT, abi.MAGIC_ABORT]),
    expected=st.sampled_from([abi.MAGIC_PRINT, abi.MAGIC_ABORT]),
    text=_PAYLOADS,
    code=st.integers(-(2**63), 2**63 - 1),
)
def test_message_frames_give_a_message_or_frame_error(
    data: st.DataObject, magic: int, expected: int, text: bytes, code: int
) -> None:
    buffer = data.draw(_damaged(abi.MESSAGE.pack(magic, len(text), code) + text + b"\0"))
    measured = measure(lambda: abi.read_message(buffer, expected))
    _check(buffer, measured)


# ---------------------------------------------------------- worker channel
class _Bodies:
    """Stands for ``pickle`` in the channel: a frame's body comes out as itself."""

    @staticmethod
    def loads(body: bytes) -> list[bytes]:
        return [body]


def _split(stream: bytes) -> tuple[list[bytes], bool]:
    """The frames in ``stream``, read independently of the channel, and whether
    a length in it says the channel is corrupt."""
    frames: list[bytes] = []
    at = 0
    while len(stream) - at >= 4:
        (length,) = struct.unpack_from("<I", stream, at)
        if length > channel.MAX_FRAME:
            return frames, True
        if len(stream) - at - 4 < length:
            break
        frames.append(stream[at + 4 : at + 4 + length])
        at += 4 + length
    return frames, False


def _chunks(stream: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}):
        yield stream[start:cut]
        start = cut
    yield stream[start:]


def _framed(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


_PIECES = st.one_of(
    st.binary(max_size=64).map(_framed),  # a frame
    st.binary(max_size=8),  # anything: a length that lies, half a header
    st.sampled_from([struct.pack("<I", channel.MAX_FRAME + 1), struct.pack("<I", 2**32 - 1)]),
)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(pieces=st.lists(_PIECES, max_size=12), cuts=st.lists(st.integers(0, 2**16), max_size=8))
def test_the_channel_splits_any_bytes_into_their_frames(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces)
    expected, corrupt = _split(stream)

    def receive() -> tuple[list[Any], bool]:
        decoder = channel.Decoder[Any]()
        frames: list[Any] = []
        try:
            for chunk in _chunks(stream, cuts):
                for batch in decoder.feed(chunk):
                    frames.extend(batch)
        except ValueError as exc:
            assert "corrupt" in str(exc)
            return frames, True
        return frames, False

    with mock.patch.object(channel, "pickle", _Bodies):
        measured = measure(receive)
    assert not isinstance(measured.outcome, Exception), repr(measured.outcome)
    assert measured.outcome == (expected, corrupt)
    assert measured.seconds < SECONDS
    assert measured.peak < memory_budget(len(stream))


_VALUES = st.recursive(
    st.none() | st.integers() | st.binary(max_size=40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=10,
)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(
    batches=st.lists(st.lists(_VALUES, max_size=4), max_size=6),
    cuts=st.lists(st.integers(0, 2**12), max_size=10),
)
def test_batches_arrive_as_sent_however_the_stream_is_cut(
    batches: list[list[Any]], cuts: list[int]
) -> None:
    stream = b"".join(channel.encode(batch) for batch in batches)
    decoder = channel.Decoder[Any]()
    received = [batch for chunk in _chunks(stream, cuts) for batch in decoder.feed(chunk)]
    assert received == batches
