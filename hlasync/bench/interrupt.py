"""Runaway interruption: from the deadline until control is back in Python."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import GuestCancelled, Sandbox, SandboxState
from . import _wasm
from ._child import RUNAWAY, reap, start_ready
from ._common import BenchError, Counts, Row, gc_off, skipped

CATEGORY = "interrupt"
#: Longest wait for a worker thread to start or to come back.
WORKER_TIMEOUT_S = 10.0


class RunawayWorker:
    """A thread that runs ``runaway()`` on request, which must end by raising
    ``expected``; it records when that exception was caught."""

    def __init__(
        self,
        name: str,
        runaway: Callable[[], object],
        expected: type[BaseException],
        before: Callable[[], None] = lambda: None,
    ) -> None:
        self.runaway = runaway
        self.expected = expected
        self.before = before
        self.go = threading.Event()
        self.entering = threading.Event()
        self.done = threading.Event()
        self.stop = False
        self.caught_at = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.go.wait()
            self.go.clear()
            if self.stop:
                return
            self.caught_at = 0
            self.error = None
            try:
                self.before()
                self.entering.set()
                self.runaway()
                self.error = BenchError("the runaway returned")
            except self.expected:
                self.caught_at = time.perf_counter_ns()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            self.done.set()

    def sample(
        self, runaway_s: float, running: Callable[[], bool], at_deadline: Callable[[], object]
    ) -> int:
        """Start the runaway, let it run ``runaway_s``, then (the deadline) call
        ``at_deadline()``; ns from the deadline until the exception was caught."""
        self.entering.clear()
        self.done.clear()
        self.go.set()
        if not self.entering.wait(WORKER_TIMEOUT_S):
            raise BenchError(f"{self.thread.name} did not start")
        time.sleep(runaway_s)
        give_up = time.monotonic() + WORKER_TIMEOUT_S
        while not running():
            if self.done.is_set() or time.monotonic() > give_up:
                raise BenchError(f"{self.thread.name}: the runaway is not running", self.error)
            time.sleep(0.001)
        deadline = time.perf_counter_ns()
        at_deadline()
        if not self.done.wait(WORKER_TIMEOUT_S):
            raise BenchError(f"{self.thread.name}: not stopped within 10 s of the deadline")
        if self.error is not None:
            raise BenchError(f"{self.thread.name}: wrong outcome") from self.error
        return self.caught_at - deadline

    def close(self) -> None:
        self.stop = True
        self.go.set()
        self.thread.join(WORKER_TIMEOUT_S)


def _sample_all(
    worker: RunawayWorker,
    counts: Counts,
    running: Callable[[], bool],
    at_deadline: Callable[[], object],
    after: Callable[[], None],
) -> list[float]:
    samples: list[float] = []
    for i in range(counts.interrupt_warmup + counts.interrupts):
        with gc_off():
            latency = worker.sample(counts.runaway_s, running, at_deadline)
        after()
        if i >= counts.interrupt_warmup:
            samples.append(latency)
    return samples


def bench_hlasync(guest: Path, counts: Counts) -> Row:
    sb = Sandbox(guest)
    worker = RunawayWorker("hlasync-spin", lambda: sb.call("spin"), GuestCancelled)

    def interrupt() -> None:
        if not sb.interrupt():
            raise BenchError("interrupt() found no running call")

    def after() -> None:
        state = sb.state
        if state is not SandboxState.POISONED:
            raise BenchError(f"sandbox is {state.value} after the interrupt, not poisoned")
        sb.restore()

    try:
        samples = _sample_all(
            worker, counts, lambda: sb.state is SandboxState.RUNNING, interrupt, after
        )
        if sb.call("add", 1, 2) != 3:
            raise BenchError("sandbox broken after interrupt and restore")
    finally:
        worker.close()
        sb.close()
    return Row(
        CATEGORY,
        "interrupt.hlasync",
        "hlasync",
        'sb.interrupt() of sb.call("spin") until GuestCancelled is caught',
        samples,
        baseline=True,
    )


def bench_wasmtime(counts: Counts) -> Row:
    key, peer = "interrupt.wasmtime", "wasmtime"
    label = "engine.increment_epoch() of an infinite loop until the Trap is caught"
    reason = _wasm.missing()
    if reason is not None:
        return skipped(CATEGORY, key, peer, label, reason)
    import wasmtime  # type: ignore[import-not-found, unused-ignore]

    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    module = wasmtime.Module(engine, _wasm.WAT)
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    instance = wasmtime.Instance(store, module, [])
    spin = instance.exports(store)["spin"]
    add = instance.exports(store)["add"]
    assert isinstance(spin, wasmtime.Func) and isinstance(add, wasmtime.Func)
    worker = RunawayWorker(
        "wasmtime-spin",
        lambda: spin(store),
        wasmtime.Trap,
        before=lambda: store.set_epoch_deadline(1),  # one epoch tick from now
    )
    try:
        samples = _sample_all(worker, counts, lambda: True, engine.increment_epoch, lambda: None)
        store.set_epoch_deadline(1)
        if add(store, 1, 2) != 3:
            raise BenchError("wasmtime instance broken after the trap")
    finally:
        worker.close()
    return Row(CATEGORY, key, peer, label, samples)


def bench_kill(counts: Counts) -> Row:
    samples: list[float] = []
    clock = time.perf_counter_ns
    for i in range(counts.interrupt_warmup + counts.interrupts):
        proc = start_ready([sys.executable, "-c", RUNAWAY])
        try:
            time.sleep(counts.runaway_s)
            if proc.poll() is not None:
                raise BenchError(f"runaway child exited early ({proc.returncode})")
            with gc_off():
                start = clock()
                proc.kill()  # SIGKILL
                status = proc.wait()
                elapsed = clock() - start
        finally:
            reap(proc)
        if status != -9:
            raise BenchError(f"runaway child ended with {status}, not SIGKILL")
        if i >= counts.interrupt_warmup:
            samples.append(elapsed)
    return Row(
        CATEGORY,
        "interrupt.kill",
        "child process",
        "SIGKILL of a looping Python child until waitpid returns",
        samples,
    )


def run(guest: Path, counts: Counts) -> list[Row]:
    return [bench_hlasync(guest, counts), bench_wasmtime(counts), bench_kill(counts)]
