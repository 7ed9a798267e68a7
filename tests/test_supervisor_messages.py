"""The records of the worker-process protocol (``hlasync/supervisor/messages.py``),
with no KVM and no worker process: each crosses the channel's framing as
itself; one holding what the receiver cannot import arrives as the
``Undecodable`` of its kind and request; and both ends' dispatch (the worker's
``Worker.handle``, the supervisor's ``ProcessBackend._handle``, which the Ray
backend shares) has a case for every record the other end sends, so that a
record added to one union and handled by one end only fails here (and in mypy,
whose ``assert_never`` sees the same)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Callable
from typing import Any, get_args

import pytest

from hlasync import SupervisorError
from hlasync import events as ev
from hlasync.supervisor import messages as m
from hlasync.supervisor.channel import Decoder, encode
from hlasync.supervisor.processes import ProcessBackend
from hlasync.supervisor.specs import TargetSpec
from hlasync.supervisor.worker import Worker

TO_WORKER: tuple[type[m.Message], ...] = get_args(m.ToWorker)
TO_SUPERVISOR: tuple[type[m.Message], ...] = get_args(m.ToSupervisor)
RECORDS: tuple[type[m.Message], ...] = (*TO_WORKER, *TO_SUPERVISOR, m.Undecodable)


def _names(record: type[m.Message]) -> list[str]:
    """The record's fields, in order."""
    return [f.name for f in dataclasses.fields(record)]  # type: ignore[arg-type]


_SPEC = TargetSpec(
    kind="pool", name="pool-1#1", guest="/guests/simpleguest.elf", config=None, size=2
)

#: One of each record, as an end sends it.
SAMPLES: dict[type[m.Message], m.Message] = {
    m.Init: m.Init(workers=2, pin_cpus=[0, 1], sys_path=["/app"], interest=["CallFailed"]),
    m.Create: m.Create("pool-1#1", _SPEC),
    m.Call: m.Call(
        7,
        "pool-1#1",
        "add",
        (1, 2),
        1.5,
        None,
        {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        12,
    ),
    m.Abandon: m.Abandon(7, True),
    m.Register: m.Register("pool-1#1", "double"),
    m.Close: m.Close("pool-1#1"),
    m.Dump: m.Dump(3, "sb-1#2", "/tmp/dumps"),
    m.Interest: m.Interest(["Event"]),
    m.HostReply: m.HostReply(4, True, {"value": [1, 2]}),
    m.Shutdown: m.Shutdown(),
    m.Hello: m.Hello(1234),
    m.Created: m.Created("pool-1#1", ("sb-1-1", "sb-1-2")),
    m.CreateFailed: m.CreateFailed("pool-1#1", SupervisorError("no guest")),
    m.Done: m.Done(7, 3, None, "sb-1-1", {"calls": 1}, "doorbell"),
    m.Published: m.Published(ev.WorkerStarted(sandbox_id=None, worker=0, pid=1234)),
    m.HostCall: m.HostCall(4, 7, "pool-1#1", ("double",), (21,)),
    m.CancelHost: m.CancelHost(7),
    m.Output: m.Output("pool-1#1", None, "hello\n"),
    m.Stderr: m.Stderr("dump written\n"),
    m.Log: m.Log(
        "hlasync.supervisor", 30, "spin() passed its wall limit", {"hlasync.kind": "wall"}, 1.5e9
    ),
    m.Closed: m.Closed("pool-1#1"),
    m.DumpDone: m.DumpDone(3, "/tmp/dumps/hl_core_1.elf", None),
    m.Undecodable: m.Undecodable(m.Call, 7, "__main__.Level cannot be imported"),
}


def _same(a: object, b: object) -> bool:
    """Equal, exceptions by their class and text (they compare by identity)."""
    if isinstance(a, BaseException):
        return type(a) is type(b) and str(a) == str(b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    return a == b


# ------------------------------------------------------------ the records
def test_every_record_is_a_frozen_slotted_dataclass_with_a_sample() -> None:
    assert set(SAMPLES) == set(RECORDS), "a new record needs a sample here"
    assert len(set(RECORDS)) == len(RECORDS), "a record is in one union only"
    for record in RECORDS:
        assert "__dataclass_fields__" in record.__dict__
        assert record.__dataclass_params__.frozen, record  # type: ignore[attr-defined]
        assert "__slots__" in record.__dict__ and not hasattr(SAMPLES[record], "__dict__")
        assert (record.__doc__ or "").strip(), f"{record.__name__} says who sends it, when"
        ident = record.ident_field
        assert ident is None or ident in _names(record)
    call = SAMPLES[m.Call]
    assert isinstance(call, m.Call)
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.call_id = 8  # type: ignore[misc]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_a_record_crosses_the_channel_as_itself(record: type[m.Message]) -> None:
    sample = SAMPLES[record]
    frame = encode([sample, m.Shutdown()])
    decoder = Decoder[m.Message]()
    batches = [batch for half in (frame[:5], frame[5:]) for batch in decoder.feed(half)]
    assert len(batches) == 1
    copy, after = batches[0]
    assert _same(copy, sample) and copy is not sample
    assert after == m.Shutdown()


def test_a_batch_of_every_record_crosses_in_one_frame() -> None:
    batch = list(SAMPLES.values())
    (copy,) = Decoder[m.Message]().feed(encode(batch))
    assert all(_same(a, b) for a, b in zip(copy, batch, strict=True))


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 1000, 1 << 20])
def test_a_stream_of_frames_decodes_the_same_in_pieces_of_any_size(piece: int) -> None:
    """Frames cut anywhere (a header split, a frame across many reads, many
    frames in one read, a buffer reused by the reader) arrive whole and in order."""
    batches = [[m.Hello(n), m.Close(f"pool-{n}#" + "x" * (n * 37 % 900))] for n in range(60)]
    stream = b"".join(encode(batch) for batch in batches)
    decoder = Decoder[m.Message]()
    reused = bytearray(piece)  # a reader's buffer, overwritten by the next read
    got: list[list[m.Message | Any]] = []
    for at in range(0, len(stream), piece):
        chunk = stream[at : at + piece]
        reused[: len(chunk)] = chunk
        got.extend(decoder.feed(memoryview(reused)[: len(chunk)]))
    assert got == batches
    assert list(decoder.feed(b"")) == []


def test_a_corrupt_header_after_a_partial_frame_is_an_error() -> None:
    frame = encode([m.Hello(1)])
    decoder = Decoder[m.Message]()
    assert list(decoder.feed(frame[:3])) == []
    with pytest.raises(ValueError, match="corrupt"):
        list(decoder.feed(frame[3:] + b"\xff" * 8))


# --------------------------------------------------------------- salvage
class Foreign:
    """Objects of a class that this process's ``__main__`` has while the frame
    is made (as a script's own class), and lacks once :meth:`gone` (as the
    other end's ``__main__`` does)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._cls = type("Foreign", (), {"__module__": "__main__"})
        monkeypatch.setattr(sys.modules["__main__"], "Foreign", self._cls, raising=False)

    def make(self) -> object:
        return self._cls()

    def gone(self) -> None:
        self._monkeypatch.delattr(sys.modules["__main__"], "Foreign")


@pytest.fixture
def foreign(monkeypatch: pytest.MonkeyPatch) -> Foreign:
    return Foreign(monkeypatch)


def _with_foreign(record: type[m.Message], value: object) -> m.Message:
    """The record's sample with its first field other than its identity holding ``value``."""
    other = [name for name in _names(record) if name != record.ident_field]
    return dataclasses.replace(SAMPLES[record], **{other[0]: value})  # type: ignore[type-var]


_IDENTIFIED = [
    r
    for r in RECORDS
    if r.ident_field is not None and len(_names(r)) > 1 and r is not m.Undecodable
]
_UNIDENTIFIED = [
    r for r in RECORDS if r.ident_field is None and _names(r) and r is not m.Undecodable
]


@pytest.mark.parametrize("record", _IDENTIFIED, ids=lambda r: r.__name__)
def test_a_record_the_receiver_cannot_unpickle_arrives_as_undecodable(
    record: type[m.Message], foreign: Foreign
) -> None:
    """For that kind and request; the rest of its batch arrives as sent."""
    bad = _with_foreign(record, foreign.make())
    frame = encode([m.Hello(1), bad, m.Close("pool-1#2")])
    foreign.gone()
    (batch,) = Decoder[m.Message]().feed(frame)
    assert batch[0] == m.Hello(1) and batch[2] == m.Close("pool-1#2")
    undecodable = batch[1]
    assert isinstance(undecodable, m.Undecodable)
    assert undecodable.kind is record
    assert undecodable.ident == m.ident_of(bad) == getattr(bad, record.ident_field or "")
    assert "__main__.Foreign cannot be imported" in undecodable.reason


@pytest.mark.parametrize("record", _UNIDENTIFIED, ids=lambda r: r.__name__)
def test_a_record_that_names_no_request_cannot_be_salvaged(
    record: type[m.Message], foreign: Foreign
) -> None:
    """Nothing to fail in its place: the frame's unpickling error is raised."""
    frame = encode([m.Hello(1), _with_foreign(record, foreign.make())])
    foreign.gone()
    with pytest.raises(AttributeError, match="Foreign"):
        list(Decoder[m.Message]().feed(frame))


def test_a_record_class_the_receiver_lacks_cannot_be_salvaged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record of a protocol the receiver does not have (another version's)."""
    frame = encode([m.Hello(1), m.Close("pool-1#1")])
    monkeypatch.delattr(m, "Close")
    with pytest.raises(AttributeError, match="Close"):
        list(Decoder[m.Message]().feed(frame))


# -------------------------------------------------------------- dispatch
def _handled(function: Callable[..., Any]) -> set[str]:
    """The record classes named by the ``case`` patterns of ``function``'s
    ``match`` on its ``message`` (the last one must be ``assert_never``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    matches = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Match)
        and isinstance(node.subject, ast.Name)
        and node.subject.id == "message"
    ]
    assert len(matches) == 1, f"{function.__qualname__} dispatches in one match"
    (match,) = matches
    last = match.cases[-1]
    assert isinstance(last.pattern, ast.MatchAs) and last.pattern.pattern is None
    assert "assert_never" in ast.unparse(last), "the catch-all is assert_never(message)"
    names: set[str] = set()
    for case in match.cases:
        for node in ast.walk(case.pattern):
            if isinstance(node, ast.MatchClass) and isinstance(node.cls, ast.Name):
                names.add(node.cls.id)
    return names


@pytest.mark.parametrize(
    ("dispatch", "receives"),
    [(Worker.handle, TO_WORKER), (ProcessBackend._handle, TO_SUPERVISOR)],
    ids=["worker", "supervisor"],
)
def test_each_end_handles_every_record_the_other_sends(
    dispatch: Callable[..., Any], receives: tuple[type[m.Message], ...]
) -> None:
    expected = {record.__name__ for record in (*receives, m.Undecodable)}
    handled = _handled(dispatch)
    assert expected - handled == set(), "a record this end receives has no case"
    assert handled - expected == set(), "a case for a record this end never receives"
