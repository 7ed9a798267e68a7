"""Host <-> guest call encoding (the contract with ``guest/sdk``).

Values cross the boundary as 16-byte slots ``{u32 type, u32 length, u64 value}``;
strings and bytes live after the slots and the slot holds their offset from
the start of the buffer. Every length and offset read from the guest is
checked against the buffer it claims to be in: a bad frame raises
:class:`FrameError`, which the sandbox turns into ``GuestProtocolError``.

Frames the host writes into guest memory (calls, host function results) are
sized first and written whole or not at all: a frame that does not fit raises
:class:`EncodeError` and leaves the buffer untouched, so no half-written
argument of one caller is left for the next one to read.

The constants mirror ``guest/sdk/include/hlasync_guest.h`` (a test keeps them equal).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

ABI_VERSION = 1
IMAGE_BASE = 0x100000
SCRATCH_ADDR = 0x101000
SCRATCH_SIZE = 0x1000
PEB_ADDR = 0xF0000
#: The doorbell page (``hl_doorbell`` in the SDK): calls without a VM exit.
DOORBELL_ADDR = 0xF1000
DOORBELL_REQ_SEQ = DOORBELL_ADDR + 0x00  # host -> guest
DOORBELL_SPIN = DOORBELL_ADDR + 0x08  # host -> guest: TSC ticks to spin
DOORBELL_ANSWER_SEQ = DOORBELL_ADDR + 0x10  # host -> guest: the latest ask answered
DOORBELL_ANSWER_SPIN = DOORBELL_ADDR + 0x18  # host -> guest: TSC ticks to wait for one
DOORBELL_PARK = DOORBELL_ADDR + 0x20  # host -> guest: park after this call (FEATURE_PARK)
DOORBELL_GO = DOORBELL_ADDR + 0x28  # host -> guest: leave the park with this token
DOORBELL_DONE_SEQ = DOORBELL_ADDR + 0x40  # guest -> host
DOORBELL_SPINNING = DOORBELL_ADDR + 0x48  # guest -> host
DOORBELL_ASK_SEQ = DOORBELL_ADDR + 0x50  # guest -> host: a host call or print asked
DOORBELL_ASK_PORT = DOORBELL_ADDR + 0x58  # guest -> host: PORT_HOSTCALL or PORT_PRINT
DOORBELL_PARKED = DOORBELL_ADDR + 0x60  # guest -> host: the token of the park it waits in
#: The same fields as indexes of the page's 64-bit words. The host reads and
#: writes them as whole words (``memoryview.cast("Q")``: one 8-byte access each),
#: never byte by byte: a running guest must not see a half-written value.
WORD_REQ_SEQ, WORD_SPIN, WORD_ANSWER_SEQ, WORD_ANSWER_SPIN = 0, 1, 2, 3
WORD_DONE_SEQ, WORD_SPINNING, WORD_ASK_SEQ, WORD_ASK_PORT = 8, 9, 10, 11
WORD_PARK, WORD_GO, WORD_PARKED = 4, 5, 12
#: Byte offsets hl_park's assembly uses: of doorbell words, and of the PEB's stack top.
BELL_SPIN, BELL_GO, BELL_PARKED = 8 * WORD_SPIN, 8 * WORD_GO, 8 * WORD_PARKED
PEB_STACK_TOP = 0x40
#: The PEB word saying which XSAVE components hl_park resets (written by the host
#: after the guest's initialisation): of XCR0, x87, SSE, AVX, MPX and AVX-512
#: (never PKRU or the components that need a permission first).
PEB_XSAVE_MASK = 0x58
PARK_XSTATE = 0xFF
#: The PEB word saying whether hl_park zeroes the FS and GS bases with wrfsbase.
PEB_FSGSBASE = 0x60
#: The PEB word with the data segment selectors hl_park puts back.
PEB_SEGMENTS = 0x68
#: Ready-frame feature bits.
FEATURE_DOORBELL = 1
FEATURE_PARK = 2  # the dispatcher parks in hl_park after a call when WORD_PARK says so

PORT_RETURN = 0x10
PORT_HOSTCALL = 0x11
PORT_PRINT = 0x12
PORT_ABORT = 0x13
PORT_WAIT = 0x14  # the guest waits for the answer to a doorbell ask
PORT_PARKED = 0x15  # hl_park waits for the host's go (its spin is over)
PORT_EXCEPTION_BASE = 0xE0  # + vector, written by the CPL0 exception stubs

MAGIC_PEB = 0x31424550484C
MAGIC_READY = 0x5944524C
MAGIC_CALL = 0x4C4C434C
MAGIC_RESULT = 0x5453524C
MAGIC_HOSTCALL = 0x5453484C
MAGIC_PRINT = 0x5452504C
MAGIC_ABORT = 0x5442414C

STATUS_OK = 0
STATUS_ERROR = 1

MAX_ARGS = 8
NAME_MAX = 39
INT_REGISTERS = 6
FLOAT_REGISTERS = 8
FUNCTION_RECORD_SIZE = 64

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class ValueType(enum.IntEnum):
    """A type that crosses the host/guest boundary."""

    VOID = 0
    INT = 1
    FLOAT = 2
    BOOL = 3
    STR = 4
    BYTES = 5

    @property
    def python_name(self) -> str:
        return _PYTHON_NAMES[self]


_PYTHON_NAMES = {
    ValueType.VOID: "None",
    ValueType.INT: "int",
    ValueType.FLOAT: "float",
    ValueType.BOOL: "bool",
    ValueType.STR: "str",
    ValueType.BYTES: "bytes",
}

Value: TypeAlias = int | float | bool | str | bytes | None
#: What a call accepts for each parameter type (bytes-like objects for BYTES).
Arg: TypeAlias = Value | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class FunctionSignature:
    """A guest function as declared by ``HL_EXPORT`` in the guest ELF."""

    name: str
    index: int
    params: tuple[ValueType, ...]
    returns: ValueType
    address: int

    def __str__(self) -> str:
        params = ", ".join(p.python_name for p in self.params)
        return f"{self.name}({params}) -> {self.returns.python_name}"


class FrameError(Exception):
    """A frame from the guest is malformed; the message says how."""


class EncodeError(ValueError):
    """A frame the host writes does not fit its buffer; nothing was written.

    ``needed`` is the frame's size in bytes and ``available`` the buffer's, so
    the caller can name the configuration value to raise and by how much.
    """

    def __init__(
        self, needed: int, available: int, subject: str = "arguments", buffer: str = "input"
    ) -> None:
        verb = "need" if subject.endswith("s") else "needs"
        super().__init__(
            f"{subject} {verb} {needed:,} bytes; the {buffer} buffer holds {available:,}"
        )
        self.needed = needed
        self.available = available
        self._naming = (subject, buffer)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.needed, self.available, *self._naming)


HEADER = struct.Struct("<IIII")  # magic, a, b, size/length
SLOT = struct.Struct("<IIQ")
RESULT = struct.Struct("<IIIIQ")  # magic, status, type, length, value
MESSAGE = struct.Struct("<IIq")  # magic, length, code
READY = struct.Struct("<IIII")  # magic, abi version, function count, features
#: After READY, from a guest with FEATURE_PARK: XCR0 as its code sees it (0: no
#: xgetbv), whether it may run rdfsbase (1) or not (0), and its data segment
#: selectors (ds, es, fs, gs, 16 bits each: what its code reads, which under
#: PVM is not what KVM_GET_SREGS says).
READY_CAN_SET = struct.Struct("<QQQ")
PEB = struct.Struct("<14Q")
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


def float_bits(value: float) -> int:
    return _U64.unpack(_F64.pack(value))[0]  # type: ignore[no-any-return]


def bits_float(bits: int) -> float:
    return _F64.unpack(_U64.pack(bits & 0xFFFF_FFFF_FFFF_FFFF))[0]  # type: ignore[no-any-return]


def signed64(bits: int) -> int:
    return bits - (1 << 64) if bits & (1 << 63) else bits


# ---------------------------------------------------------------- checking
def check_value(kind: ValueType, value: object) -> str | None:
    """None if ``value`` is acceptable as ``kind``, else why not."""
    if kind is ValueType.INT:
        if type(value) is bool or not isinstance(value, int):
            return f"expected int, got {type(value).__name__}"
        if not INT64_MIN <= value <= INT64_MAX:
            return "int out of the signed 64-bit range"
    elif kind is ValueType.FLOAT:
        if type(value) is bool or not isinstance(value, (int, float)):
            return f"expected float, got {type(value).__name__}"
    elif kind is ValueType.BOOL:
        if type(value) is not bool:
            return f"expected bool, got {type(value).__name__}"
    elif kind is ValueType.STR:
        if not isinstance(value, str):
            return f"expected str, got {type(value).__name__}"
        return _text_problem(value)
    elif kind is ValueType.BYTES:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            return f"expected bytes, got {type(value).__name__}"
    else:
        return "void is not a value"
    return None


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot cross as a guest string (NUL-terminated UTF-8), or None.

    Checked up front so that a str the encoder cannot write is reported as what
    it is, not later as an encoding failure or a buffer that is too small.
    """
    if "\0" in text:
        return "str contains a NUL character (guests see NUL-terminated strings)"
    if text.isascii():  # O(1) in CPython: ASCII text is always valid UTF-8
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return (
            f"str is not valid UTF-8 text: lone surrogate {text[exc.start]!r} at index {exc.start}"
        )
    return None


_RESULT_TYPES = "int, float, bool, str, bytes or None"


def describe_unsendable(value: object) -> str | None:
    """None if a host function may return ``value`` (its size aside), else why
    not, phrased after the function's name: ``"returned a list; host functions
    may return int, float, bool, str, bytes or None"``.

    :func:`infer_type` and :func:`write_result` raise with this text, so the
    sandbox can report a bad return value as what the host function did.
    """
    if value is None or isinstance(value, (bool, float, bytes, bytearray, memoryview)):
        return None
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return "returned an int outside the signed 64-bit range"  # no digits: it may be huge
    if isinstance(value, str):
        problem = _text_problem(value)
        return None if problem is None else f"returned a str that {problem.removeprefix('str ')}"
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"returned {article} {name}; host functions may return {_RESULT_TYPES}"


def infer_type(value: object) -> ValueType:
    """The wire type of a host function's return value (TypeError if none fits)."""
    if value is None:
        return ValueType.VOID
    if type(value) is bool:
        return ValueType.BOOL
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise TypeError(describe_unsendable(value))
        return ValueType.INT
    if isinstance(value, float):
        return ValueType.FLOAT
    if isinstance(value, str):
        return ValueType.STR
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ValueType.BYTES
    raise TypeError(describe_unsendable(value))


# --------------------------------------------------------- host -> guest calls
def make_call_encoder(
    signature: FunctionSignature,
) -> Callable[[memoryview, tuple[Any, ...]], int]:
    """An encoder writing a call frame for ``signature`` into a buffer.

    It returns the frame size. A frame that does not fit raises
    :class:`EncodeError` before any byte is written. Argument values must
    already have been checked (:func:`check_value`).
    """
    argc = len(signature.params)
    header_size = HEADER.size + SLOT.size * argc
    index = signature.index
    if all(p in (ValueType.INT, ValueType.BOOL) for p in signature.params):
        # The hot path: one pack_into, sized by the signature alone.
        fixed = struct.Struct("<IIII" + "IIq" * argc)
        types = [int(p) for p in signature.params]

        def encode_ints(buffer: memoryview, args: tuple[Any, ...]) -> int:
            if len(buffer) < header_size:
                raise EncodeError(header_size, len(buffer))
            values: list[int] = [MAGIC_CALL, index, argc, header_size]
            for kind, arg in zip(types, args, strict=True):
                values += (kind, 0, int(arg))
            fixed.pack_into(buffer, 0, *values)
            return header_size

        return encode_ints

    params = signature.params
    frame = struct.Struct("<IIII" + "IIQ" * argc)
    padding = bytes(8)

    def encode(buffer: memoryview, args: tuple[Any, ...]) -> int:
        # First size and lay out the whole frame, then write it: a frame that
        # does not fit leaves the buffer (guest memory) exactly as it was.
        position = header_size
        slots: list[int] = []
        tail: list[bytes] = []
        for kind, arg in zip(params, args, strict=True):
            if kind is ValueType.STR or kind is ValueType.BYTES:
                data = arg.encode() if kind is ValueType.STR else bytes(arg)
                # A NUL after every string and blob, then zeros to 8-byte alignment.
                end = (position + len(data) + 8) & ~7
                slots += (kind, len(data), position)
                tail += (data, padding[: end - position - len(data)])
                position = end
            elif kind is ValueType.FLOAT:
                slots += (kind, 0, float_bits(float(arg)))
            else:
                slots += (kind, 0, int(arg) & 0xFFFF_FFFF_FFFF_FFFF)
        if position > len(buffer):
            raise EncodeError(position, len(buffer))
        frame.pack_into(buffer, 0, MAGIC_CALL, index, argc, position, *slots)
        if tail:
            buffer[header_size:position] = b"".join(tail)
        return position

    return encode


# ----------------------------------------------------------- guest -> host
def decode_payload(kind: int, value: int, payload: bytes) -> Value:
    if kind == ValueType.VOID:
        return None
    if kind == ValueType.INT:
        return signed64(value)
    if kind == ValueType.FLOAT:
        return bits_float(value)
    if kind == ValueType.BOOL:
        return value != 0
    if kind == ValueType.STR:
        try:
            return payload.decode()
        except UnicodeDecodeError as exc:
            raise FrameError(f"str is not valid UTF-8: {exc}") from None
    if kind == ValueType.BYTES:
        return payload
    raise FrameError(f"unknown value type {kind}")


def read_result(buffer: memoryview, expected: ValueType) -> tuple[Value, str | None]:
    """Decode a result frame: (value, None) or (None, guest error message)."""
    if len(buffer) < RESULT.size:
        raise FrameError("output buffer smaller than a result frame")
    magic, status, kind, length, value = RESULT.unpack_from(buffer, 0)
    if magic != MAGIC_RESULT:
        raise FrameError(f"bad result magic {magic:#x}")
    if length > len(buffer) - RESULT.size:
        raise FrameError(f"result length {length} exceeds the output buffer")
    if status == STATUS_ERROR:
        text = bytes(buffer[RESULT.size : RESULT.size + length]).decode(errors="replace")
        return None, text
    if status != STATUS_OK:
        raise FrameError(f"bad result status {status}")
    if kind != expected:
        raise FrameError(f"result type {kind} does not match the declared {expected.name}")
    if kind == ValueType.INT:
        return signed64(value), None
    payload = bytes(buffer[RESULT.size : RESULT.size + length]) if length else b""
    return decode_payload(kind, value, payload), None


def write_result(buffer: memoryview, value: Value) -> int:
    """Write a host function's result into the output buffer; returns the bytes
    written.

    A value that cannot be sent raises TypeError (its type) or ValueError (its
    content), and one that does not fit raises :class:`EncodeError`; in every
    case before any byte is written. Messages read after the host function's
    name ("returned a list; ...", see :func:`describe_unsendable`).
    """
    kind = infer_type(value)
    payload = b""
    bits = 0
    if kind is ValueType.INT:
        bits = int(value) & 0xFFFF_FFFF_FFFF_FFFF  # type: ignore[arg-type]
    elif kind is ValueType.BOOL:
        bits = int(bool(value))
    elif kind is ValueType.FLOAT:
        bits = float_bits(value)  # type: ignore[arg-type]
    elif kind is ValueType.STR:
        assert isinstance(value, str)
        problem = describe_unsendable(value)
        if problem is not None:
            raise ValueError(problem)
        payload = value.encode()
    elif kind is ValueType.BYTES:
        payload = bytes(value)  # type: ignore[arg-type]
    end = RESULT.size + len(payload) + 1  # the payload is NUL-terminated
    if end > len(buffer):
        raise EncodeError(end, len(buffer), "result", "output")
    RESULT.pack_into(buffer, 0, MAGIC_RESULT, STATUS_OK, kind, len(payload), bits)
    buffer[RESULT.size : end - 1] = payload
    buffer[end - 1] = 0
    return end


@dataclass(frozen=True, slots=True)
class HostCall:
    name: str
    args: tuple[Value, ...]


def read_host_call(buffer: memoryview) -> HostCall:
    """Decode a host-call frame written by ``hl_call_host``."""
    size = len(buffer)
    if size < HEADER.size:
        raise FrameError("output buffer smaller than a host-call frame")
    magic, name_length, argc, total = HEADER.unpack_from(buffer, 0)
    if magic != MAGIC_HOSTCALL:
        raise FrameError(f"bad host-call magic {magic:#x}")
    if argc > MAX_ARGS:
        raise FrameError(f"host call with {argc} arguments (at most {MAX_ARGS})")
    if total > size:
        raise FrameError(f"host-call frame of {total} bytes exceeds the output buffer")
    name_start = HEADER.size + SLOT.size * argc
    name_end = name_start + name_length
    if name_length == 0 or name_length > 256 or name_end > total:
        raise FrameError("host-call name out of bounds")
    try:
        name = bytes(buffer[name_start:name_end]).decode()
    except UnicodeDecodeError:
        raise FrameError("host-call name is not valid UTF-8") from None
    args: list[Value] = []
    for i in range(argc):
        kind, length, value = SLOT.unpack_from(buffer, HEADER.size + i * SLOT.size)
        payload = b""
        if kind in (ValueType.STR, ValueType.BYTES):
            if value < name_end or value + length > total:
                raise FrameError(f"host-call argument {i} out of bounds")
            payload = bytes(buffer[value : value + length])
        elif kind == ValueType.VOID or kind > ValueType.BYTES:
            raise FrameError(f"host-call argument {i} has bad type {kind}")
        args.append(decode_payload(kind, value, payload))
    return HostCall(name, tuple(args))


def read_message(buffer: memoryview, magic_expected: int) -> tuple[int, bytes]:
    """Decode a print or abort frame: (code, message bytes)."""
    if len(buffer) < MESSAGE.size:
        raise FrameError("output buffer smaller than a message frame")
    magic, length, code = MESSAGE.unpack_from(buffer, 0)
    if magic != magic_expected:
        raise FrameError(f"bad message magic {magic:#x}")
    if length > len(buffer) - MESSAGE.size:
        raise FrameError(f"message length {length} exceeds the output buffer")
    return code, bytes(buffer[MESSAGE.size : MESSAGE.size + length])
