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
    """Sends from any thread on a blocking socket, without a thread of its own:
    the thread that posts into an idle sender writes, and whatever other
    threads post meanwhile goes out with its next write (one frame per batch,
    no thread hand-off per message)."""

    def __init__(self, sock: object) -> None:
        self._sendall = sock.sendall  # type: ignore[attr-defined]
        self._queue: list[tuple[object, ...]] = []
        self._lock = threading.Lock()
        self._writing = False
        self._closed = False
        self.broken = False

    def post(self, message: tuple[object, ...]) -> None:
        with self._lock:
            if self._closed:
                return
            self._queue.append(message)
            if self._writing:
                return  # the writing thread takes it with its next batch
            self._writing = True
        self._write()

    def _write(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._writing = False
                    return
            if not self.broken:
                try:
                    self._sendall(encode(batch))
                except OSError:
                    self.broken = True  # the other side is gone: its reader notices too

    def close(self) -> None:
        """Refuse further messages (what is queued has been or is being written)."""
        with self._lock:
            self._closed = True
