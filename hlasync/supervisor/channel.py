"""The wire between the supervisor and its worker processes: a stream
socket (``socketpair``) carrying frames, each a pickled *batch* of messages
(a length prefix, then the pickle). Both sides send everything that
accumulated since their last write in one frame, so a busy channel costs one
system call per batch, not per call.

A message is one of the records of :mod:`.messages` (whose
``ident_field``, for a request or its answer, says which one it is). Only the
supervisor's own worker processes are on the other end: the pickles are
trusted.

What one side pickles the other cannot always unpickle: a class of the
application's ``__main__`` exists in the supervisor's process only. Two rules
keep that from breaking the channel:

- What application code raised (a host function the supervisor runs for a
  worker's guest) crosses as a description (:func:`describe`), never as
  itself: the side that raised it keeps the original. (hlasync's own errors,
  whose classes both sides have, cross as themselves.)
- A message that holds something the receiver cannot import arrives as
  :class:`~.messages.Undecodable` (its class, which request it is, and why),
  so that the receiver fails that one request; the rest of its batch arrives
  as sent. A frame of which not even that can be read, or whose bad message
  does not say which request it is, raises its unpickling error.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import struct
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from .messages import Message, Undecodable, ident_of

__all__ = [
    "HOLD_LIMIT",
    "MAX_FRAME",
    "READ_SIZE",
    "Decoder",
    "DescribedError",
    "Reader",
    "SocketSender",
    "describe",
    "encode",
]

_HEADER = struct.Struct("<I")
#: The largest frame either side accepts (a batch of large call arguments fits).
MAX_FRAME = 1 << 30

#: What one end receives (``ToWorker`` or ``ToSupervisor``), or sends.
M = TypeVar("M", bound=Message)


def encode(messages: Sequence[Message]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a batch of {len(body)} bytes exceeds the channel's {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


#: Seconds a held message waits at most for others to go out with it (see
#: :class:`SocketSender`): on the 2-CPU project machine a worker process
#: with two busy hot sandboxes takes about 1.3 ms for eight calls, and
#: 0.5 ms cut its frames to two outcomes each (4,068 calls/s against 5,465
#: with 2 ms, 2 worker processes).
HOLD_LIMIT = 0.002

#: Bytes one read of a channel takes at most (a larger frame takes several).
READ_SIZE = 1 << 20


class Reader:
    """Reads a channel's socket into one buffer it keeps. ``sock.recv(READ_SIZE)``
    made a new 1 MiB bytes object for every read, however little came: an
    allocation the size of the buffer and its page faults each time (15.6 us
    against 2.7 us for ``recv_into`` on the 2-CPU project machine)."""

    def __init__(self, sock: Any) -> None:
        self._recv_into = sock.recv_into
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)

    def read(self) -> memoryview:
        """What one ``recv`` gave (empty at the end of the channel); valid until
        the next read. OSError (BlockingIOError for a non-blocking socket with
        nothing to read) as ``recv`` raises it."""
        return self._view[: self._recv_into(self._buffer)]


class Decoder(Generic[M]):
    """Bytes in, batches out (a frame may arrive in pieces): the messages the
    other end sent (``M``), one it could not have sent readably replaced by an
    :class:`~.messages.Undecodable`."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> Iterator[list[M | Undecodable]]:
        # Whole frames are decoded where they lie (the read's buffer when
        # nothing is buffered, else the buffer), no copy per frame; what is
        # left (a frame cut short) is kept once, after the last whole frame.
        if self._buffer:
            self._buffer += data
            view = memoryview(self._buffer)
        else:
            view = memoryview(data)
        start, size = 0, len(view)
        try:
            while size - start >= _HEADER.size:
                (length,) = _HEADER.unpack_from(view, start)
                if length > MAX_FRAME:
                    raise ValueError(f"frame of {length} bytes: the channel is corrupt")
                end = start + _HEADER.size + length
                if end > size:
                    break
                frame = view[start + _HEADER.size : end]
                start = end
                yield _decode(frame)
        finally:
            # A fresh buffer for the rest (the view pins the old one): the
            # rest only, so a long frame arriving in pieces is not copied
            # again for every piece while nothing is consumed.
            if view.obj is self._buffer:
                if start:
                    self._buffer = bytearray(view[start:])
            elif start < size:
                self._buffer = bytearray(view[start:])


def _decode(body: bytes | memoryview) -> list[Any]:
    """One frame's body: its batch of messages (salvaged one by one where it does not unpickle)."""
    try:
        batch: list[Any] = pickle.loads(body)
    except Exception as exc:  # noqa: BLE001 - salvaged message by message, or raised
        batch = _salvage(bytes(body), exc)
    return batch


class SocketSender(Generic[M]):
    """Sends from any thread on a blocking socket: the thread that posts into
    an idle sender writes, and whatever other threads post meanwhile goes out
    with its next write (one frame per batch, no thread hand-off per message).

    :meth:`hold` queues a message without writing it, so that several go out
    in one frame (one wake-up of the other end for all of them): held messages
    go out with the next :meth:`post`, and at the latest
    ``hold_limit`` seconds after the first of them was held (a thread of the
    sender's, ``hlasync-flush``, made by the first hold, sees to that).
    Messages go out in the order they were queued, held or not."""

    def __init__(self, sock: object, hold_limit: float = HOLD_LIMIT) -> None:
        self._sendall = sock.sendall  # type: ignore[attr-defined]
        self._queue: list[M] = []
        self._lock = threading.Lock()
        self._writing = False
        self._closed = False
        self.broken = False
        self.hold_limit = hold_limit
        #: When the oldest message queued without a write was held
        #: (time.monotonic(); 0.0 when none is).
        self._held_since = 0.0
        self._wakeup = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False

    def post(self, message: M) -> None:
        """Queue ``message`` and write what is queued (held messages first)."""
        self.post_many((message,))

    def post_many(self, messages: Sequence[M], *, hold: bool = False) -> None:
        """Queue ``messages``, which go out in one frame (with what is queued
        before them), and write what is queued; with ``hold``, :meth:`hold` them."""
        if hold:
            self._hold(messages)
            return
        with self._lock:
            if self._closed:
                return
            self._queue.extend(messages)
            if self._writing:
                return  # the writing thread takes them with its next batch
            self._writing = True
        self._write()

    def hold(self, message: M) -> None:
        """Queue ``message`` without writing it (see the class)."""
        self._hold((message,))

    def _hold(self, messages: Sequence[M]) -> None:
        with self._lock:
            if self._closed:
                return
            self._queue.extend(messages)
            if self._writing or self._held_since:
                return  # it goes out with the write under way, or with those held
            self._held_since = time.monotonic()
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_main, name="hlasync-flush", daemon=True
                )
                self._flusher.start()
            elif self._flusher_idle:
                self._wakeup.notify()

    def _write(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                self._held_since = 0.0
                if not batch:
                    self._writing = False
                    if self._closed:
                        self._wakeup.notify_all()  # close() waits for the last write
                    return
            if not self.broken:
                try:
                    self._sendall(encode(batch))
                except OSError:
                    self.broken = True  # the other side is gone: its reader notices too

    def _flush_main(self) -> None:
        """The flusher: writes held messages ``hold_limit`` after the first was held."""
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._held_since:
                    self._flusher_idle = True
                    self._wakeup.wait()
                    self._flusher_idle = False
                    continue
                remaining = self._held_since + self.hold_limit - time.monotonic()
                if remaining > 0:
                    self._wakeup.wait(remaining)
                    continue
                if self._writing:  # the thread writing takes them
                    self._held_since = 0.0
                    continue
                self._writing = True
            self._write()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse further messages and write what is queued, held or not; return
        once it is written (by this thread, or by a thread writing already:
        waited for at most ``timeout`` seconds), so that a process may exit."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()  # the flusher ends
            while self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wakeup.wait(left)
            if not self._queue:
                return
            self._writing = True
        self._write()


# ------------------------------------------------------------ exceptions
class DescribedError(Exception):
    """An exception raised in the other process, described: ``type_name`` (the
    qualified name of its class), ``text`` (its ``str()``) and ``traceback``
    (as text). It unpickles anywhere, whatever the original holds; ``token``
    lets the side that raised it find the original again.

    Each is an instance of a subclass named as the original's class, so that
    what is built from ``type(error).__name__`` reads as it would have with the
    original ("host function 'f' raised KeyError: ...", a JavaScript error's
    ``name``)."""

    def __init__(self, type_name: str, text: str, traceback: str, token: int | None) -> None:
        super().__init__(text)
        self.type_name = type_name
        self.text = text
        self.traceback = traceback
        self.token = token

    def __str__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.type_name, self.text, self.traceback, self.token)
        return (_rebuild_described, (type(self).__name__, *fields))


def describe(error: BaseException, token: int | None = None) -> DescribedError:
    """``error`` as a :class:`DescribedError` (never raises: the description is
    what fails a guest's host call, which must not be left unanswered)."""
    cls = type(error)
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ still gets described
        text = f"<{cls.__name__}, whose str() failed>"
    try:
        trace = "".join(traceback.format_exception(error))
    except Exception:  # noqa: BLE001 - as above
        trace = ""
    name = f"{cls.__module__}.{cls.__qualname__}"
    return _described_class(cls.__name__)(name, text, trace, token)


def _rebuild_described(
    name: str, type_name: str, text: str, trace: str, token: int | None
) -> DescribedError:
    return _described_class(name)(type_name, text, trace, token)


@functools.lru_cache(maxsize=256)
def _described_class(name: str) -> type[DescribedError]:
    return type(name, (DescribedError,), {"__module__": __name__, "__qualname__": name})


# ------------------------------------------------------------- salvaging
#: ``.found``: the list :func:`_what_is_missing` notes :class:`_Missing` objects in.
_looking = threading.local()


class _Missing(Exception):
    """Stands, in a salvaged batch, for an object (or class) this process cannot
    import; ``missing`` names it. It accepts whatever unpickling does to the
    object it replaces. (An exception, so that an hlasync error holding one
    still rebuilds.)"""

    missing = ""

    def __new__(cls, *args: object, **kwargs: object) -> _Missing:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def __reduce_ex__(self, protocol: object) -> Any:
        # Noted wherever it is pickled: also inside another object's __reduce__
        # that swallows the error (an hlasync error's cause is pickled so).
        found = getattr(_looking, "found", None)
        if found is not None:
            found.append(self.missing)
        raise pickle.PicklingError(f"{self.missing} stands for what this process lacks")


class _Salvager(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception:  # noqa: BLE001 - whatever makes the import fail
            return type("Missing", (_Missing,), {"missing": f"{module}.{name}"})


def _salvage(body: bytes, error: Exception) -> list[Any]:
    """The batch in ``body``, which does not unpickle here (``error``), each
    message that holds what cannot be imported here replaced by an
    :class:`~.messages.Undecodable` of its class and identity. ``error`` is
    raised when the batch cannot be read even so, or a bad message does not
    say which request it is."""
    try:
        batch = _Salvager(io.BytesIO(body)).load()
    except Exception:  # noqa: BLE001 - not a missing class: nothing to salvage
        raise error from None
    if not isinstance(batch, list):
        raise error
    salvaged: list[Any] = []
    for message in batch:
        reason = _what_is_missing(message)
        if reason is None:
            salvaged.append(message)
            continue
        ident = ident_of(message) if isinstance(message, Message) else None
        if ident is None:
            raise error
        salvaged.append(Undecodable(type(message), ident, reason or _reason(error)))
    return salvaged


def _what_is_missing(message: object) -> str | None:
    """None when ``message`` holds nothing :class:`_Salvager` had to replace
    (it pickles again, and no :class:`_Missing` was met on the way); else why it
    cannot be read here ("" when that is not known)."""
    missing: list[str] = []
    _looking.found = missing
    try:
        pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - a whole message pickles again: this one is not whole
        if not missing:
            return ""
    finally:
        _looking.found = None
    if not missing:
        return None
    reason = f"{missing[0]} cannot be imported in process {os.getpid()}"
    if missing[0].startswith("__main__."):
        reason += " (a class of a program's __main__ exists in that program's process only)"
    return reason


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
