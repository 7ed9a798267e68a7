"""The sans-I/O exit handling (hlasync/sandbox/decide.py): an exit and the
guest's frames in, an action out. No KVM: the frames are built here byte by
byte, as a guest (honest or not) would write them."""

from __future__ import annotations

import struct

import pytest

from hlasync import abi
from hlasync.abi import ValueType
from hlasync.kvm.exits import FailEntry, Hlt, Interrupted, IoIn, IoOut, Mmio, Shutdown
from hlasync.sandbox import decide as d

SIZE = 4096


def buffer() -> memoryview:
    return memoryview(bytearray(SIZE))


def out(port: int) -> IoOut:
    return IoOut(port, 1, 1, b"\x00")


def result_frame(value: abi.Value) -> memoryview:
    view = buffer()
    abi.write_result(view, value)
    return view


def error_frame(text: bytes) -> memoryview:
    view = buffer()
    abi.RESULT.pack_into(view, 0, abi.MAGIC_RESULT, abi.STATUS_ERROR, 0, len(text), 0)
    view[abi.RESULT.size : abi.RESULT.size + len(text)] = text
    return view


def message_frame(magic: int, code: int, text: bytes, length: int | None = None) -> memoryview:
    view = buffer()
    abi.MESSAGE.pack_into(view, 0, magic, len(text) if length is None else length, code)
    view[abi.MESSAGE.size : abi.MESSAGE.size + len(text)] = text
    return view


def host_call_frame(name: bytes, args: list[tuple[int, int, bytes]]) -> memoryview:
    """A frame as ``hl_call_host`` writes it: header, slots, name, payloads."""
    view = buffer()
    name_start = abi.HEADER.size + abi.SLOT.size * len(args)
    offset = name_start + len(name)
    payloads = b""
    slots = []
    for kind, value, payload in args:
        if payload:
            slots.append((kind, len(payload), offset + len(payloads)))
            payloads += payload
        else:
            slots.append((kind, 0, value))
    total = offset + len(payloads)
    abi.HEADER.pack_into(view, 0, abi.MAGIC_HOSTCALL, len(name), len(args), total)
    for i, slot in enumerate(slots):
        abi.SLOT.pack_into(view, abi.HEADER.size + i * abi.SLOT.size, *slot)
    view[name_start:offset] = name
    view[offset:total] = payloads
    return view


# ------------------------------------------------------------------ decide
def test_a_return_exit_asks_for_the_result_unless_the_guest_had_not_seen_the_call() -> None:
    assert d.decide(out(abi.PORT_RETURN), buffer()) == d.Returning()
    assert d.decide(out(abi.PORT_RETURN), buffer(), call_seen=False) == d.Replay()


def test_a_host_call_exit_carries_the_decoded_request() -> None:
    frame = host_call_frame(b"greet", [(ValueType.INT, 7, b""), (ValueType.STR, 0, b"hi\0")])
    action = d.decide(out(abi.PORT_HOSTCALL), frame)
    assert isinstance(action, d.HostCallAsked)
    assert action.request.name == "greet"
    assert action.request.args[0] == 7


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (buffer(), "bad host-call magic"),
        (host_call_frame(b"\xff\xfe", []), "not valid UTF-8"),
        (host_call_frame(b"", []), "name out of bounds"),
    ],
)
def test_a_bad_host_call_frame_is_broken(frame: memoryview, problem: str) -> None:
    action = d.decide(out(abi.PORT_HOSTCALL), frame)
    assert isinstance(action, d.Broken)
    assert action.message.startswith("bad host-call frame: ")
    assert problem in action.message
    assert action.exit is None


def test_a_print_carries_its_text_with_bad_utf8_replaced() -> None:
    action = d.decide(out(abi.PORT_PRINT), message_frame(abi.MAGIC_PRINT, 0, b"hi \xff\n"))
    assert action == d.PrintAsked("hi \ufffd\n")


def test_a_print_frame_longer_than_the_buffer_is_broken() -> None:
    frame = message_frame(abi.MAGIC_PRINT, 0, b"x", length=SIZE)
    action = d.decide(out(abi.PORT_PRINT), frame)
    assert isinstance(action, d.Broken) and "exceeds the output buffer" in action.message


def test_an_abort_carries_code_and_message() -> None:
    frame = message_frame(abi.MAGIC_ABORT, 3, b"giving up")
    assert d.decide(out(abi.PORT_ABORT), frame) == d.Aborted(3, "giving up")


def test_an_abort_with_a_print_frame_is_broken() -> None:
    frame = message_frame(abi.MAGIC_PRINT, 3, b"x")
    action = d.decide(out(abi.PORT_ABORT), frame)
    assert isinstance(action, d.Broken) and action.message.startswith("bad abort frame")


@pytest.mark.parametrize("vector", [0, 6, 13, 14, 31])
def test_exception_ports_are_faults_with_their_vector(vector: int) -> None:
    assert d.decide(out(abi.PORT_EXCEPTION_BASE + vector), buffer()) == d.Faulted(vector)


def test_a_park_exit_answers_the_call_only_after_the_guest_saw_it() -> None:
    assert d.decide(out(abi.PORT_PARKED), buffer(), call_seen=True) == d.Returning()
    assert d.decide(out(abi.PORT_PARKED), buffer(), call_seen=False) == d.Replay()


def test_the_wait_port_is_an_ask_and_a_kick_is_a_kick() -> None:
    assert d.decide(out(abi.PORT_WAIT), buffer()) == d.Asked()
    assert d.decide(Interrupted(), buffer()) == d.Kicked()


@pytest.mark.parametrize("port", [0x0, 0x16, 0x80, abi.PORT_EXCEPTION_BASE + 32, 0xFFFF])
def test_an_unknown_port_is_broken(port: int) -> None:
    action = d.decide(out(port), buffer())
    assert action == d.Broken(f"guest wrote to unknown port {port:#x}")


@pytest.mark.parametrize(
    "exit_",
    [Hlt(), Mmio(0xDEAD000, True, 4, b"\0\0\0\0"), IoIn(0x10, 1, 1), FailEntry(1, 0)],
)
def test_any_other_exit_is_broken_and_named(exit_: object) -> None:
    action = d.decide(exit_, buffer())  # type: ignore[arg-type]
    assert isinstance(action, d.Broken)
    assert action.exit is exit_
    assert action.message == f"unexpected vCPU exit {exit_}"


def test_a_triple_fault_says_so() -> None:
    action = d.decide(Shutdown(), buffer())
    assert isinstance(action, d.Broken) and action.message.endswith("(triple fault)")


# ------------------------------------------------------------------ result
@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (3, ValueType.INT),
        (-1, ValueType.INT),
        (2.5, ValueType.FLOAT),
        (True, ValueType.BOOL),
        ("héllo", ValueType.STR),
        (b"\0\1", ValueType.BYTES),
    ],
)
def test_a_result_frame_decodes_to_its_value(value: abi.Value, kind: ValueType) -> None:
    assert d.result(result_frame(value), kind) == d.Returned(value)


def test_a_result_of_another_type_than_declared_is_broken() -> None:
    outcome = d.result(result_frame("text"), ValueType.INT)
    assert isinstance(outcome, d.Broken)
    assert outcome.message.startswith("bad result frame: result type")


def test_a_guest_side_error_is_unreturnable_with_a_hint_when_it_did_not_fit() -> None:
    outcome = d.result(error_frame(b"result does not fit the output buffer"), ValueType.STR, 1234)
    assert isinstance(outcome, d.Unreturnable)
    assert "could not return the result" in outcome.message
    assert "output_buffer_size, now 1234" in outcome.message
    plain = d.result(error_frame(b"something else"), ValueType.STR, 1234)
    assert isinstance(plain, d.Unreturnable) and "output_buffer_size" not in plain.message


def test_garbage_is_a_broken_result_never_an_exception() -> None:
    view = buffer()
    view[:8] = struct.pack("<Q", 0x4141414141414141)
    assert isinstance(d.result(view, ValueType.INT), d.Broken)
    short = memoryview(bytearray(4))
    assert isinstance(d.result(short, ValueType.INT), d.Broken)


# --------------------------------------------------------------- decide_ask
def test_a_doorbell_ask_is_decided_by_its_port() -> None:
    frame = message_frame(abi.MAGIC_PRINT, 0, b"x")
    assert d.decide_ask(abi.PORT_PRINT, frame) == d.PrintAsked("x")
    call = host_call_frame(b"h", [])
    assert isinstance(d.decide_ask(abi.PORT_HOSTCALL, call), d.HostCallAsked)
    assert d.decide_ask(abi.PORT_ABORT, frame) == d.Broken(
        f"guest asked on the doorbell for unknown port {abi.PORT_ABORT:#x}"
    )
