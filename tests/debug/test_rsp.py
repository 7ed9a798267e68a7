"""The GDB remote protocol's framing (hlasync.debug.rsp), without KVM."""

from __future__ import annotations

import random

import pytest

from hlasync.debug import rsp
from hlasync.debug.rsp import (
    ACK,
    INTERRUPT,
    MAX_PACKET,
    NACK,
    BadPacket,
    Event,
    Packet,
    PacketReader,
    escape,
    frame,
    unescape,
)


def feed_all(data: bytes, *, chunks: list[int] | None = None) -> list[Event]:
    reader = PacketReader()
    if chunks is None:
        return reader.feed(data)
    events: list[Event] = []
    start = 0
    for end in [*chunks, len(data)]:
        events += reader.feed(data[start:end])
        start = end
    return events


def packets(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Packet)]


# ------------------------------------------------------------------ frame()
@pytest.mark.parametrize(
    ("payload", "framed"),
    [
        (b"", b"$#00"),
        (b"OK", b"$OK#9a"),
        (b"g", b"$g#67"),
        (b"qSupported", b"$qSupported#37"),
        (b"\xff\xff", b"$\xff\xff#fe"),  # the sum wraps modulo 256
    ],
)
def test_frame_checksums(payload: bytes, framed: bytes) -> None:
    assert frame(payload) == framed


def test_frame_checksum_is_two_lowercase_hex_digits() -> None:
    rng = random.Random(1)
    for _ in range(200):
        payload = bytes(rng.randrange(0x20, 0x7F) for _ in range(rng.randrange(0, 40)))
        framed = frame(payload)
        digits = framed[-2:]
        assert framed[-3:-2] == b"#"
        assert digits == digits.lower()
        assert int(digits, 16) == sum(payload) % 256


# -------------------------------------------------------------- the reader
def test_one_packet() -> None:
    assert feed_all(b"$g#67") == [Packet(b"g")]


def test_every_split_point_gives_the_same_events() -> None:
    stream = b"+" + frame(b"m1000,4") + b"\x03-" + frame(b"qSupported:swbreak+") + b"+"
    whole = feed_all(stream)
    assert whole == [ACK, Packet(b"m1000,4"), INTERRUPT, NACK, Packet(b"qSupported:swbreak+"), ACK]
    for cut in range(len(stream) + 1):
        assert feed_all(stream, chunks=[cut]) == whole, cut
    for cut1 in range(0, len(stream) + 1, 3):
        for cut2 in range(cut1, len(stream) + 1):
            assert feed_all(stream, chunks=[cut1, cut2]) == whole, (cut1, cut2)


def test_byte_at_a_time() -> None:
    reader = PacketReader()
    events: list[Event] = []
    stream = frame(b"vCont;c") + b"+" + frame(escape(b"$#}*"))
    for byte in stream:
        events += reader.feed(bytes([byte]))
    assert events == [Packet(b"vCont;c"), ACK, Packet(b"$#}*")]


def test_acks_nacks_and_interrupts_between_packets() -> None:
    events = feed_all(b"++--\x03\x03" + frame(b"?") + b"\x03+")
    assert events == [ACK, ACK, NACK, NACK, INTERRUPT, INTERRUPT, Packet(b"?"), INTERRUPT, ACK]


def test_noise_between_packets_is_ignored() -> None:
    assert feed_all(b"garbage\n\x00\xff#00" + frame(b"g") + b"zz") == [Packet(b"g")]


def test_plus_minus_and_03_inside_a_packet_are_payload() -> None:
    payload = b"X0,3:+-\x03"
    assert feed_all(frame(payload)) == [Packet(payload)]


def test_bad_checksum() -> None:
    events = feed_all(b"$g#68" + frame(b"g"))
    assert isinstance(events[0], BadPacket)
    assert "checksum" in events[0].reason
    assert events[1:] == [Packet(b"g")]  # the reader goes on with the next packet


def test_uppercase_checksum_digits_are_accepted() -> None:
    assert feed_all(b"$OK#9A") == [Packet(b"OK")]


@pytest.mark.parametrize("digits", [b"zz", b"g7", b"7g", b"\x00\x00", b"  "])
def test_non_hex_checksum(digits: bytes) -> None:
    events = feed_all(b"$g#" + digits + frame(b"?"))
    assert isinstance(events[0], BadPacket)
    assert events[1:] == [Packet(b"?")]


@pytest.mark.parametrize("digits", [b"+0", b"-0", b" 0", b"0 ", b"\t0", b"0_"])
def test_checksum_digits_python_int_would_accept_are_refused(digits: bytes) -> None:
    # An empty payload sums to 0: int(b"+0", 16) == 0 must not make "$#+0" a packet.
    assert isinstance(feed_all(b"$#" + digits)[0], BadPacket)


def test_dollar_inside_a_packet_restarts_it() -> None:
    assert feed_all(b"$m10,4" + frame(b"g")) == [Packet(b"g")]
    assert feed_all(b"$$$" + frame(b"g")[1:]) == [Packet(b"g")]


def test_dollar_in_the_checksum_restarts_the_packet() -> None:
    # "$g#" cut off after its '#': the next packet must not be lost.
    assert feed_all(b"$g#" + frame(b"?")) == [Packet(b"?")]
    assert feed_all(b"$g#6" + frame(b"?")) == [Packet(b"?")]


def test_escapes_are_undone() -> None:
    # '}' then the byte XOR 0x20: '#' 0x23 -> 0x03, '$' 0x24 -> 0x04, '}' -> ']', '*' -> 0x0a.
    body = b"X0,4:}\x03}\x04}]}\x0a"
    assert feed_all(frame(body)) == [Packet(b"X0,4:#$}*")]


def test_the_checksum_covers_the_escaped_bytes() -> None:
    body = b"}\x03"
    wrong = b"$" + body + b"#%02x" % (ord("#") & 0xFF)  # the sum of the unescaped byte
    assert isinstance(feed_all(wrong)[0], BadPacket)
    assert feed_all(frame(body)) == [Packet(b"#")]


def test_packet_ending_in_an_escape_is_bad() -> None:
    events = feed_all(frame(b"abc}"))
    assert len(events) == 1 and isinstance(events[0], BadPacket)


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        (b"0* ", b"0000"),  # ' ' is 32: 3 more
        (b"0*!", b"0" * 5),
        (b"x*\x1d", b"x"),  # count 0
        (b'ab*"c', b"a" + b"b" * 6 + b"c"),
        (b"0*~", b"0" * (1 + 126 - 29)),
        (b"}]*!", b"}" * 5),  # the repeated byte is the unescaped one
        (b'1*!2*"', b"1" * 5 + b"2" * 6),
    ],
)
def test_run_length_repeats(encoded: bytes, decoded: bytes) -> None:
    assert unescape(encoded) == decoded
    assert feed_all(frame(encoded)) == [Packet(decoded)]


def test_run_length_as_gdb_sends_registers() -> None:
    # gdb's own encoding of 16 zero bytes of a 'G' packet: "0" and 31 more ('<' is 60).
    assert feed_all(frame(b"G0*<" + b"1" * 2)) == [Packet(b"G" + b"0" * 32 + b"11")]


@pytest.mark.parametrize("body", [b"*!", b"0*", b"0*\x1c", b"*"])
def test_bad_run_length_repeats(body: bytes) -> None:
    events = feed_all(frame(body) + frame(b"g"))
    assert isinstance(events[0], BadPacket)
    assert events[1:] == [Packet(b"g")]


def test_run_length_expansion_is_bounded() -> None:
    body = b"0" + b"*~" * (MAX_PACKET // 10)  # 1.6k repeats of 97 bytes: > 2 * MAX_PACKET
    with pytest.raises(ValueError):
        unescape(body)
    assert isinstance(feed_all(frame(body))[0], BadPacket)


def test_packet_of_max_size_is_accepted() -> None:
    payload = b"M0,1000:" + b"ab" * ((MAX_PACKET - 8) // 2)
    assert len(payload) <= MAX_PACKET
    assert feed_all(frame(payload)) == [Packet(payload)]


def test_over_long_packet_is_refused_with_bounded_memory() -> None:
    reader = PacketReader()
    events = reader.feed(b"$")
    chunk = b"a" * 65536
    for _ in range(160):  # 10 MiB of one packet
        events += reader.feed(chunk)
        body = reader._body
        assert body is not None and len(body) <= 2 * MAX_PACKET + 8
    events += reader.feed(b"#00" + frame(b"g"))
    assert len(events) == 2
    assert isinstance(events[0], BadPacket) and "longer" in events[0].reason
    assert events[1] == Packet(b"g")  # and the next packet is read as usual


def test_over_long_packet_with_a_right_checksum_is_still_refused() -> None:
    payload = b"a" * (4 * MAX_PACKET)
    events = feed_all(frame(payload) + frame(b"g"))
    assert isinstance(events[0], BadPacket)
    assert events[1:] == [Packet(b"g")]


def test_dollar_after_an_over_long_body_starts_a_fresh_packet() -> None:
    events = feed_all(b"$" + b"a" * (3 * MAX_PACKET) + frame(b"g"))
    assert events == [Packet(b"g")]


# ------------------------------------------------------- escape / unescape
def test_escape_leaves_plain_bytes_alone() -> None:
    data = bytes(b for b in range(256) if b not in b"#$}*")
    assert escape(data) == data


def test_escape_output_has_no_framing_bytes() -> None:
    escaped = escape(bytes(range(256)))
    assert b"#" not in escaped and b"$" not in escaped and b"*" not in escaped
    assert len(escaped) == 256 + 4


def test_escape_round_trips_random_bytes() -> None:
    rng = random.Random(0x5EED)
    special = list(b"#$}*")
    for _ in range(500):
        n = rng.randrange(0, 300)
        if rng.random() < 0.5:
            data = rng.randbytes(n)
        else:  # dense in the bytes that need escaping
            data = bytes(rng.choice([*special, rng.randrange(256)]) for _ in range(n))
        escaped = escape(data)
        assert unescape(escaped) == data
        for byte in b"#$*":
            assert byte not in escaped
        # And through the reader, framed, split anywhere.
        framed = frame(escaped)
        cut = rng.randrange(len(framed) + 1)
        assert feed_all(framed, chunks=[cut]) == [Packet(data)]


def test_unescape_without_specials_is_identity() -> None:
    data = b"m1000,40"
    assert unescape(data) is data or unescape(data) == data


def test_public_names() -> None:
    for name in rsp.__all__:
        assert hasattr(rsp, name)
