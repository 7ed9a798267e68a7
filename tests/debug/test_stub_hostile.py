"""The GDB stub (hlasync.debug) against a hostile or clumsy client on a raw
socket: bad input gets an error reply (``E..``), the empty reply or ``-``, and
never crashes the host, wedges the call or changes its result.

Every wait is bounded: socket timeouts, thread joins and the sandbox's close.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator

import pytest

from hlasync import GuestCancelled, Sandbox, SandboxConfig, guests
from hlasync.debug import rsp
from hlasync.debug.registers import G_SIZE, NUMBERS, REGISTERS, RIP
from hlasync.kvm import Kvm

#: Seconds any single wait may take.
WAIT = 3.0
MEMORY = 8 << 20  # SandboxConfig's default memory_size
SCRATCH = 0x101000  # HL_SCRATCH_ADDR: a user page only write_sentinel uses
ADD = ("add", (2, 3), 5)


class Client:
    """A debugger on a raw socket: frames packets, reads events."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=WAIT)
        self.reader = rsp.PacketReader()
        self.events: deque[rsp.Event] = deque()
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(rsp.frame(payload))

    def _fill(self, timeout: float) -> bool:
        """Read more events; False when none came within ``timeout`` or the stub hung up."""
        if self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.events.extend(self.reader.feed(data))
        return True

    def event(self, timeout: float = WAIT) -> rsp.Event:
        deadline = time.monotonic() + timeout
        while not self.events:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise TimeoutError(f"no event from the stub (eof={self.eof})")
        return self.events.popleft()

    def packet(self, timeout: float = WAIT) -> bytes:
        """The next reply, past acknowledgements."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.event(max(0.0, deadline - time.monotonic()))
            if isinstance(event, rsp.Packet):
                return event.payload
            assert event == rsp.ACK, f"unexpected {event!r}"

    def ask(self, payload: bytes, timeout: float = WAIT) -> bytes:
        self.send(payload)
        return self.packet(timeout)

    def quiet(self, wait: float = 0.3) -> list[rsp.Event]:
        """Whatever arrives within ``wait`` seconds (nothing, usually)."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and self._fill(left):
            pass
        got = list(self.events)
        self.events.clear()
        return got

    def closed_by_stub(self, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(max(0.01, deadline - time.monotonic()))
        return self.eof


class CallThread:
    """``sb.call(name, *args)`` on a thread of its own."""

    def __init__(self, sb: Sandbox, name: str, *args: int | str) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(sb, name, args), daemon=True)
        self.thread.start()

    def _run(self, sb: Sandbox, name: str, args: tuple[int | str, ...]) -> None:
        try:
            self.result = sb.call(name, *args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def outcome(self, timeout: float = WAIT) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def hexnum(value: int) -> bytes:
    return b"%x" % value


def wait_stopped(sb: Sandbox, timeout: float = WAIT) -> None:
    """Until the call waits in the debugger (white-box: the server's published stop)."""
    server = sb._debugger
    assert server is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.lock:
            stop = server.stop
            if stop is not None and stop.verdict is None:
                return
        time.sleep(0.01)
    raise AssertionError("the call did not stop in the debugger")


def attach(sb: Sandbox) -> Client:
    """A client attached to a call stopped at its entry: ``?`` answered ``T05``."""
    wait_stopped(sb)
    address = sb.debug_address
    assert address is not None
    client = Client(address)
    reply = client.ask(b"?")
    assert reply.startswith(b"T05"), reply
    assert client.quiet(0.05) == []
    return client


def register(client: Client, name: str) -> int:
    return int.from_bytes(bytes.fromhex(client.ask(b"p%x" % NUMBERS[name]).decode()), "little")


def resume_and_finish(client: Client, call: CallThread, expected: object) -> None:
    """``c``, and the call ends with its own result."""
    client.send(b"c")
    assert call.outcome() == expected


@pytest.fixture
def debugged(kvm: Kvm) -> Iterator[Sandbox]:
    sb = Sandbox(guests.path("simpleguest"), SandboxConfig(debug_port=0))
    try:
        yield sb
    finally:
        started = time.monotonic()
        sb.close(timeout=WAIT)
        assert time.monotonic() - started < WAIT + 2


@pytest.fixture
def stopped(debugged: Sandbox) -> Iterator[tuple[Sandbox, CallThread, Client]]:
    """``add(2, 3)`` stopped at its entry, a client attached."""
    call = CallThread(debugged, "add", 2, 3)
    client = attach(debugged)
    try:
        yield debugged, call, client
    finally:
        client.close()
        call.thread.join(WAIT)


# --------------------------------------------------------------- sanity
def test_attach_stops_at_the_entry(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    assert register(client, "rip") == sb.functions["add"].address
    assert len(client.ask(b"g")) == 2 * G_SIZE
    assert (
        client.ask(b"p%x" % RIP) == sb.functions["add"].address.to_bytes(8, "little").hex().encode()
    )
    resume_and_finish(client, call, 5)


# ------------------------------------------------------------ bad framing
def test_garbage_bytes(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    rng = random.Random(0xBAD)
    for _ in range(8):
        client.send_raw(rng.randbytes(2048))
    client.send_raw(bytes(range(256)) * 4)
    client.send_raw(b"#00")  # whatever packet is open ends here
    client.quiet(0.3)  # '-' in the garbage re-sends the last reply; '$...#' gets '-'
    assert client.ask(b"qC") == b"QC1"
    assert register(client, "rip") == sb.functions["add"].address
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("framed", [b"$g#00", b"$g#68", b"$g#zz", b"$g#+0", b"$m0,1##0"])
def test_bad_checksum_gets_a_nack(
    stopped: tuple[Sandbox, CallThread, Client], framed: bytes
) -> None:
    _, call, client = stopped
    client.send_raw(framed)
    assert client.event() == rsp.NACK
    assert client.quiet(0.1) == []
    assert client.ask(b"qC") == b"QC1"
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("cut", [b"$g", b"$g#", b"$g#6", b"$m100000,4"])
def test_packet_cut_off_by_the_next(
    stopped: tuple[Sandbox, CallThread, Client], cut: bytes
) -> None:
    _, call, client = stopped
    client.send_raw(cut)
    assert client.ask(b"qC") == b"QC1"  # the next '$' starts a packet anew
    assert client.quiet(0.1) == []
    resume_and_finish(client, call, 5)


def test_nack_repeats_the_last_reply(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    _, call, client = stopped
    assert client.ask(b"qC") == b"QC1"
    client.send_raw(b"-")
    assert client.packet() == b"QC1"
    client.send_raw(b"----")
    assert [client.packet() for _ in range(4)] == [b"QC1"] * 4
    resume_and_finish(client, call, 5)


def test_over_long_packet(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    _, call, client = stopped
    client.send_raw(b"$" + b"m" * (4 * rsp.MAX_PACKET))
    client.send_raw(b"a" * (1 << 20))  # a megabyte more of it: refused, not buffered
    client.send_raw(b"#00")
    assert client.event() == rsp.NACK
    assert client.quiet(0.1) == []
    assert client.ask(b"qC") == b"QC1"
    resume_and_finish(client, call, 5)


# ----------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "address",
    [
        0,
        0xFFF,
        0x8000,
        0x8FFF,
        MEMORY,
        MEMORY + 0x1000,
        1 << 40,
        1 << 47,
        1 << 48,
        0xFFFF_8000_0000_0000,
        0xFFFF_FFFF_FFFF_FFFF,
        1 << 64,
        1 << 200,
    ],
)
def test_read_of_unmapped_memory(stopped: tuple[Sandbox, CallThread, Client], address: int) -> None:
    _, call, client = stopped
    assert client.ask(b"m%x,4" % address) == b"E14"
    assert client.ask(b"m%x,1" % address) == b"E14"
    resume_and_finish(client, call, 5)


def test_read_up_to_the_end_of_memory(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    reply = client.ask(b"m%x,20" % (MEMORY - 0x10))
    assert reply == sb.read_memory(MEMORY - 0x10, 0x10).hex().encode()  # what precedes the end
    reply = client.ask(b"m7ff0,20")  # runs into the guard page at 0x8000
    assert len(reply) in (0x20, 3)  # the readable part, or E14 (0x7000 is supervisor code)
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize(
    "packet", [b"m", b"m100000", b"mzz,4", b"m100000,zz", b"m,", b"m100000,4,4", b"m\xff,\xff"]
)
def test_malformed_read(stopped: tuple[Sandbox, CallThread, Client], packet: bytes) -> None:
    _, call, client = stopped
    assert client.ask(packet) == b"E16"
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("length", [0x10000, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 1 << 100])
def test_huge_read_is_bounded(stopped: tuple[Sandbox, CallThread, Client], length: int) -> None:
    sb, call, client = stopped
    started = time.monotonic()
    reply = client.ask(b"m100000,%x" % length)
    assert time.monotonic() - started < 1.0
    assert 0 < len(reply) <= rsp.MAX_PACKET
    assert bytes.fromhex(reply.decode()) == sb.read_memory(0x100000, len(reply) // 2)
    resume_and_finish(client, call, 5)


def test_negative_read_length(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    _, call, client = stopped
    reply = client.ask(b"m100000,-4")
    assert reply == b"" or reply.startswith(b"E")
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize(
    "packet",
    [
        b"M%x,4:0011" % SCRATCH,  # fewer bytes than said
        b"M%x,2:00112233" % SCRATCH,  # more
        b"M%x,2:001" % SCRATCH,  # odd hex
        b"M%x,2:zzzz" % SCRATCH,
        b"M%x,2" % SCRATCH,  # no data at all
        b"M%x:0011" % SCRATCH,
        b"X%x,4:ab" % SCRATCH,
        b"X%x,1:abcd" % SCRATCH,
        b"X%x,1" % SCRATCH,
        b"X%x,-1:" % SCRATCH,
    ],
)
def test_write_with_a_length_mismatch(
    stopped: tuple[Sandbox, CallThread, Client], packet: bytes
) -> None:
    sb, call, client = stopped
    before = sb.read_memory(SCRATCH, 16)
    assert client.ask(packet) == b"E16"
    assert sb.read_memory(SCRATCH, 16) == before
    assert client.ask(b"m%x,10" % SCRATCH) == before.hex().encode()
    resume_and_finish(client, call, 5)


def test_writes_that_fit(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    before = sb.read_memory(SCRATCH, 8)
    assert client.ask(b"M%x,4:01020304" % SCRATCH) == b"OK"
    assert client.ask(b"X%x,4:" % SCRATCH + rsp.escape(b"#$}*")) == b"OK"
    assert sb.read_memory(SCRATCH, 4) == b"#$}*"
    assert client.ask(b"X%x,0:" % SCRATCH) == b"OK"  # gdb's probe
    assert client.ask(b"M%x,8:%s" % (SCRATCH, before.hex().encode())) == b"OK"
    assert sb.read_memory(SCRATCH, 8) == before
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("address", [0, 0x8000, MEMORY, 0xFFFF_8000_0000_0000, 0x100FFE])
def test_write_to_unmapped_memory(
    stopped: tuple[Sandbox, CallThread, Client], address: int
) -> None:
    _, call, client = stopped
    if address == 0x100FFE:  # the last bytes before the scratch page: mapped, both pages
        assert client.ask(b"M%x,4:00000000" % address) in (b"OK", b"E14")
    else:
        assert client.ask(b"M%x,4:01020304" % address) == b"E14"
        assert client.ask(b"X%x,2:ab" % address) == b"E14"
    resume_and_finish(client, call, 5)


def test_write_that_runs_past_the_end_changes_nothing(
    stopped: tuple[Sandbox, CallThread, Client],
) -> None:
    sb, call, client = stopped
    before = sb.read_memory(MEMORY - 2, 2)
    assert client.ask(b"M%x,4:01020304" % (MEMORY - 2)) == b"E14"
    assert sb.read_memory(MEMORY - 2, 2) == before
    resume_and_finish(client, call, 5)


# -------------------------------------------------------------- registers
@pytest.mark.parametrize("size", [0, 1, G_SIZE - 1, G_SIZE + 1, 2 * G_SIZE])
def test_write_of_all_registers_of_the_wrong_size(
    stopped: tuple[Sandbox, CallThread, Client], size: int
) -> None:
    _, call, client = stopped
    before = client.ask(b"g")
    assert client.ask(b"G" + b"00" * size) == b"E16"
    assert client.ask(b"g") == before
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("data", [b"zz" * G_SIZE, b"0" * (2 * G_SIZE - 1), b"\xff" * (2 * G_SIZE)])
def test_write_of_all_registers_not_hex(
    stopped: tuple[Sandbox, CallThread, Client], data: bytes
) -> None:
    _, call, client = stopped
    before = client.ask(b"g")
    assert client.ask(b"G" + rsp.escape(data)) == b"E16"
    assert client.ask(b"g") == before
    resume_and_finish(client, call, 5)


def test_write_of_all_registers_unchanged(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    _, call, client = stopped
    assert client.ask(b"G" + client.ask(b"g")) == b"OK"
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize(
    "number", [b"%x" % len(REGISTERS), b"ff", b"ffffffffffffffff", b"-1", b"zz", b"", b"1" * 100]
)
def test_register_number_out_of_range(
    stopped: tuple[Sandbox, CallThread, Client], number: bytes
) -> None:
    _, call, client = stopped
    before = client.ask(b"g")
    assert client.ask(b"p" + number) == b"E16"
    assert client.ask(b"P" + number + b"=" + b"11" * 8) == b"E16"
    assert client.ask(b"g") == before
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("value", [b"", b"11", b"11" * 9, b"zz" * 8, b"1"])
def test_register_write_of_the_wrong_size(
    stopped: tuple[Sandbox, CallThread, Client], value: bytes
) -> None:
    _, call, client = stopped
    before = client.ask(b"g")
    assert client.ask(b"P0=" + value) == b"E16"
    assert client.ask(b"P0") == b"E16"
    assert client.ask(b"g") == before
    resume_and_finish(client, call, 5)


# ------------------------------------------------------------ breakpoints
@pytest.mark.parametrize("address", [0, 0x8000, MEMORY, 0xFFFF_8000_0000_0000, 1 << 70])
def test_breakpoint_at_an_unmapped_address(
    stopped: tuple[Sandbox, CallThread, Client], address: int
) -> None:
    _, call, client = stopped
    assert client.ask(b"Z0,%x,1" % address) == b"E14"
    assert client.ask(b"z0,%x,1" % address) == b"OK"
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("kind", [b"1", b"2", b"3", b"4"])
def test_hardware_breakpoints_and_watchpoints_are_unsupported(
    stopped: tuple[Sandbox, CallThread, Client], kind: bytes
) -> None:
    _, call, client = stopped
    assert client.ask(b"Z" + kind + b",%x,4" % SCRATCH) == b""
    assert client.ask(b"z" + kind + b",%x,4" % SCRATCH) == b""
    resume_and_finish(client, call, 5)


@pytest.mark.parametrize("packet", [b"Z", b"Z0", b"Z0,", b"Z0,zz,1", b"Zx,100000,1", b"z0,100000"])
def test_malformed_breakpoint(stopped: tuple[Sandbox, CallThread, Client], packet: bytes) -> None:
    _, call, client = stopped
    assert client.ask(packet) == b"E16"
    resume_and_finish(client, call, 5)


def test_unknown_packets_get_the_empty_reply(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    _, call, client = stopped
    for packet in (b"", b"!", b"A", b"bc", b"vMustReplyEmpty", b"qNoSuchThing", b"\x00\xff", b"jz"):
        assert client.ask(packet) == b"", packet
    resume_and_finish(client, call, 5)


# ------------------------------------------------------ while it runs
def test_registers_and_memory_while_the_guest_runs(debugged: Sandbox) -> None:
    call = CallThread(debugged, "spin")
    client = attach(debugged)
    try:
        client.send(b"c")
        assert client.event() == rsp.ACK
        for packet in (
            b"g",
            b"G" + b"00" * G_SIZE,
            b"p0",
            b"P0=" + b"00" * 8,
            b"m100000,4",
            b"M%x,1:00" % SCRATCH,
            b"X%x,0:" % SCRATCH,
            b"c",
            b"s",
        ):
            assert client.ask(packet) == b"E01", packet
        assert client.quiet(0.2) == []  # no stop meanwhile
        client.send_raw(b"\x03")
        reply = client.packet()
        assert reply.startswith(b"T02"), reply
        assert len(client.ask(b"g")) == 2 * G_SIZE  # stopped now
        client.send(b"k")
        with pytest.raises(GuestCancelled):
            call.outcome()
    finally:
        client.close()
        debugged.close(timeout=WAIT)
        call.thread.join(WAIT)


def test_ctrl_c_during_spin(debugged: Sandbox) -> None:
    call = CallThread(debugged, "spin")
    client = attach(debugged)
    try:
        for _ in range(3):
            client.send(b"vCont;c")
            time.sleep(0.1)
            client.send_raw(b"\x03")
            reply = client.packet()
            assert reply.startswith(b"T02"), reply
            rip = register(client, "rip")
            assert 0x100000 <= rip < 0x108000  # in the guest's text
            assert client.quiet(0.05) == []
        client.send_raw(b"\x03\x03")  # stopped already: nothing to do
        assert client.quiet(0.2) == []
        client.send(b"k")
        with pytest.raises(GuestCancelled):
            call.outcome()
        debugged.restore()
        follow = CallThread(debugged, "add", 20, 22)
        assert follow.outcome() == 42
    finally:
        client.close()
        debugged.close(timeout=WAIT)
        call.thread.join(WAIT)


# ---------------------------------------------- leaving, and the sandbox
def test_disconnect_while_stopped(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    assert client.ask(b"Z0,%x,1" % sb.functions["add"].address) == b"OK"
    client.close()
    assert call.outcome() == 5
    # The sandbox goes on: its debugger's breakpoints went with it.
    assert CallThread(sb, "add", 4, 5).outcome() == 9
    assert sb.read_memory(sb.functions["add"].address, 1) != b"\xcc"


def test_disconnect_mid_packet(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    client.send_raw(b"$m100000,")
    client.close()
    assert call.outcome() == 5
    assert CallThread(sb, "add", 1, 1).outcome() == 2


def test_reattach_after_a_disconnect(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    client.close()
    assert call.outcome() == 5
    # A new client: the next call stops at its entry for it.
    address = sb.debug_address
    assert address is not None
    again = Client(address)
    try:
        time.sleep(0.3)  # accepted: it wants the next call stopped
        follow = CallThread(sb, "add", 6, 7)
        wait_stopped(sb)
        assert again.ask(b"?").startswith(b"T05")
        assert register(again, "rip") == sb.functions["add"].address
        resume_and_finish(again, follow, 13)
    finally:
        again.close()


def test_a_second_client_is_refused_and_does_not_disturb_the_first(
    stopped: tuple[Sandbox, CallThread, Client],
) -> None:
    """One client at a time: every other connection is closed at once, whatever
    it sends, and the attached client's stop is untouched."""
    sb, call, client = stopped
    address = sb.debug_address
    assert address is not None
    for _ in range(3):
        with socket.create_connection(address, timeout=WAIT) as other:
            with contextlib.suppress(OSError):
                other.sendall(rsp.frame(b"k") + rsp.frame(b"D") + b"\x03" + rsp.frame(b"c"))
            other.settimeout(WAIT)
            with contextlib.suppress(ConnectionResetError):
                assert other.recv(100) == b""  # hung up on, unanswered
    assert client.ask(b"qC") == b"QC1"
    assert register(client, "rip") == sb.functions["add"].address
    assert call.thread.is_alive()  # still stopped: nobody else resumed or killed it
    resume_and_finish(client, call, 5)


def test_kill(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    client.send(b"k")
    with pytest.raises(GuestCancelled):
        call.outcome()
    assert client.closed_by_stub()
    sb.restore()
    assert CallThread(sb, "add", 1, 2).outcome() == 3


def test_vkill(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    assert client.ask(b"vKill;1") == b"OK"
    with pytest.raises(GuestCancelled):
        call.outcome()
    sb.restore()
    assert CallThread(sb, "add", 1, 2).outcome() == 3


def test_detach(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    assert client.ask(b"Z0,%x,1" % sb.functions["add"].address) == b"OK"
    assert client.ask(b"D") == b"OK"
    assert call.outcome() == 5
    assert client.closed_by_stub()
    assert CallThread(sb, "add", 4, 5).outcome() == 9  # no breakpoint, no stop


def test_close_while_stopped(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    sb, call, client = stopped
    started = time.monotonic()
    sb.close(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    with pytest.raises(GuestCancelled):
        call.outcome()
    assert client.closed_by_stub()


def test_close_while_stopped_with_no_client(debugged: Sandbox) -> None:
    call = CallThread(debugged, "add", 2, 3)
    wait_stopped(debugged)
    started = time.monotonic()
    debugged.close(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    with pytest.raises(GuestCancelled):
        call.outcome()


def test_close_while_running_under_the_debugger(debugged: Sandbox) -> None:
    call = CallThread(debugged, "spin")
    client = attach(debugged)
    try:
        client.send(b"c")
        assert client.event() == rsp.ACK
        started = time.monotonic()
        debugged.close(timeout=WAIT)
        assert time.monotonic() - started < WAIT
        with pytest.raises(GuestCancelled):
            call.outcome()
        events = client.quiet(0.5)
        assert events in ([], [rsp.Packet(b"W00")]), events
    finally:
        client.close()


# ------------------------------------------------------- found by these tests
def test_early_question_mark_is_answered_once(debugged: Sandbox) -> None:
    address = debugged.debug_address
    assert address is not None
    client = Client(address)
    call = CallThread(debugged, "add", 2, 3)
    try:
        reply = client.ask(b"?")  # before the call reaches its entry
        assert reply.startswith(b"T05"), reply  # the attach's stop: not a Ctrl-C's
        assert client.quiet(0.3) == []  # a second stop reply would answer the next packet
    finally:
        client.close()
        call.thread.join(WAIT)


def test_disconnect_at_a_stop_before_the_entry(stopped: tuple[Sandbox, CallThread, Client]) -> None:
    """A call that stops before its entry breakpoint (here at a breakpoint on the
    runtime's ``call *%rax`` into the guest function; a Ctrl-C kick does the
    same) and whose debugger then leaves must complete: nobody is left to
    resume it at its entry."""
    sb, call, client = stopped
    rsp_value = register(client, "rsp")
    ret = int.from_bytes(bytes.fromhex(client.ask(b"m%x,8" % rsp_value).decode()), "little")
    if client.ask(b"m%x,2" % (ret - 2)) != b"ffd0":
        pytest.skip("the runtime's dispatch is not a 'call *%rax' in this build")
    assert client.ask(b"Z0,%x,1" % (ret - 2)) == b"OK"
    resume_and_finish(client, call, 5)  # past the dispatch already: no stop
    client.send_raw(b"\x03")  # between calls: stop the next one at its entry
    follow = CallThread(sb, "add", 4, 5)
    reply = client.packet()
    # At the dispatch's breakpoint; or, when the Ctrl-C is read only after the
    # call began, wherever the kick found it (SIGINT): before the entry either way.
    assert (reply.startswith(b"T05") and b"swbreak" in reply) or reply.startswith(b"T02"), reply
    client.close()
    assert follow.outcome() == 9  # wedged at the entry instead, until close()
