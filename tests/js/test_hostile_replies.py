"""Replies of the JS runtime guest are untrusted bytes: whatever they hold, the
host reads them in time linear in their size, answers with a value or an
hlasync error, and does not hold up the supervisor's event loop while it
reads a large one."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlasync import JSError, JSSyntaxError, Supervisor
from hlasync.js import protocol
from hlasync.js.protocol import decode_reply, syntax_position
from hlasync.kvm import Kvm
from hlasync.supervisor import targets
from tests.conftest import fuzz_examples

KiB, MiB = 1024, 1024 * 1024

#: The pattern syntax_position used to search with (quadratic on hostile stacks):
#: the reference for the stacks an engine really writes.
_OLD_POSITION = re.compile(r"at (?:[^\n(]*\()?([^\n():]+):(\d+):(\d+)\)?")


def _old_syntax_position(stack: str) -> tuple[str | None, int | None, int | None]:
    found = _OLD_POSITION.search(stack)
    if found is None:
        return None, None, None
    return found.group(1), int(found.group(2)), int(found.group(3))


def _decode(reply: bytes) -> Any:
    return decode_reply(reply, sandbox_id="sb-test", handler="h")


# ------------------------------------------------------------ syntax errors
@pytest.mark.parametrize("size", [64 * KiB, 2 * MiB])
def test_a_hostile_stack_is_read_in_linear_time(size: int) -> None:
    # "at " again and again made the old pattern try every later position from
    # every earlier one: 1.6 s for 24 KB, hours for the 2 MiB a reply may hold.
    stack = "at " * (size // 3)
    started = time.perf_counter()
    assert syntax_position(stack) == (None, None, None)
    reply = b"S" + json.dumps({"name": "SyntaxError", "message": "m", "stack": stack}).encode()
    with pytest.raises(JSSyntaxError) as info:
        _decode(reply)
    elapsed = time.perf_counter() - started
    assert info.value.line is None and info.value.stack == stack
    assert elapsed < 2.0, f"{size} bytes of stack took {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ("    at broken.js:3:1\n", ("broken.js", 3, 1)),
        ("    at <eval> (handler.js:3:7)\n    at <anonymous>\n", ("handler.js", 3, 7)),
        ("    at handler (greet.js:3:5)", ("greet.js", 3, 5)),
        ("    at <anonymous> (native)\n    at f (x.js:10:20)\n", ("x.js", 10, 20)),
        ("    at <anonymous>\n", (None, None, None)),
        ("", (None, None, None)),
        # A handler name may hold ':' (the old pattern found no position here).
        ("    at a:b.js:4:2\n", ("a:b.js", 4, 2)),
    ],
)
def test_syntax_positions_of_engine_stacks(
    stack: str, expected: tuple[str | None, int | None, int | None]
) -> None:
    assert syntax_position(stack) == expected


def test_a_position_too_long_to_be_a_line_number_is_none() -> None:
    # int() of more than 4,300 digits raises ValueError: it escaped decode_reply.
    stack = "    at x.js:" + "1" * 5000 + ":1\n"
    assert syntax_position(stack) == (None, None, None)
    assert syntax_position("    at x.js:\u00b2:1") == (None, None, None)  # not an ASCII digit


_files = st.text(alphabet="abcxyz_.-/@0123456789", min_size=1, max_size=12)
_frames = st.one_of(
    st.builds(
        lambda f, a, b: f"at {f}:{a}:{b}", _files, st.integers(0, 10**6), st.integers(0, 999)
    ),
    st.builds(
        lambda n, f, a, b: f"at {n} ({f}:{a}:{b})",
        st.sampled_from(["<eval>", "<anonymous>", "handler", "f", "Object.g"]),
        _files,
        st.integers(0, 10**6),
        st.integers(0, 999),
    ),
    st.sampled_from(["at <anonymous>", "at f (native)", "SyntaxError: x", ""]),
)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(frames=st.lists(_frames, max_size=6), indent=st.sampled_from(["", "    ", "\t"]))
def test_engine_stacks_give_the_positions_the_old_pattern_gave(
    frames: list[str], indent: str
) -> None:
    stack = "".join(f"{indent}{frame}\n" for frame in frames)
    assert syntax_position(stack) == _old_syntax_position(stack)


# --------------------------------------------------------- malformed replies
@pytest.mark.parametrize("status", [b"R", b"O"])
@pytest.mark.parametrize("body", [b"not json", b"", b"\x1b[2J\xff\xfe", b"[1, 2"])
def test_a_result_that_is_not_json_is_an_error(status: bytes, body: bytes) -> None:
    # It was returned as {"message": body}: the handler's "result".
    with pytest.raises(JSError) as info:
        _decode(status + body)
    error = info.value
    assert error.name == "InternalError" and "not JSON" in error.js_message
    assert "\x1b" not in error.js_message  # the preview is escaped


def test_an_error_reply_that_is_not_json_is_an_internal_error() -> None:
    with pytest.raises(JSError) as info:
        _decode(b"E" + b"x" * MiB)
    assert info.value.name == "InternalError" and "not JSON" in info.value.js_message
    assert len(info.value.js_message) < 300  # a preview, not the megabyte


def test_an_unknown_status_is_an_internal_error() -> None:
    with pytest.raises(JSError) as info:
        _decode(b'X{"name":"TypeError","message":"m"}')
    assert info.value.name == "InternalError" and "status" in info.value.js_message


def test_the_replies_the_runtime_writes_decode_as_before() -> None:
    assert _decode(b'R{"a":[1,2.5,"x",null,true]}') == {"a": [1, 2.5, "x", None, True]}
    assert _decode(b"O{}") == {}
    with pytest.raises(JSError) as info:
        _decode(b'E{"name":"TypeError","message":"m","stack":"    at h (h.js:1:2)\\n"}')
    assert (info.value.name, info.value.js_message) == ("TypeError", "m")
    with pytest.raises(JSError, match="nests too deeply"):
        _decode(b"R" + b"[" * 100_000 + b"]" * 100_000)


# ------------------------------------------------------------ off the loop
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _LoopProbe:
    """Ticks every millisecond it gets the loop: how often it ticked and the
    longest time between two ticks."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest = 0.0

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            self.ticks += 1
            self.longest = max(self.longest, now - last)
            last = now


@pytest.mark.anyio
async def test_a_large_reply_is_decoded_while_the_loop_runs() -> None:
    # 2 MiB of small numbers: ~60 ms in the C decoder, which holds the GIL the
    # whole time, even on another thread. The loop stood still for that long.
    values = [0] * (MiB - 1)
    reply = b"R" + json.dumps(values, separators=(",", ":")).encode()
    assert len(reply) > protocol.INLINE_REPLY
    probe = _LoopProbe()
    async with Supervisor(processes=0) as sup, anyio.create_task_group() as tg:
        tg.start_soon(probe.run)
        await anyio.sleep(0.01)
        before = probe.ticks
        result = await targets.decode_js_reply(sup._in_thread, reply, sandbox_id="p", handler="h")
        during = probe.ticks - before
        tg.cancel_scope.cancel()
    assert result == values
    assert during >= 10, f"the loop ticked {during} times while 2 MiB decoded"


@pytest.mark.anyio
async def test_replies_decoded_off_the_loop_give_what_the_loop_would() -> None:
    samples = [
        b"R" + json.dumps([{"k": i, "s": "\u00e9\x00" * 3} for i in range(20_000)]).encode(),
        b"R" + json.dumps("x" * MiB).encode(),  # one long string: few values
        b"S" + json.dumps({"name": "SyntaxError", "message": "m", "stack": "at " * MiB}).encode(),
        b"R" + b"x" * MiB,
        b"R[" + b"[" * 2000 + b"]" * 2000 + b"," + b"0," * 40_000 + b"0]",
    ]
    async with Supervisor(processes=0) as sup:
        for reply in samples:
            assert len(reply) > protocol.INLINE_REPLY
            try:
                expected: Any = ("value", _decode(reply))
            except JSError as exc:
                expected = ("error", type(exc), exc.name, exc.js_message)
            try:
                got: Any = (
                    "value",
                    await targets.decode_js_reply(
                        sup._in_thread, reply, sandbox_id="sb-test", handler="h"
                    ),
                )
            except JSError as exc:
                got = ("error", type(exc), exc.name, exc.js_message)
            assert got == expected


# ---------------------------------------------------- through a real guest
@pytest.mark.anyio
@pytest.mark.usefixtures("supervisor_mode")
async def test_a_pool_returns_a_large_result(kvm: Kvm) -> None:
    handler = "function handler(e) { return new Array(e.n).fill(7) }"
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_js_pool({"big": handler}, size=1, heap_size=64 << 20)
        assert await pool.call_handler("big", {"n": 900_000}) == [7] * 900_000
        assert await pool.call_handler("big", {"n": 3}) == [7, 7, 7]
