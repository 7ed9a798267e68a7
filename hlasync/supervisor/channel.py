"""The wire between the supervisor and its worker processes: a stream
socket (``socketpair``) carrying frames, each a pickled *batch* of messages
(a length prefix, then the pickle). Both sides send everything that
accumulated since their last write in one frame, so a busy channel costs one
system call per batch, not per call.

A message is a tuple whose first item names it (see ``worker.py`` and
``processes.py`` for the vocabulary). Only the supervisor's own worker
processes are on the other end: the pickles are trusted.
"""

from __future__ import annotations

import pickle
import struct
import threading
from collections.abc import Iterator

__all__ = ["MAX_FRAME", "Decoder", "SocketSender", "encode"]

_HEADER = struct.Struct("<I")
#: The largest frame either side accepts (a batch of large call arguments fits).
MAX_FRAME = 1 << 30


def encode(messages: list[tuple[object, ...]]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a batch of {len(body)} bytes exceeds the channel's {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class Decoder:
    """Bytes in, batches out (a frame may arrive in pieces)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[list[tuple[object, ...]]]:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes: the channel is corrupt")
            end = _HEADER.size + length
            if len(buffer) < end:
                return
            body = bytes(buffer[_HEADER.size : end])
            del buffer[:end]
            yield pickle.loads(body)


class SocketSender:
    """Sends from any thread on a blocking socket: ``post`` queues, one sender
    thread writes whatever queued meanwhile as one frame."""

    def __init__(self, sock: object, name: str) -> None:
        self._sock = sock
        self._queue: list[tuple[object, ...]] = []
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.broken = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def post(self, message: tuple[object, ...]) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue.append(message)
            if len(self._queue) == 1:
                self._cond.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then stop (bounded)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _main(self) -> None:
        sendall = self._sock.sendall  # type: ignore[attr-defined]
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                closing = self._closed
            if batch and not self.broken:
                try:
                    sendall(encode(batch))
                except OSError:
                    self.broken = True  # the other side is gone: its reader notices too
            if closing:
                return
