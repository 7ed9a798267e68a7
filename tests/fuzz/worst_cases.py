"""The worst inputs tried on each parser of untrusted bytes, with the time and
peak memory (tracemalloc) each takes, as a markdown table:

    python -m tests.fuzz.worst_cases

Inputs are as large as the default output buffer allows (2 MiB), or, for the
worker channel, as a large call's frame. Times are the best of three runs on
this machine; memory is what Python allocated at the peak of one run.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio

from hlasync import abi
from hlasync.js.protocol import decode_reply, syntax_position
from hlasync.supervisor import channel

__all__ = ["Case", "cases", "loop_lag", "main"]

MiB = 1 << 20
BUFFER = 2 * MiB  # the JS runtime's output buffer (hlasync.js.runtime.BUFFER_SIZE)


@dataclass(frozen=True, slots=True)
class Case:
    parser: str
    input: str
    size: int
    parse: Callable[[], object]


def _reply(status: bytes, text: str) -> bytes:
    return status + text.encode()


def _array(item: str, size: int = BUFFER - 1) -> str:
    return "[" + ",".join([item] * ((size - 2) // (len(item) + 1))) + "]"


def _js_cases() -> Iterator[Case]:
    stack = "at " * (BUFFER // 3)
    yield Case(
        "js.protocol.syntax_position",
        '2 MiB of "at " (1 line)',
        len(stack),
        lambda: syntax_position(stack),
    )
    lines = "    at x.js:1:\n" * (BUFFER // 15)
    yield Case(
        "js.protocol.syntax_position",
        '2 MiB of "    at x.js:1:" lines',
        len(lines),
        lambda: syntax_position(lines),
    )
    replies = {
        "2 MiB array of 0": _reply(b"R", _array("0")),
        "2 MiB array of {}": _reply(b"R", _array("{}")),
        "2 MiB array of 1.5": _reply(b"R", _array("1.5")),
        '2 MiB array of "ab"': _reply(b"R", _array('"ab"')),
        "2 MiB string of \\u0000": _reply(b"R", json.dumps("\0" * (BUFFER // 6 - 1))),
        '2 MiB syntax error, stack "at "': _reply(
            b"S", json.dumps({"stack": "at " * (BUFFER // 3 - 5)})
        ),
        "2 MiB not JSON": b"R" + b"x" * (BUFFER - 1),
        "1 MiB [ then 1 MiB ]": b"R" + b"[" * (BUFFER // 2) + b"]" * (BUFFER // 2 - 1),
        "number of 4,300 digits": _reply(b"R", "7" * 4300),
    }
    for share_gil, parser in (
        (False, "js.protocol.decode_reply"),
        (True, "decode_reply(share_gil=True)"),
    ):
        for name, reply in replies.items():
            yield Case(
                parser,
                name,
                len(reply),
                lambda reply=reply, share_gil=share_gil: _decoded(reply, share_gil),  # type: ignore[misc]
            )


def _decoded(reply: bytes, share_gil: bool) -> object:
    try:
        return decode_reply(reply, sandbox_id="p", handler="h", share_gil=share_gil)
    except Exception as exc:  # noqa: BLE001 - an error is an outcome too
        return exc


def _abi_cases() -> Iterator[Case]:
    text = ("\u00e9\u4e16" * BUFFER)[: (BUFFER - 32) // 3]
    payload = text.encode()
    result = memoryview(
        bytearray(
            abi.RESULT.pack(abi.MAGIC_RESULT, 0, abi.ValueType.STR, len(payload), 0)
            + payload
            + b"\0"
        )
    )
    yield Case(
        "abi.read_result",
        "2 MiB str result (multi-byte UTF-8)",
        len(result),
        lambda: abi.read_result(result, abi.ValueType.STR),
    )
    piece = (BUFFER - 256) // abi.MAX_ARGS
    name = b"f" * 200
    offset = abi.HEADER.size + abi.SLOT.size * abi.MAX_ARGS + len(name)
    slots = b"".join(
        abi.SLOT.pack(abi.ValueType.STR, piece, offset + i * piece) for i in range(abi.MAX_ARGS)
    )
    body = slots + name + b"a" * (piece * abi.MAX_ARGS)
    call = memoryview(
        bytearray(
            abi.HEADER.pack(
                abi.MAGIC_HOSTCALL, len(name), abi.MAX_ARGS, abi.HEADER.size + len(body)
            )
            + body
        )
    )
    yield Case(
        "abi.read_host_call",
        "2 MiB host call: 8 str arguments",
        len(call),
        lambda: abi.read_host_call(call),
    )
    message = memoryview(
        bytearray(abi.MESSAGE.pack(abi.MAGIC_PRINT, BUFFER - 16, 0) + b"\x1b" * (BUFFER - 16))
    )
    yield Case(
        "abi.read_message",
        "2 MiB print message",
        len(message),
        lambda: abi.read_message(message, abi.MAGIC_PRINT),
    )


def _channel_cases() -> Iterator[Case]:
    big = channel.encode([b"x" * (64 * MiB)])  # type: ignore[list-item]
    yield Case(
        "supervisor.channel.Decoder.feed",
        "64 MiB frame in 1 MiB reads",
        len(big),
        lambda: _fed(big, MiB),
    )
    tiny = channel.encode([]) * 400_000
    yield Case(
        "supervisor.channel.Decoder.feed",
        f"{400_000:,} empty batches in one read",
        len(tiny),
        lambda: _fed(tiny, len(tiny)),
    )
    lie = struct.pack("<I", channel.MAX_FRAME) + b"\0" * (16 * MiB)
    yield Case(
        "supervisor.channel.Decoder.feed",
        "a 1 GiB length, 16 MiB sent",
        len(lie),
        lambda: _fed(lie, MiB),
    )


def _fed(stream: bytes, read: int) -> int:
    decoder = channel.Decoder[Any]()
    return sum(
        len(batch)
        for at in range(0, len(stream), read)
        for batch in decoder.feed(stream[at : at + read])
    )


def cases() -> Iterator[Case]:
    yield from _js_cases()
    yield from _abi_cases()
    yield from _channel_cases()


def _best_time(parse: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        parse()
        best = min(best, time.perf_counter() - started)
    return best


def _peak(parse: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        parse()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def _lag(reply: bytes, share: bool) -> tuple[float, float]:
    from hlasync import Supervisor
    from hlasync.supervisor.targets import decode_js_reply

    longest = 0.0

    async def probe() -> None:
        nonlocal longest
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    async with Supervisor(processes=0) as sup, anyio.create_task_group() as tg:
        tg.start_soon(probe)
        await anyio.sleep(0.02)
        longest = 0.0
        started = time.perf_counter()
        if share:
            await decode_js_reply(sup._in_thread, reply, sandbox_id="p", handler="h")
        else:
            decode_reply(reply, sandbox_id="p", handler="h")
        took = time.perf_counter() - started
        await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    return took, longest


def loop_lag() -> list[str]:
    """Rows: the longest the event loop waited while a 2 MiB reply decoded."""
    reply = _reply(b"R", _array("0"))
    rows = []
    for share, how in (
        (False, "on the loop (before)"),
        (True, "decode_js_reply (thread, sharing the GIL)"),
    ):
        took, longest = anyio.run(_lag, reply, share)
        rows.append(f"| {how} | 2 MiB array of 0 | {took * 1e3:.0f} ms | {longest * 1e3:.1f} ms |")
    return rows


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"


def main() -> None:
    cpu = platform.processor() or platform.machine()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs ({cpu})\n")
    print("| Parser | Worst input tried | Size | Time (best of 3) | Peak memory (tracemalloc) |")
    print("|---|---|---|---|---|")
    for case in cases():
        seconds, peak = _best_time(case.parse), _peak(case.parse)
        print(
            f"| `{case.parser}` | {case.input} | {_size(case.size)} | {seconds * 1e3:.1f} ms "
            f"| {_size(peak)} ({peak / case.size:.1f}x) |"
        )
    print("\n| Decoding | Reply | Decode time | Longest event-loop stall |")
    print("|---|---|---|---|")
    for row in loop_lag():
        print(row)


if __name__ == "__main__":
    main()
