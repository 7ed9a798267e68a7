"""Worker deaths and relaunches (``Supervisor(processes=N)``) at the awkward
moments: a request for a sandbox whose worker is being replaced, and a
replacement that dies while it starts. The worker processes import a
``sitecustomize`` (on their PYTHONPATH) that holds a step back while a flag
file exists, or makes sandbox creation fail, so every interleaving here
happens on every run."""

from __future__ import annotations

import signal
import textwrap
import threading
from pathlib import Path

import anyio
import psutil
import pytest

from hlasync import SupervisorClosed, WorkerLost
from hlasync import events as ev
from hlasync.kvm import Kvm
from hlasync.supervisor import SupervisedSandbox, Supervisor, processes

pytestmark = pytest.mark.anyio

#: Every wait of these tests ends within this many seconds.
BOUND = 30

_SITECUSTOMIZE = """
import os
import time

from hlasync.supervisor import creation, host

FLAGS = os.environ["HLASYNC_TEST_FLAGS"]


def flagged(name):
    return os.path.exists(os.path.join(FLAGS, name))


def held(step):
    deadline = time.monotonic() + 30
    while flagged("hold-" + step) and time.monotonic() < deadline:
        time.sleep(0.01)


start = host.WorkerHost.start


def held_start(self, *args, **kwargs):  # before the worker's hello
    held("init")
    return start(self, *args, **kwargs)


make_all = creation.Builder.make_all


def held_make_all(self):  # a shard being made
    held("create")
    if flagged("fail-create"):
        raise RuntimeError("this worker cannot make sandboxes (the test says so)")
    return make_all(self)


host.WorkerHost.start = held_start
creation.Builder.make_all = held_make_all
"""


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory of the workers' flag files (their sitecustomize reads it)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_SITECUSTOMIZE))
    directory = tmp_path / "flags"
    directory.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("HLASYNC_TEST_FLAGS", str(directory))
    return directory


def _workers() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children()
        if "hlasync.supervisor.worker" in " ".join(child.cmdline())
    ]


async def _next(events: ev.EventStream, kind: type[ev.Event]) -> ev.Event:
    event = await events.receive()
    assert isinstance(event, kind), event
    return event


def _pending(events: ev.EventStream) -> list[ev.Event]:
    found: list[ev.Event] = []
    while True:
        try:
            found.append(events.receive_nowait())
        except anyio.WouldBlock:
            return found


@pytest.mark.parametrize("replacement", ["made", "fails"])
async def test_a_dump_asked_while_the_sandbox_is_remade_waits_for_it(
    kvm: Kvm, simpleguest: Path, flags: Path, tmp_path: Path, replacement: str
) -> None:
    """generate_crashdump() on a dedicated sandbox right after its worker was
    killed waits, as a queued call does, for the sandbox to be made again in
    the replacement, and dumps that one; when it cannot be made, the dump fails
    with the queued call's error. (The request once went to the replacement
    before the sandbox was there: SupervisorClosed("... has no sandbox in this
    worker") while the sandbox was alive and queued calls to it succeeded.)"""
    async with (
        Supervisor(processes=1, workers=1) as sup,
        sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as events,
    ):
        dedicated = await sup.create_sandbox(simpleguest)
        assert [await dedicated.call("increment") for _ in range(2)] == [1, 2]
        (flags / "hold-create").touch()  # the replacement makes it when the test says
        if replacement == "fails":
            (flags / "fail-create").touch()
        (victim,) = _workers()
        victim.send_signal(signal.SIGKILL)
        outcomes: dict[str, object] = {}

        async def dump() -> None:
            try:
                outcomes["dump"] = await dedicated.generate_crashdump(tmp_path / "dumps")
            except Exception as exc:  # noqa: BLE001 - the outcome is the subject
                outcomes["dump"] = exc

        async def call() -> None:
            try:
                outcomes["call"] = await dedicated.call("increment")
            except Exception as exc:  # noqa: BLE001 - the outcome is the subject
                outcomes["call"] = exc

        with anyio.fail_after(BOUND):
            died = await _next(events, ev.WorkerDied)
            assert isinstance(died, ev.WorkerDied) and died.pid == victim.pid
            async with anyio.create_task_group() as tg:
                tg.start_soon(dump)
                tg.start_soon(call)
                # Time for a request sent too early to be answered (it was, with
                # "has no sandbox in this worker"): nothing may be answered yet.
                await anyio.sleep(0.5)
                assert outcomes == {}
                (flags / "hold-create").unlink()
        if replacement == "made":
            path = outcomes["dump"]
            assert isinstance(path, Path), path
            assert path.read_bytes()[:4] == b"\x7fELF"
            assert outcomes["call"] == 1  # the remade sandbox started over
        else:
            error = outcomes["dump"]
            assert isinstance(error, SupervisorClosed), error
            assert "lost its sandboxes" in str(error)
            assert str(error) == str(outcomes["call"])


@pytest.mark.parametrize("step", ["init", "create"])
async def test_a_replacement_killed_while_it_starts_is_replaced_once(
    kvm: Kvm,
    simpleguest: Path,
    flags: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    """The replacement of a killed worker is killed too, before its hello or
    while it makes the shards again: the next replacement takes over, and the
    dedicated sandbox is made again once and keeps serving. (The first relaunch
    once went on waiting for a hello from the dead process: START_TIMEOUT
    later it announced the third process a second time and made the sandbox
    once more, resetting its state, or killed a third process still starting
    and closed the sandbox for good; killed while making the shards, it closed
    the sandbox for good at once.)"""
    start_timeout = 5.0
    monkeypatch.setattr(processes, "START_TIMEOUT", start_timeout)
    async with (
        Supervisor(processes=1, workers=1) as sup,
        sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as events,
    ):
        dedicated = await sup.create_sandbox(simpleguest)
        assert [await dedicated.call("increment") for _ in range(3)] == [1, 2, 3]
        (flags / f"hold-{step}").touch()
        (first,) = _workers()
        first.send_signal(signal.SIGKILL)
        with anyio.fail_after(BOUND):
            died = await _next(events, ev.WorkerDied)
            assert isinstance(died, ev.WorkerDied) and died.pid == first.pid
            if step == "create":
                started = await _next(events, ev.WorkerStarted)
                second_pid = started.pid  # type: ignore[attr-defined]
            else:
                (second,) = _workers()  # started, held back before its hello
                second_pid = second.pid
            launched = anyio.current_time()
            psutil.Process(second_pid).send_signal(signal.SIGKILL)
            died = await _next(events, ev.WorkerDied)
            assert isinstance(died, ev.WorkerDied) and died.pid == second_pid
            assert died.exit_status == -signal.SIGKILL
            (flags / f"hold-{step}").unlink()
            started = await _next(events, ev.WorkerStarted)
            assert isinstance(started, ev.WorkerStarted)
            assert started.pid not in (first.pid, second_pid)
            assert [await dedicated.call("increment") for _ in range(3)] == [1, 2, 3]
            if step == "init":
                # Past the moment a launch still waiting for the second
                # process would give up (and act on the third).
                await anyio.sleep_until(launched + start_timeout + 1.0)
            assert await dedicated.call("increment") == 4
        assert _pending(events) == []
        assert [p.pid for p in _workers()] == [started.pid]
        statistics = sup.statistics()
        assert (statistics.workers_lost, statistics.internal_errors) == (2, 0)


async def test_a_host_answer_for_a_dead_worker_never_reaches_its_replacement(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A host function still running when its worker died sent its answer to
    the replacement once it returned, whose host calls are numbered from 1
    again: another guest's host call took that answer for its own (111 for
    a call whose host function returns 222). An answer goes to the launch of
    the worker that asked, or nowhere."""
    first_release, second_release = threading.Event(), threading.Event()
    first_entered, second_entered = threading.Event(), threading.Event()

    def first(x: int) -> int:
        first_entered.set()
        first_release.wait(BOUND)
        return 111

    def second(x: int) -> int:
        second_entered.set()
        second_release.wait(BOUND)
        return 222

    async def wait_for(event: threading.Event) -> None:
        while not event.is_set():
            await anyio.sleep(0.01)

    async with (
        Supervisor(processes=1, workers=2) as sup,
        sup.subscribe(ev.WorkerStarted) as events,
    ):
        one = await sup.create_sandbox(simpleguest, host_functions={"first": first})
        two = await sup.create_sandbox(simpleguest, host_functions={"second": second})
        outcomes: dict[str, object] = {}

        async def call(name: str, target: SupervisedSandbox, function: str) -> None:
            try:
                outcomes[name] = await target.call("call_host", function, 1)
            except Exception as exc:  # noqa: BLE001 - the outcome is the subject
                outcomes[name] = exc

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "one", one, "first")
                await wait_for(first_entered)  # the old worker's host call 1 runs here
                (victim,) = _workers()
                victim.send_signal(signal.SIGKILL)
                await _next(events, ev.WorkerStarted)
                tg.start_soon(call, "two", two, "second")
                await wait_for(second_entered)  # the new worker's host call 1 runs here
                first_release.set()  # the old call's answer: for nobody now
                await anyio.sleep(0.3)
                second_release.set()
        assert isinstance(outcomes["one"], WorkerLost), outcomes
        assert outcomes["two"] == 222, outcomes
