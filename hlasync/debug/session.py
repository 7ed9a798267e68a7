"""One debugger connection: the GDB remote protocol's packets, answered.

What is supported (the packets gdb 13 and lldb 14 send):

- ``qSupported`` (``PacketSize``, ``qXfer:features:read+``,
  ``qXfer:exec-file:read+``, ``swbreak+``, ``QStartNoAckMode+``,
  ``vContSupported+``), ``QStartNoAckMode``, ``qXfer:features:read:target.xml``,
  ``qXfer:exec-file:read`` (the guest ELF's path, so ``target remote`` alone
  finds the symbols), ``qAttached``, ``qC``, ``qfThreadInfo``/``qsThreadInfo``
  (one thread, id 1), ``H``, ``T``, ``?``;
- ``g``/``G``/``p``/``P`` (:mod:`.registers`), ``m``/``M``/``X`` at guest
  virtual addresses (:mod:`.pages`; an unmapped one is ``E14``);
- ``Z0``/``z0`` software breakpoints; ``Z1``-``Z4`` get the empty reply
  (unsupported: hardware breakpoints and watchpoints never fire at CPL3 on
  the PVM hosts measured, docs/architecture.md §14; gdb uses software
  watchpoints with ``set can-use-hw-watchpoints 0``);
- ``c``/``C``/``s``/``S``/``vCont`` (``vCont?``), Ctrl-C, ``k``/``vKill``, ``D``.

Anything else gets the empty reply, which both debuggers read as "not
supported".
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import rsp
from .pages import Unmapped, read_virtual, translate, write_virtual
from .registers import REGISTERS, TARGET_XML

if TYPE_CHECKING:
    from .server import DebugServer, Stop

__all__ = ["Session"]

_logger = logging.getLogger("hlasync.debug")

SIGINT = 2
_OK, _EMPTY = b"OK", b""
_E_FAULT, _E_INVALID, _E_STATE = b"E14", b"E16", b"E01"
#: Largest memory read or write in one packet (bytes), within PacketSize.
_MAX_MEMORY = (rsp.MAX_PACKET - 32) // 2
_THREAD = b"1"


class Session:
    def __init__(self, server: DebugServer, client: socket.socket) -> None:
        self.server = server
        self.client = client
        self.reader = rsp.PacketReader()
        self.acks = True
        self._send_lock = threading.Lock()
        self._last = b""
        self._done = False
        client.settimeout(0.1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---------------------------------------------------------------- I/O
    def run(self) -> None:
        while not self._done and not self.server.closed:
            try:
                data = self.client.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            for event in self.reader.feed(data):
                self._event(event)
                if self._done:
                    return

    def shutdown(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)
        self.client.close()

    def send(self, payload: bytes) -> None:
        packet = rsp.frame(payload)
        with self._send_lock:
            self._last = packet
            try:
                self.client.sendall(packet)
            except OSError:
                self._done = True

    def send_stop(self, stop: Stop) -> None:
        self.send(self._stop_reply(stop))

    def _event(self, event: rsp.Event) -> None:
        match event:
            case rsp.Packet(payload=payload):
                if self.acks:
                    self._raw(b"+")
                reply = self._packet(payload)
                if reply is not None:
                    self.send(reply)
            case rsp.BadPacket(reason=reason):
                _logger.debug("bad packet from the debugger: %s", reason)
                if self.acks:
                    self._raw(b"-")
            case rsp.Interrupt():
                self.server.request_stop(SIGINT)
            case rsp.Nack():
                if self._last:
                    self._raw(self._last)
            case rsp.Ack():
                pass

    def _raw(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.client.sendall(data)
            except OSError:
                self._done = True

    # ------------------------------------------------------------ packets
    def _packet(self, p: bytes) -> bytes | None:
        head = p[:1]
        if head == b"q" or head == b"Q":
            return self._query(p)
        if head == b"v":
            return self._v(p)
        if head == b"H" or head == b"T":
            return _OK
        if head == b"?":
            return self._stop_now()
        if head in (b"c", b"s", b"C", b"S"):
            return self._resume(head, p[1:])
        if head == b"k":
            self._end("kill")
            return None
        if head == b"D":
            self.send(_OK)
            self._end("detach")
            return None
        if head in (b"Z", b"z"):
            return self._breakpoint(p)
        stop = self._stopped()
        if stop is None:
            return _E_STATE  # registers and memory only while the guest is stopped
        if head == b"g":
            return stop.registers.read_all().hex().encode()
        if head == b"G":
            return self._try(lambda: stop.registers.write_all(bytes.fromhex(p[1:].decode())))
        if head == b"p":
            return self._read_register(stop, p[1:])
        if head == b"P":
            number, _, value = p[1:].partition(b"=")
            return self._try(
                lambda: stop.registers.write(int(number, 16), bytes.fromhex(value.decode()))
            )
        if head == b"m":
            return self._read_memory(stop, p[1:])
        if head in (b"M", b"X"):
            return self._write_memory(stop, p)
        return _EMPTY

    def _query(self, p: bytes) -> bytes | None:
        if p.startswith(b"qSupported"):
            return (
                b"PacketSize=%x;qXfer:features:read+;qXfer:exec-file:read+;swbreak+;"
                b"QStartNoAckMode+;vContSupported+" % rsp.MAX_PACKET
            )
        if p == b"QStartNoAckMode":
            self.send(_OK)
            self.acks = False  # from the next packet on
            return None
        if p.startswith(b"qXfer:features:read:target.xml:"):
            return self._xfer(TARGET_XML.encode(), p)
        if p.startswith(b"qXfer:exec-file:read:"):
            return self._xfer(self.server.image_path.encode(), p)
        if p == b"qAttached" or p.startswith(b"qAttached:"):
            return b"1"
        if p == b"qC":
            return b"QC" + _THREAD
        if p == b"qfThreadInfo":
            return b"m" + _THREAD
        if p == b"qsThreadInfo":
            return b"l"
        if p.startswith(b"qSymbol"):
            return _OK
        return _EMPTY

    def _xfer(self, data: bytes, p: bytes) -> bytes:
        try:
            offset_text, length_text = p.rsplit(b":", 1)[1].split(b",")
            offset, length = int(offset_text, 16), int(length_text, 16)
        except ValueError:
            return _E_INVALID
        if offset < 0 or length < 0:
            return _E_INVALID
        chunk = data[offset : offset + min(length, _MAX_MEMORY)]
        more = offset + len(chunk) < len(data)
        return (b"m" if more else b"l") + rsp.escape(chunk)

    def _v(self, p: bytes) -> bytes | None:
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            # One thread: the first action is the one that applies to it.
            action = p[6:].split(b";")[0].split(b":")[0]
            if not action or action[:1] not in b"cCsS":
                return _E_INVALID
            return self._resume(action[:1], action[1:])
        if p.startswith(b"vKill"):
            self.send(_OK)
            self._end("kill")
            return None
        return _EMPTY  # vMustReplyEmpty and the rest

    # -------------------------------------------------------------- state
    def _stopped(self) -> Stop | None:
        with self.server.lock:
            stop = self.server.stop
            return stop if stop is not None and stop.verdict is None else None

    def _stop_now(self) -> bytes | None:
        """``?``: the current stop; while the guest runs, stop it (as Ctrl-C):
        the reply is then sent by :meth:`DebugServer.publish` when it stops."""
        server = self.server
        server.request_stop(SIGINT)
        with server.lock:
            stop = server.stop
            if stop is not None and stop.verdict is None:
                return self._stop_reply(stop)
            server.reply_due = True
        return None

    def _stop_reply(self, stop: Stop) -> bytes:
        reply = b"T%02xthread:%s;" % (stop.signal, _THREAD)
        if stop.swbreak:
            reply += b"swbreak:;"
        return reply

    def _resume(self, kind: bytes, rest: bytes) -> bytes | None:
        """``c``/``s`` (an address after them, to resume elsewhere, is not
        supported and ignored) or ``C``/``S`` with a signal."""
        stop = self._stopped()
        if stop is None:
            return _E_STATE
        signal = 0
        if kind in (b"C", b"S"):
            try:
                signal = int(rest.split(b";")[0], 16)
            except ValueError:
                return _E_INVALID
        if kind.lower() == b"s":
            self.server.resumed(stop, "step")
        elif signal and signal == stop.signal and stop.fault:
            self.server.resumed(stop, "signal")  # pass the fault on: the call fails
        else:
            self.server.resumed(stop, "continue")
        return None  # the reply is the next stop

    def _end(self, verdict: str) -> None:
        stop = self._stopped()
        if stop is not None:
            self.server.resumed(stop, "kill" if verdict == "kill" else "detach")
        self._done = True

    def _try(self, change: Callable[[], None]) -> bytes:
        try:
            change()
        except (ValueError, IndexError):
            return _E_INVALID
        return _OK

    def _read_register(self, stop: Stop, text: bytes) -> bytes:
        try:
            number = int(text, 16)
        except ValueError:
            return _E_INVALID
        if not 0 <= number < len(REGISTERS):
            return _E_INVALID
        return stop.registers.read(number).hex().encode()

    def _read_memory(self, stop: Stop, text: bytes) -> bytes:
        try:
            address_text, length_text = text.split(b",")
            address, length = int(address_text, 16), int(length_text, 16)
        except ValueError:
            return _E_INVALID
        if length < 0:
            return _E_INVALID
        length = min(length, _MAX_MEMORY)
        with self.server.lock:
            if self.server.stop is not stop:
                return _E_STATE  # resumed meanwhile: its memory may be gone
            try:
                data = read_virtual(self.server.memory, stop.cr3, address, length)
            except Unmapped:
                # A read that runs into an unmapped page returns what precedes it.
                data = self._readable_prefix(stop, address, length)
                if not data:
                    return _E_FAULT
            data = self.server.breakpoints.hide(address, data)
        return data.hex().encode()

    def _readable_prefix(self, stop: Stop, address: int, length: int) -> bytes:
        end = min(address + length, (address | 0xFFF) + 1)
        try:
            return read_virtual(self.server.memory, stop.cr3, address, end - address)
        except Unmapped:
            return b""

    def _write_memory(self, stop: Stop, p: bytes) -> bytes:
        head, sep, body = p[1:].partition(b":")
        try:
            address_text, length_text = head.split(b",")
            address, length = int(address_text, 16), int(length_text, 16)
            data = bytes.fromhex(body.decode()) if p[:1] == b"M" else body
        except ValueError:
            return _E_INVALID
        if not sep or len(data) != length:
            return _E_INVALID
        if not data:
            return _OK  # gdb probes X with an empty write
        with self.server.lock:
            if self.server.stop is not stop:
                return _E_STATE
            try:
                write_virtual(self.server.memory, self.server.write, stop.cr3, address, data)
            except Unmapped:
                return _E_FAULT
        return _OK

    def _breakpoint(self, p: bytes) -> bytes:
        try:
            kind_text, address_text, _ = p[1:].split(b",", 2)
            kind, address = int(kind_text), int(address_text, 16)
        except ValueError:
            return _E_INVALID
        if kind != 0:
            return _EMPTY  # hardware breakpoints and watchpoints: not on this host
        server = self.server
        with server.lock:
            if p[:1] == b"z":
                server.breakpoints.wanted.discard(address)
                return _OK
            stop = server.stop
            if stop is not None:
                try:
                    translate(server.memory, stop.cr3, address)
                except Unmapped:
                    return _E_FAULT
            server.breakpoints.wanted.add(address)
        return _OK
