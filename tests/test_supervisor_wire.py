"""What crosses the channel between the supervisor and its worker processes
(``Supervisor(processes=N)``) when one side cannot unpickle it: the call it
belongs to fails with a clear error, the worker lives on and serves the next
call; a message nobody can attribute ends the worker as a death (WorkerLost,
WorkerDied, a new worker), never quietly. Nothing hangs.

A class defined in the application's ``__main__`` pickles in the supervisor
(its ``__main__`` has it) but not in a worker (whose ``__main__`` is
``hlasync.supervisor.worker``): the tests make such classes at run time and
put them on this process's ``__main__``, as a script's own class would be."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from hlasync import HostFunctionError, SandboxConfig, SupervisorError, WorkerLost
from hlasync import events as ev
from hlasync.kvm import Kvm
from hlasync.supervisor import Supervisor
from hlasync.supervisor.channel import MAX_FRAME, Decoder, DescribedError, describe, encode
from hlasync.supervisor.marks import RECEIVED, STARTED, StartMarks
from hlasync.supervisor.messages import Abandon, Call, ToWorker, Undecodable

pytestmark = pytest.mark.anyio

#: Every test's bound on waiting (a broken channel used to hang the next call).
LIMIT = 30


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def main_class(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., type]]:
    """Makes classes that live on this process's ``__main__`` only."""

    def make(name: str, base: type, **namespace: Any) -> type:
        cls = type(name, (base,), {"__module__": "__main__", **namespace})
        monkeypatch.setattr(sys.modules["__main__"], name, cls, raising=False)
        return cls

    yield make


# ------------------------------------------------------- the wire alone
def test_a_message_holding_a_class_the_receiver_lacks_arrives_as_undecodable(
    main_class: Callable[..., type], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only that message: the rest of its batch arrives as sent."""
    level = main_class("Level", int)
    frame = encode([Call(1, "pool#1", "add", (level(2), 3), None, None), Abandon(2, False)])
    monkeypatch.delattr(sys.modules["__main__"], "Level")  # as in a worker
    (batch,) = Decoder[ToWorker]().feed(frame)
    assert batch[1] == Abandon(2, False)
    undecodable = batch[0]
    assert isinstance(undecodable, Undecodable)
    assert (undecodable.kind, undecodable.ident) == (Call, 1)
    assert "__main__.Level cannot be imported" in undecodable.reason


def _explode() -> None:
    raise RuntimeError("will not rebuild")


class Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def test_a_frame_nothing_can_be_salvaged_of_raises() -> None:
    """Not a missing class but a value that fails to rebuild: the receiver
    cannot tell which request it was, and must not go on as if nothing came."""
    frame = encode([Call(1, "pool#1", "add", (Explodes(),), None, None)])
    with pytest.raises(RuntimeError, match="will not rebuild"):
        list(Decoder[ToWorker]().feed(frame))


def test_frames_arriving_in_any_cut_decode_in_order() -> None:
    """Whole frames decoded where a read put them, a frame cut short kept
    for the next read (also its header), and frames that come after a cut
    one: every cut of three frames gives the same three batches."""
    sent = [[Abandon(n, n % 2 == 0)] for n in range(3)]
    stream = b"".join(encode(batch) for batch in sent)
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1, 7):
            decoder = Decoder[ToWorker]()
            pieces = (stream[:first], stream[first:second], stream[second:])
            got = [batch for piece in pieces for batch in decoder.feed(memoryview(piece))]
            assert got == sent, (first, second)


def test_a_frame_longer_than_the_limit_ends_the_channel() -> None:
    """A corrupt length, alone or after a whole frame in the same read."""
    bad = (MAX_FRAME + 1).to_bytes(4, "little")
    with pytest.raises(ValueError, match="corrupt"):
        list(Decoder[ToWorker]().feed(bad))
    decoder = Decoder[ToWorker]()
    batches = decoder.feed(encode([Abandon(1, False)]) + bad)
    assert next(batches) == [Abandon(1, False)]
    with pytest.raises(ValueError, match="corrupt"):
        next(batches)


def test_an_exception_crosses_as_a_description(main_class: Callable[..., type]) -> None:
    app_error = main_class("AppError", Exception)
    try:
        raise app_error("no record 7")
    except Exception as exc:  # noqa: BLE001 - the subject
        described = describe(exc, 5)
    copy = pickle.loads(pickle.dumps(described))
    assert isinstance(copy, DescribedError) and type(copy).__name__ == "AppError"
    assert (copy.type_name, str(copy), copy.token) == ("__main__.AppError", "no record 7", 5)
    assert "raise app_error" in copy.traceback

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    assert "str() failed" in str(describe(Unprintable()))


# ------------------------------------------------- through worker processes
def _worker_pids() -> set[int]:
    return {
        child.pid
        for child in psutil.Process().children()
        if "hlasync.supervisor.worker" in " ".join(child.cmdline())
    }


def double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("kind", ["pool", "sandbox"])
async def test_a_host_function_raising_a_class_of_main_fails_only_its_call(
    kvm: Kvm, simpleguest: Path, main_class: Callable[..., type], kind: str
) -> None:
    """Issue 17: the worker could not unpickle the error, its serve loop ended
    and said "bye": the call got GuestCancelled, no WorkerDied, the next call
    hung. Now the call fails with HostFunctionError naming the error, whose
    cause is the very exception the host function raised."""
    app_error = main_class("AppError", Exception)
    raised: list[BaseException] = []

    def fail(x: int) -> int:
        error = app_error(f"no record {x}")
        raised.append(error)
        raise error

    functions = {"fail": fail, "double": double}
    with anyio.fail_after(LIMIT):
        async with (
            Supervisor(processes=1, workers=1) as sup,
            sup.subscribe(ev.WorkerDied, ev.CallFailed) as events,
        ):
            if kind == "pool":
                target: Any = await sup.create_pool(simpleguest, size=1, host_functions=functions)
            else:
                target = await sup.create_sandbox(simpleguest, host_functions=functions)
            pids = _worker_pids()
            with pytest.raises(HostFunctionError) as caught:
                await target.call("call_host", "fail", 7)
            assert "raised AppError: no record 7" in str(caught.value)
            assert caught.value.host_function == "fail"
            assert caught.value.__cause__ is raised[0]
            failed = await events.receive()
            assert isinstance(failed, ev.CallFailed)
            assert isinstance(failed.error, HostFunctionError)
            assert failed.error.__cause__ is raised[0]
            # The worker lives on and serves the next call.
            assert await target.call("call_host", "double", 21) == 42
            assert _worker_pids() == pids
            assert sup.statistics().workers_lost == 0
        with pytest.raises(anyio.EndOfStream):
            events.receive_nowait()  # no WorkerDied


async def test_a_host_function_result_the_worker_cannot_unpickle_fails_only_its_call(
    kvm: Kvm, simpleguest: Path, main_class: Callable[..., type]
) -> None:
    """An int of a class of ``__main__`` (an IntEnum of the application's script,
    say): the guest's host call fails, naming the class; the worker lives on."""
    level = main_class("Level", int)
    functions = {"level": lambda x: level(x), "double": double}
    with anyio.fail_after(LIMIT):
        async with Supervisor(processes=1, workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1, host_functions=functions)
            pids = _worker_pids()
            with pytest.raises(HostFunctionError, match=r"raised TypeError: .*__main__\.Level"):
                await pool.call("call_host", "level", 7)
            assert await pool.call("call_host", "double", 21) == 42
            assert _worker_pids() == pids
            assert sup.statistics().workers_lost == 0


async def test_call_arguments_the_worker_cannot_unpickle_fail_only_their_call(
    kvm: Kvm, simpleguest: Path, main_class: Callable[..., type]
) -> None:
    level = main_class("Level", int)
    with anyio.fail_after(LIMIT):
        async with Supervisor(processes=1, workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1)
            pids = _worker_pids()
            with pytest.raises(SupervisorError, match=r"arguments.*__main__\.Level"):
                await pool.call("add", level(2), 3)
            assert await pool.call("add", 2, 3) == 5
            assert _worker_pids() == pids
            assert sup.statistics().workers_lost == 0


async def test_a_target_description_the_worker_cannot_unpickle_fails_only_its_creation(
    kvm: Kvm, simpleguest: Path, main_class: Callable[..., type]
) -> None:
    seconds = main_class("Seconds", int)
    with anyio.fail_after(LIMIT):
        async with Supervisor(processes=1, workers=1) as sup:
            pids = _worker_pids()
            config = SandboxConfig(init_timeout=seconds(30))
            with pytest.raises(SupervisorError, match=r"description.*__main__\.Seconds"):
                await sup.create_pool(simpleguest, size=1, config=config)
            pool = await sup.create_pool(simpleguest, size=1)
            assert await pool.call("add", 2, 3) == 5
            assert _worker_pids() == pids
            assert sup.statistics().workers_lost == 0


class BuiltHere(int):
    """An int that unpickles only in the process that pickled it: what a value
    whose class imports but will not rebuild elsewhere looks like."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_here, (int(self), os.getpid()))


def _rebuild_here(value: int, pid: int) -> BuiltHere:
    if pid != os.getpid():
        raise RuntimeError("rebuilt in another process")
    return BuiltHere(value)


async def test_a_message_the_worker_cannot_read_at_all_is_a_worker_death(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A message the worker cannot unpickle and cannot even tell what it was:
    it ends as a failure, and the supervisor reports it as any worker death
    (once it said "bye" and the supervisor took the end as asked for)."""
    with anyio.fail_after(LIMIT):
        async with (
            Supervisor(processes=1, workers=1) as sup,
            sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as events,
        ):
            pool = await sup.create_pool(simpleguest, size=1)
            (pid,) = _worker_pids()
            with pytest.raises(WorkerLost):
                await pool.call("add", BuiltHere(2), 3)
            died = await events.receive()
            assert isinstance(died, ev.WorkerDied) and died.pid == pid
            assert died.exit_status not in (0, None)
            started = await events.receive()
            assert isinstance(started, ev.WorkerStarted) and started.pid != pid
            assert await pool.call("add", 2, 3) == 5
            assert sup.statistics().workers_lost == 1


def raise_worker_main_error(x: int) -> int:
    """A host function run in the worker (a reference) raising a class of the
    worker's ``__main__``, which the supervisor cannot import."""
    main = sys.modules["__main__"]
    cls = getattr(main, "WorkerOnly", None)
    if cls is None:
        cls = type("WorkerOnly", (Exception,), {"__module__": "__main__"})
        main.WorkerOnly = cls  # type: ignore[attr-defined]
    raise cls(f"worker-side {x}")


async def test_an_outcome_the_supervisor_cannot_unpickle_fails_only_its_call(
    kvm: Kvm, simpleguest: Path
) -> None:
    """The other direction: the worker's answer holds a class only the worker
    has. The call fails naming it; the worker is not taken for dead."""
    functions: dict[str, Callable[..., Any] | str] = {
        "odd": f"{__name__}:raise_worker_main_error",
        "double": double,
    }
    with anyio.fail_after(LIMIT):
        async with Supervisor(processes=1, workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1, host_functions=functions)
            pids = _worker_pids()
            with pytest.raises(SupervisorError, match=r"__main__\.WorkerOnly"):
                await pool.call("call_host", "odd", 1)
            assert await pool.call("call_host", "double", 21) == 42
            assert _worker_pids() == pids
            assert sup.statistics().workers_lost == 0


def test_start_marks_between_the_two_ends() -> None:
    """The worker's marks, seen by the supervisor through the shared memory:
    a call read but not started did not run; a started one, one never read by
    a worker that could not read a message, and one sent without a slot (all
    slots taken) may have. A slot given back is clear for its next call."""
    ours = StartMarks.create(slots=3)
    theirs = StartMarks.attach(os.dup(ours.fd))
    try:
        assert theirs.slots == 3
        read, started, unread = ours.take(), ours.take(), ours.take()
        assert ours.take() == -1  # none left
        theirs.mark(read, RECEIVED)
        theirs.mark(started, STARTED)
        assert not ours.may_have_run(read)
        assert ours.may_have_run(started)
        assert not ours.may_have_run(unread)  # killed before it read it: sent again
        assert ours.may_have_run(-1)
        ours.give_back(started)
        assert ours.take() == started and not ours.may_have_run(started)
        theirs.unreadable()
        assert ours.may_have_run(unread)  # it may be what the worker could not read
        assert not ours.may_have_run(read)
    finally:
        theirs.close()
        ours.close()


def test_closing_a_sender_waits_for_the_write_under_way() -> None:
    """close() returns once everything queued is written, also when another
    thread (the flusher of held messages) is in the middle of a write: a worker
    exits right after it (before, what was queued behind that write was lost)."""
    import threading
    import time

    from hlasync.supervisor.channel import SocketSender

    class SlowSocket:
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def sendall(self, data: bytes) -> None:
            time.sleep(0.05)  # a full socket buffer, a thread off its CPU
            self.frames.append(bytes(data))

    sock = SlowSocket()
    sender = SocketSender[Any](sock, hold_limit=0.002)
    sender.hold("held")  # the flusher writes it after 2 ms...
    time.sleep(0.01)  # ...and is in its sendall now
    assert any(t.name == "hlasync-flush" for t in threading.enumerate())
    sender.post("posted")  # queued behind that write
    sender.close()
    written: list[object] = [
        m for frame in sock.frames for batch in Decoder[Any]().feed(frame) for m in batch
    ]
    assert written == ["held", "posted"]
    sender.post("after")  # refused once closed
    assert len(sock.frames) == 2
