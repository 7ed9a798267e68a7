"""The GDB remote serial protocol's framing, without I/O.

A debugger sends *packets* ``$payload#cc`` (``cc``: the payload's byte sum
modulo 256 in hex), acknowledged with ``+`` (or ``-``: send again) until
``QStartNoAckMode`` switches acknowledgements off, and a bare ``0x03`` byte
to interrupt a running target. Replies are packets too. Inside a payload
``#``, ``$``, ``}`` and ``*`` are escaped as ``}`` followed by the byte XOR
0x20 (binary data of ``X`` and ``qXfer`` replies); ``*`` starts a run-length
repeat, which debuggers may send.

:class:`PacketReader` turns a byte stream into :class:`Packet`,
:data:`INTERRUPT`, :data:`ACK` and :data:`NACK` events; :func:`frame` makes a
reply. Both do work linear in the bytes given, and a packet longer than
:data:`MAX_PACKET` is refused (the debugger is told the size in
``qSupported``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ACK",
    "INTERRUPT",
    "MAX_PACKET",
    "NACK",
    "Ack",
    "BadPacket",
    "Interrupt",
    "Nack",
    "Packet",
    "PacketReader",
    "escape",
    "frame",
    "unescape",
]

#: The largest packet payload accepted (and announced as ``PacketSize``).
MAX_PACKET = 0x4000


@dataclass(frozen=True, slots=True)
class Packet:
    """A packet whose checksum matched: its payload, unescaped (run-length
    repeats expanded)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BadPacket:
    """A packet whose checksum did not match, or that was too long: answer ``-``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Interrupt:
    """``0x03`` outside a packet: stop the running target (Ctrl-C)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """``+``: the last reply arrived."""


@dataclass(frozen=True, slots=True)
class Nack:
    """``-``: send the last reply again."""


INTERRUPT, ACK, NACK = Interrupt(), Ack(), Nack()
Event = Packet | BadPacket | Interrupt | Ack | Nack

_SPECIAL = frozenset(b"#$}*")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class PacketReader:
    """Bytes from the debugger in, events out (:meth:`feed`)."""

    def __init__(self) -> None:
        self._body: bytearray | None = None  # inside $...# when not None
        self._sum: bytearray | None = None  # the checksum digits read so far
        self._too_long = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for byte in data:
            body = self._body
            if body is None:
                if byte == 0x24:  # $
                    self._body, self._too_long = bytearray(), False
                elif byte == 0x03:
                    events.append(INTERRUPT)
                elif byte == 0x2B:  # +
                    events.append(ACK)
                elif byte == 0x2D:  # -
                    events.append(NACK)
                continue  # anything else between packets is noise
            if self._sum is not None:
                if byte == 0x24:  # $ where a checksum digit belongs: cut off, start anew
                    self._body, self._sum, self._too_long = bytearray(), None, False
                    continue
                self._sum.append(byte)
                if len(self._sum) == 2:
                    events.append(self._finish(body, bytes(self._sum)))
                    self._body = self._sum = None
                continue
            if byte == 0x23:  # #
                self._sum = bytearray()
            elif byte == 0x24:  # a new $ inside a packet: the old one was cut off
                self._body, self._too_long = bytearray(), False
            elif len(body) >= 2 * MAX_PACKET + 8:
                self._too_long = True  # keep reading to its end, then refuse it
            else:
                body.append(byte)
        return events

    def _finish(self, body: bytearray, digits: bytes) -> Event:
        if self._too_long:
            return BadPacket(f"packet longer than {MAX_PACKET} bytes")
        if not all(digit in _HEX for digit in digits):  # int() would take "+0", " 0"
            return BadPacket(f"checksum {digits!r} is not hex")
        expected = int(digits, 16)
        if sum(body) & 0xFF != expected:
            return BadPacket("checksum mismatch")
        try:
            return Packet(unescape(bytes(body)))
        except ValueError as exc:
            return BadPacket(str(exc))


def unescape(body: bytes) -> bytes:
    """A payload with ``}`` escapes and ``*`` run-length repeats undone."""
    if b"}" not in body and b"*" not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        byte = body[i]
        if byte == 0x7D:  # }
            if i + 1 >= n:
                raise ValueError("packet ends in an escape")
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif byte == 0x2A:  # *: repeat the previous byte (count - 29) more times
            if not out or i + 1 >= n:
                raise ValueError("run-length repeat without a byte to repeat")
            count = body[i + 1] - 29
            if count < 0 or len(out) + count > 2 * MAX_PACKET:
                raise ValueError("bad run-length repeat")
            out.extend(out[-1:] * count)
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def escape(data: bytes) -> bytes:
    """Binary ``data`` with ``#$}*`` escaped, for a reply payload."""
    if not any(b in _SPECIAL for b in data):
        return data
    out = bytearray()
    for byte in data:
        if byte in _SPECIAL:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cc`` (``payload`` already escaped where it holds binary data)."""
    return b"$" + payload + b"#" + b"%02x" % (sum(payload) & 0xFF)
