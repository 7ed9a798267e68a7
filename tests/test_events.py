"""Event streams without a supervisor: events are pushed into an EventStream
directly, as the supervisor does on its event loop, and read back."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlasync import events as ev
from tests.conftest import fuzz_examples

KiB = 1024


def _output(text: str, sandbox_id: str = "sb") -> ev.GuestOutput:
    return ev.GuestOutput(sandbox_id=sandbox_id, text=text)


def _dump(number: int) -> ev.CrashDumpWritten:
    return ev.CrashDumpWritten(
        sandbox_id="sb",
        path=Path(f"/tmp/core.{number}"),
        reason="fault",
        function="f",
        size=1,
        seconds=0.0,
    )


def _drain(stream: ev.EventStream) -> list[ev.Event]:
    events = []
    while True:
        try:
            events.append(stream.receive_nowait())
        except anyio.WouldBlock:
            return events


def _texts(events: list[ev.Event]) -> list[str]:
    return [e.text[:3] for e in events if isinstance(e, ev.GuestOutput)]


def _numbered_outputs(count: int, size: int) -> list[ev.GuestOutput]:
    return [_output(f"{i:03}" + "x" * (size - 3)) for i in range(count)]


def test_event_size_counts_output_text() -> None:
    small = ev.CallStarted(sandbox_id="sb", function="f", call_id=1, queued=0.0)
    assert ev.event_size(small) == ev.EVENT_OVERHEAD
    text = "x" * (256 * KiB)
    assert ev.event_size(_output(text)) == ev.EVENT_OVERHEAD + sys.getsizeof(text)
    assert ev.event_size(_output("é" * 1000)) > ev.event_size(_output("e" * 1000))


def test_drop_oldest_keeps_the_newest_events_that_fit_the_byte_budget() -> None:
    outputs = _numbered_outputs(10, 10 * KiB)
    budget = 3 * ev.event_size(outputs[0])
    stream = ev.EventStream((), 1000, ev.Overflow.DROP_OLDEST, max_bytes=budget)
    for event in outputs:
        stream._push(event)
    stats = stream.statistics()
    assert stats.buffered_bytes == budget and stats.max_bytes == budget
    assert stats.dropped == 7
    events = _drain(stream)
    assert isinstance(events[0], ev.EventsDropped) and events[0].count == 7
    assert _texts(events[1:]) == ["007", "008", "009"]
    assert stream.statistics().buffered_bytes == 0


def test_drop_newest_keeps_the_oldest_events_that_fit_the_byte_budget() -> None:
    outputs = _numbered_outputs(10, 10 * KiB)
    budget = 3 * ev.event_size(outputs[0]) + 100
    stream = ev.EventStream((), 1000, ev.Overflow.DROP_NEWEST, max_bytes=budget)
    for event in outputs:
        stream._push(event)
    events = _drain(stream)
    assert isinstance(events[0], ev.EventsDropped) and events[0].count == 7
    assert _texts(events[1:]) == ["000", "001", "002"]


def test_one_large_output_evicts_as_many_small_events_as_it_needs() -> None:
    budget = 64 * KiB
    stream = ev.EventStream((), 1000, ev.Overflow.DROP_OLDEST, max_bytes=budget)
    small = [
        ev.CallStarted(sandbox_id="sb", function="f", call_id=i, queued=0.0) for i in range(200)
    ]
    for event in small:
        stream._push(event)
    assert stream.statistics().buffered_bytes == 200 * ev.EVENT_OVERHEAD
    big = _output("y" * (40 * KiB))
    stream._push(big)
    room_left = (budget - ev.event_size(big)) // ev.EVENT_OVERHEAD  # small events that still fit
    events = _drain(stream)
    assert isinstance(events[0], ev.EventsDropped) and events[0].count == 200 - room_left
    kept = events[1:-1]
    assert [e.call_id for e in kept if isinstance(e, ev.CallStarted)] == list(
        range(200 - room_left, 200)
    )
    assert events[-1] is big


@pytest.mark.parametrize("overflow", list(ev.Overflow))
def test_an_event_larger_than_the_budget_is_dropped_alone(overflow: ev.Overflow) -> None:
    stream = ev.EventStream((), 10, overflow, max_bytes=16 * KiB)
    kept = _output("kept")
    stream._push(kept)
    stream._push(_output("z" * (32 * KiB)))  # could never fit: the buffered event stays
    events = _drain(stream)
    assert isinstance(events[0], ev.EventsDropped) and events[0].count == 1
    assert events[1:] == [kept]


def test_event_count_bound_still_applies() -> None:
    stream = ev.EventStream((), 5, ev.Overflow.DROP_OLDEST)
    for i in range(40):
        stream._push(ev.CallCompleted(sandbox_id="sb", function="f", call_id=i, duration=0.0))
    events = _drain(stream)
    assert isinstance(events[0], ev.EventsDropped) and events[0].count == 35
    assert [e.call_id for e in events[1:] if isinstance(e, ev.CallCompleted)] == list(range(35, 40))


@pytest.mark.parametrize("overflow", list(ev.Overflow))
def test_crash_dump_events_are_never_dropped(overflow: ev.Overflow) -> None:
    stream = ev.EventStream((), 1, overflow, max_bytes=8 * KiB)
    for i in range(50):
        stream._push(_dump(i))
        stream._push(_output(f"{i:03}" + "o" * (4 * KiB)))
        stream._push(_output("too big to ever fit" * 1000))
    stats = stream.statistics()
    assert stats.buffered_bytes <= 8 * KiB
    events = _drain(stream)
    dumps = [e for e in events if isinstance(e, ev.CrashDumpWritten)]
    assert [d.path.name for d in dumps] == [f"core.{i}" for i in range(50)]
    announced = sum(e.count for e in events if isinstance(e, ev.EventsDropped))
    assert announced == stats.dropped == 100 - 1  # only one output is kept


def test_an_unread_subscriber_holds_bounded_memory_whatever_the_guest_prints() -> None:
    # The report: one subscriber that never read held 191 MiB of 256 KiB prints.
    stream = ev.EventStream((), 1000, ev.Overflow.DROP_OLDEST)
    for i in range(200):
        stream._push(_output(str(i) * (256 * KiB // len(str(i)))))
    held = sum(sys.getsizeof(e.text) for e in stream._queue if isinstance(e, ev.GuestOutput))
    assert held <= ev.DEFAULT_MAX_BYTES
    assert stream.statistics().buffered_bytes <= ev.DEFAULT_MAX_BYTES
    assert stream.statistics().dropped > 0


@pytest.mark.parametrize("max_bytes", [0, -1, True, 1.5, "8M"])
def test_max_bytes_must_be_a_positive_int(max_bytes: object) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ev.EventStream((), 10, ev.Overflow.DROP_OLDEST, max_bytes=max_bytes)  # type: ignore[arg-type]


_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("output"), st.integers(0, 6000)),
        st.tuples(st.just("small"), st.just(0)),
        st.tuples(st.just("dump"), st.just(0)),
        st.tuples(st.just("read"), st.integers(1, 5)),
    ),
    max_size=120,
)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(_OPERATIONS, st.integers(1, 20), st.integers(1, 20_000), st.sampled_from(list(ev.Overflow)))
def test_accounting_holds_for_any_sequence(
    operations: list[tuple[str, int]], buffer: int, max_bytes: int, overflow: ev.Overflow
) -> None:
    stream = ev.EventStream((), buffer, overflow, max_bytes=max_bytes)
    pushed_ordinary = pushed_dumps = 0
    received: list[ev.Event] = []
    for op, argument in operations:
        if op == "output":
            stream._push(_output("t" * argument))
            pushed_ordinary += 1
        elif op == "small":
            stream._push(ev.SandboxClosed(sandbox_id="sb"))
            pushed_ordinary += 1
        elif op == "dump":
            stream._push(_dump(pushed_dumps))
            pushed_dumps += 1
        else:
            for _ in range(argument):
                try:
                    received.append(stream.receive_nowait())
                except anyio.WouldBlock:
                    break
        queued_ordinary = [e for e in stream._queue if not isinstance(e, ev.CRITICAL_EVENTS)]
        stats = stream.statistics()
        assert stats.buffered_bytes == sum(ev.event_size(e) for e in queued_ordinary)
        assert stats.buffered_bytes <= max_bytes
        assert len(queued_ordinary) <= buffer
    received += _drain(stream)
    assert stream.statistics().buffered_bytes == 0
    announced = sum(e.count for e in received if isinstance(e, ev.EventsDropped))
    delivered_ordinary = [
        e for e in received if not isinstance(e, (*ev.CRITICAL_EVENTS, ev.EventsDropped))
    ]
    assert announced == stream.statistics().dropped
    assert announced + len(delivered_ordinary) == pushed_ordinary
    dumps = [e for e in received if isinstance(e, ev.CrashDumpWritten)]
    assert [d.path.name for d in dumps] == [f"core.{i}" for i in range(pushed_dumps)]


async def _read_all(stream: ev.EventStream) -> list[ev.Event]:
    return [event async for event in stream]


def test_iteration_delivers_the_announcement_then_ends_after_close() -> None:
    stream = ev.EventStream((ev.GuestOutput,), 100, ev.Overflow.DROP_OLDEST, max_bytes=20 * KiB)
    for event in _numbered_outputs(5, 8 * KiB):
        stream._push(event)
    stream._close()
    events = anyio.run(_read_all, stream)
    assert isinstance(events[0], ev.EventsDropped) and events[0].count == 3
    assert _texts(events[1:]) == ["003", "004"]


# ------------------------------------------------------------- GuestOutput.from_text
def test_short_output_is_kept_whole() -> None:
    event = ev.GuestOutput.from_text("sb", "hello\n")
    assert (event.sandbox_id, event.text, event.truncated) == ("sb", "hello\n", 0)
    exact = ev.GuestOutput.from_text("sb", "x" * 10, 10)
    assert exact.text == "x" * 10 and exact.truncated == 0


def test_long_output_is_truncated_visibly() -> None:
    text = "a" * (ev.GUEST_OUTPUT_LIMIT + 1000)
    event = ev.GuestOutput.from_text("sb", text)
    assert event.text == text[: ev.GUEST_OUTPUT_LIMIT]
    assert event.truncated == 1000
    assert "truncated=1000" in repr(event)


def test_truncated_counts_utf8_bytes_of_what_was_cut() -> None:
    event = ev.GuestOutput.from_text(None, "ab" + "é" * 10 + "€", 2)
    assert event.text == "ab"
    assert event.truncated == 10 * 2 + 3
    assert ev.GuestOutput.from_text(None, "x\udc80yz", 1).truncated == 3 + 2  # lone surrogate
    assert ev.GuestOutput.from_text(None, "abc", 0).text == ""


@pytest.mark.parametrize("limit", [-1, 1.0, None, True])
def test_output_limit_must_be_a_non_negative_int(limit: object) -> None:
    with pytest.raises(ValueError, match="limit"):
        ev.GuestOutput.from_text("sb", "text", limit)  # type: ignore[arg-type]


def test_guest_output_defaults_to_untruncated() -> None:
    assert _output("plain").truncated == 0
