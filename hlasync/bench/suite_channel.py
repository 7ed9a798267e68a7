"""Channel: the candidates for the wire between the supervisor and a worker
process, measured with the supervisor's own framing (a length prefix, then a
pickled batch of messages) and its event-loop side (the loop waits for the
descriptor to be readable, as ``Supervisor(processes=N)`` does):

- ``pipe``: two pipes, one per direction;
- ``socketpair``: one ``AF_UNIX`` stream socket pair (what the supervisor uses);
- ``shared-memory ring``: one single-producer ring per direction in a shared
  ``memfd``, each with an ``eventfd`` that wakes the reader.

The far end is a spawned interpreter (``_channel_child``) that answers every
``call`` message with a ``done`` one, as a worker does; no VM is involved, so
the table shows the channel alone. Two measurements per candidate, side by
side in one run: the round trip of one call (p50, p90; and with this side
sleeping in ``poll()`` instead of the event loop, to show the loop's share),
and the rate of calls with up to 64 in flight, each side sending what
accumulated in one frame.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio

from ..supervisor.channel import Decoder, encode
from ..supervisor.messages import Call, Shutdown, ToSupervisor, Undecodable
from ._common import SuiteOutput, format_ns, gc_paused, machine_lines

__all__ = ["RING_BYTES", "Ring", "suite"]

#: Data bytes in each direction's ring.
RING_BYTES = 1 << 20
_INDEX = struct.Struct("<Q")
_TAIL_AT, _HEAD_AT, _DATA_AT = 0, 64, 128  # the two indices on their own cache lines
WINDOW = 64
CANDIDATES = ("pipe", "socketpair", "shared-memory ring")
#: A call message as the supervisor sends it (call id, target, function, args, limits).
CALL = Call(0, "pool-1#0", "add", (1, 2), None, None)


class Ring:
    """One direction of the shared-memory candidate: a byte ring in ``buffer``
    at ``offset`` (tail and head indices, then ``RING_BYTES`` of data) with an
    ``eventfd`` the writer signals. One writer and one reader; x86 stores are
    seen in order, so data written before the tail is published is visible to
    a reader that sees the new tail."""

    def __init__(self, buffer: mmap.mmap, offset: int, event_fd: int) -> None:
        self.view = memoryview(buffer)[offset : offset + _DATA_AT + RING_BYTES]
        self.event_fd = event_fd

    def write(self, data: bytes) -> None:
        view, size = self.view, len(data)
        (tail,) = _INDEX.unpack_from(view, _TAIL_AT)
        while tail + size - _INDEX.unpack_from(view, _HEAD_AT)[0] > RING_BYTES:
            time.sleep(0.0001)  # full: the benchmark never fills 1 MiB
        start = tail % RING_BYTES
        first = min(size, RING_BYTES - start)
        view[_DATA_AT + start : _DATA_AT + start + first] = data[:first]
        if first < size:
            view[_DATA_AT : _DATA_AT + size - first] = data[first:]
        _INDEX.pack_into(view, _TAIL_AT, tail + size)
        os.eventfd_write(self.event_fd, 1)

    def read(self) -> bytes:
        """Everything written since the last read (after the eventfd said so; may
        be nothing, when an earlier read took what a later signal announced)."""
        view = self.view
        os.eventfd_read(self.event_fd)
        (head,) = _INDEX.unpack_from(view, _HEAD_AT)
        (tail,) = _INDEX.unpack_from(view, _TAIL_AT)
        start, size = head % RING_BYTES, tail - head
        first = min(size, RING_BYTES - start)
        data = bytes(view[_DATA_AT + start : _DATA_AT + start + first])
        if first < size:
            data += bytes(view[_DATA_AT : _DATA_AT + size - first])
        _INDEX.pack_into(view, _HEAD_AT, tail)
        return data


class _Link:
    """The supervisor's end of one candidate, and the child process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.closers: list[Callable[[], None]] = []
        child_fds: list[int] = []
        if kind == "pipe":
            down_r, down_w = os.pipe()
            up_r, up_w = os.pipe()
            child_fds = [down_r, up_w]
            self.read_fd = up_r
            self.send: Callable[[bytes], None] = lambda data: _write_all(down_w, data)
            self.receive: Callable[[], bytes] = lambda: os.read(up_r, 1 << 20)
            self.closers += [lambda: os.close(down_w), lambda: os.close(up_r)]
            to_close = [down_r, up_w]
        elif kind == "socketpair":
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_fds = [theirs.fileno()]
            self.read_fd = mine.fileno()
            self.send = mine.sendall
            self.receive = lambda: mine.recv(1 << 20)
            self.closers.append(mine.close)
            to_close = []
            self._theirs = theirs
        else:
            memory = os.memfd_create("hlasync-bench-ring")
            os.ftruncate(memory, 2 * (_DATA_AT + RING_BYTES))
            buffer = mmap.mmap(memory, 2 * (_DATA_AT + RING_BYTES))
            down_event, up_event = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
            down, up = Ring(buffer, 0, down_event), Ring(buffer, _DATA_AT + RING_BYTES, up_event)
            child_fds = [memory, down_event, up_event]
            self.read_fd = up_event
            self.send, self.receive = down.write, up.read

            def close() -> None:
                down.view.release()
                up.view.release()
                buffer.close()
                for fd in (down_event, up_event):
                    os.close(fd)

            self.closers.append(close)
            to_close = [memory]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hlasync.bench._channel_child", kind, *map(str, child_fds)],
            pass_fds=child_fds,
        )
        for fd in to_close:
            os.close(fd)
        if kind == "socketpair":
            self._theirs.close()
        self.decoder = Decoder[ToSupervisor]()

    async def messages(self) -> list[ToSupervisor | Undecodable]:
        """Wait (on the event loop) for the next frames; their messages."""
        while True:
            await anyio.wait_readable(self.read_fd)
            data = self.receive()
            if not data and self.kind != "shared-memory ring":  # a ring is never at its end
                raise EOFError("the channel's child process went away")
            out = [message for batch in self.decoder.feed(data) for message in batch]
            if out:
                return out

    def messages_blocking(self) -> list[ToSupervisor | Undecodable]:
        """The same without an event loop: this thread sleeps in poll()."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        while True:
            poller.poll()
            out = [message for batch in self.decoder.feed(self.receive()) for message in batch]
            if out:
                return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(encode([Shutdown()]))
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for close in self.closers:
            close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _measure(kind: str, round_trips: int, window_s: float, rounds: int) -> dict[str, Any]:
    link = _Link(kind)
    try:
        for _ in range(200):  # the child has started and both ends are warm
            link.send(encode([CALL]))
            await link.messages()
        samples: list[int] = []
        with gc_paused():
            for _ in range(round_trips):
                start = time.perf_counter_ns()
                link.send(encode([CALL]))
                await link.messages()
                samples.append(time.perf_counter_ns() - start)
        blocking: list[int] = []
        with gc_paused():
            for _ in range(round_trips):
                start = time.perf_counter_ns()
                link.send(encode([CALL]))
                link.messages_blocking()
                blocking.append(time.perf_counter_ns() - start)
        rates: list[float] = []
        for _ in range(rounds):
            done = in_flight = 0
            began = time.perf_counter()
            end = began + window_s
            while True:
                now_open = time.perf_counter() < end
                if now_open and in_flight < WINDOW:
                    link.send(encode([CALL] * (WINDOW - in_flight)))
                    in_flight = WINDOW
                if not in_flight:
                    break
                answered = len(await link.messages())
                in_flight -= answered
                done += answered
            rates.append(done / (time.perf_counter() - began))
    finally:
        link.close()
    samples.sort()
    blocking.sort()
    return {
        "kind": kind,
        "round_trip_ns": samples,
        "p50_ns": samples[len(samples) // 2],
        "p90_ns": samples[int(len(samples) * 0.9)],
        "blocking_round_trip_ns": blocking,
        "blocking_p50_ns": blocking[len(blocking) // 2],
        "rates": rates,
        "rate": statistics.median(rates),
    }


def suite(quick: bool, machine: dict[str, Any], backend: str) -> SuiteOutput:
    started = time.perf_counter()
    round_trips, window_s, rounds = (300, 0.2, 2) if quick else (5000, 1.0, 5)
    rows = [
        anyio.run(_measure, kind, round_trips, window_s, rounds, backend=backend)
        for kind in CANDIDATES
    ]
    wall = time.perf_counter() - started
    lines = [*machine_lines(machine)]
    lines.append(f"- mode: {'quick (smoke test, not for quoting)' if quick else 'full'}")
    lines.append(f"- event loop: {backend}; far end: a spawned interpreter answering each call")
    lines += [
        "",
        "| channel | round trip p50 | p90 | same, no event loop, p50 "
        "| calls/s, 64 in flight (median) | n | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['kind']} | {format_ns(row['p50_ns'])} | {format_ns(row['p90_ns'])} | "
            f"{format_ns(row['blocking_p50_ns'])} | "
            f"{row['rate']:,.0f} | {len(row['round_trip_ns'])} | {len(row['rates'])} |"
        )
    document = {
        "machine": machine,
        "mode": "quick" if quick else "full",
        "backend": backend,
        "window": WINDOW,
        "ring_bytes": RING_BYTES,
        "rows": rows,
        "wall_seconds": wall,
    }
    return SuiteOutput("\n".join(lines), document, wall, [])
