"""The JS runtime's replies fuzzed: any bytes give the handler's value or an
hlasync error, never another exception, within a time and memory budget per
reply; read at once or sharing the GIL (the supervisor's way for large
replies), they give the same outcome."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from hlasync.errors import HlasyncError, JSError
from hlasync.js.protocol import INLINE_REPLY, decode_reply
from tests.conftest import fuzz_examples
from tests.fuzz.budget import SECONDS, Measured, measure, memory_budget

_STATUSES = st.sampled_from([*b"REOSUN", 0, ord("X"), 0xFF])
_HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0xA0), max_size=40),
    st.sampled_from(["\x1b[2J", "\x1b]0;t\x07", "\r\n", "\u202e", "\x00", "at (x:1:2", "\ud800"]),
)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | _HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_HOSTILE_TEXT, inner, max_size=5),
    max_leaves=25,
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    """A reply body: JSON the runtime could write, or one written to hurt."""
    kind = draw(st.sampled_from(["value", "error", "stack", "nesting", "number", "many", "raw"]))
    if kind == "value":
        text = json.dumps(draw(_JSON_VALUES), ensure_ascii=draw(st.booleans()))
    elif kind == "error":
        fields = {
            key: draw(st.one_of(_HOSTILE_TEXT, _JSON_VALUES))
            for key in draw(st.lists(st.sampled_from(["name", "message", "stack", "x"])))
        }
        text = json.dumps(fields, ensure_ascii=draw(st.booleans()))
    elif kind == "stack":
        unit = draw(st.sampled_from(["at ", "at (", "    at x.js:1:", "at a:", "\n"]))
        repeat = draw(st.one_of(st.integers(0, 50), st.integers(10_000, 80_000)))
        text = json.dumps({"stack": unit * repeat})
    elif kind == "nesting":
        depth = draw(st.integers(0, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = opener * depth + "1" + closer * depth
    elif kind == "number":
        text = draw(st.sampled_from(["", "-", "0.", "1e", "1e-"])) + "7" * draw(
            st.integers(1, 20_000)
        )
    elif kind == "many":
        item = draw(st.sampled_from(["0", "{}", "[]", '"ab"', "1.5", "null"]))
        large = INLINE_REPLY // (len(item) + 1) + 1  # read off the loop, sharing the GIL
        count = draw(st.one_of(st.integers(0, 50), st.integers(large, 2 * large)))
        text = "[" + ",".join([item] * count) + "]"
    else:
        return draw(st.binary(max_size=300))
    body = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):  # damaged: cut short, a byte changed, or invalid UTF-8 put in
        at = draw(st.integers(0, len(body)))
        damage = draw(st.sampled_from([b"", b"\xff", b"\x00", b'"', b"]", b"\xc3"]))
        body = body[:at] + damage + body[at + draw(st.integers(0, 2)) :]
    return body


def _acts_on_a_terminal(text: str) -> bool:
    return any(c not in "\n\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _check(reply: bytes, measured: Measured) -> None:
    outcome = measured.outcome
    assert not isinstance(outcome, Exception) or isinstance(outcome, HlasyncError), repr(outcome)
    assert measured.seconds < SECONDS, f"{len(reply)} bytes took {measured.seconds:.3f} s"
    assert measured.peak < memory_budget(len(reply)), f"{len(reply)} bytes: {measured.peak} peak"
    if isinstance(outcome, HlasyncError):
        assert not _acts_on_a_terminal(str(outcome))


def _same(outcome: object) -> Any:
    if isinstance(outcome, JSError):
        return type(outcome), outcome.name, outcome.js_message, outcome.stack
    if isinstance(outcome, HlasyncError):
        return type(outcome), str(outcome)
    return outcome


def _decode(reply: bytes, *, share_gil: bool) -> Measured:
    return measure(lambda: decode_reply(reply, sandbox_id="p", handler="h", share_gil=share_gil))


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(reply=st.binary(max_size=2000))
def test_any_bytes_give_a_value_or_an_hlasync_error(reply: bytes) -> None:
    _check(reply, _decode(reply, share_gil=False))


@settings(max_examples=fuzz_examples(150), deadline=None)
@given(status=_STATUSES, body=_bodies())
def test_hostile_replies_give_a_value_or_an_hlasync_error_in_budget(
    status: int, body: bytes
) -> None:
    reply = bytes([status]) + body
    event("read off the loop" if len(reply) > INLINE_REPLY else "read at once")
    at_once = _decode(reply, share_gil=False)
    _check(reply, at_once)
    sharing = _decode(reply, share_gil=True)
    _check(reply, sharing)
    if repr(_same(at_once.outcome)) != repr(_same(sharing.outcome)):  # NaN != NaN
        # The pure-Python scanner recurses twice per level: it gives up on
        # nesting (as "nests too deeply") about half as deep as the C one.
        assert isinstance(sharing.outcome, JSError) and "nests too deeply" in str(sharing.outcome)
