"""A randomized stress run of the synchronous Sandbox API from many threads:
``python -m tests.stress --seconds 60 [--seed N] [--threads 8]``.

Calls (good ones, faults, long ones, host functions that call another
sandbox), interrupts (of the sandbox and of one call's handle), on-demand
dumps, restores and closes (a closed sandbox is replaced) hit a handful of
sandboxes, some hot (``spin`` > 0: calls through the doorbell) and some on
the exit path, all at once; idle trims (``idle_trim``) come in between.
Every operation must end, within a bound, with its own result or with an
error it may meet when others act on the same sandbox (busy, poisoned,
closed, cancelled): anything else is a finding.

- a call of a function that cannot fail (``add``, ``spin_for``) that fails
  otherwise (a fault: something of another call reached it; an
  ``AssertionError``; a protocol error) is a finding;
- an operation that takes longer than :data:`HANG_AFTER` is a finding (the
  stacks of every thread are printed);
- after the run, every sandbox closes, every hot thread ends, and the
  process uses no CPU.

``run(seconds, seed)`` returns the findings (empty: nothing found); the
test suite runs it with a fixed seed, ``.ci/run`` longer with another.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hlasync import (
    CrashdumpError,
    GuestCancelled,
    GuestCrashed,
    HostFunctionError,
    Sandbox,
    SandboxBusy,
    SandboxClosed,
    SandboxConfig,
    SandboxPoisoned,
    guests,
)
from hlasync.sandbox import trim

__all__ = ["Report", "describe", "main", "run", "show"]

#: Seconds one operation may take before it counts as hung (a dump of an 8 MiB
#: guest, a close that waits for a call: well under a second each).
HANG_AFTER = 30.0
#: Errors any operation may meet while other threads act on its sandbox.
CONTENDED: tuple[type[BaseException], ...] = (
    GuestCancelled,
    SandboxBusy,
    SandboxClosed,
    SandboxPoisoned,
)
#: The slots whose sandboxes spin (SandboxConfig.spin > 0): the driver's.
HOT_SLOTS = (0, 2)
#: Seconds a client pauses at most between operations while the driver's
#: sandboxes may go hot, in phases of PHASE seconds (every other phase).
PAUSE = 0.01
PHASE = 0.5
#: The operations that call a guest (a call by any thread keeps sandboxes cold).
CALLS = frozenset({"add", "spin_for", "host", "fault"})
#: (operation, weight)
OPERATIONS = (
    ("add", 30),
    ("spin_for", 8),
    ("host", 10),
    ("fault", 6),
    ("interrupt", 10),
    ("interrupt_handle", 5),
    ("dump", 4),
    ("restore", 12),
    ("close", 2),
)


@dataclass
class Report:
    seconds: float
    seed: int
    operations: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[str] = field(default_factory=list)
    trims: int = 0  # idle trims done meanwhile (SandboxConfig.idle_trim)


class Stress:
    def __init__(self, seconds: float, seed: int, threads: int, dumps: Path) -> None:
        self.seconds, self.seed, self.threads = seconds, seed, threads
        self.report = Report(seconds, seed)
        self.dumps = dumps
        self.configs = [
            # idle_trim: the trim thread drops mapped image pages whenever a
            # sandbox rests 10 ms, amid everything else.
            SandboxConfig(spin=spin, crashdump_dir=dumps, idle_trim=0.01)
            for spin in (0.05, 0, 0.05, 0)
        ]
        self.slots: list[Sandbox] = [self._new(config) for config in self.configs]
        self.lock = threading.Lock()
        self.busy: dict[int, tuple[str, float]] = {}  # thread -> (operation, started)
        self.stop = threading.Event()

    def _new(self, config: SandboxConfig) -> Sandbox:
        sb = Sandbox(guests.path("simpleguest"), config)
        sb.add_crashdump_listener(self._dumped)
        return sb

    def _dumped(self, record: object) -> None:
        path = getattr(record, "path", None)
        if path is not None:
            Path(path).unlink(missing_ok=True)  # checked elsewhere; keep the disk flat

    def finding(self, message: str) -> None:
        with self.lock:
            self.report.findings.append(message)

    # ---------------------------------------------------------------- actions
    def act(self, rnd: random.Random, operation: str) -> str:
        index = rnd.randrange(len(self.slots))
        sb = self.slots[index]
        match operation:
            case "add":
                a, b = rnd.randrange(1 << 30), rnd.randrange(1 << 30)
                if sb.call("add", a, b) != a + b:
                    self.finding(f"add({a}, {b}) returned a wrong result")
            case "spin_for":
                n = rnd.randrange(1, 200_000)
                if sb.call("spin_for", n) != n:
                    self.finding(f"spin_for({n}) returned a wrong result")
            case "host":
                x = rnd.randrange(1 << 20)
                if sb.call("call_host", "peer", x) != x + 1:
                    self.finding("call_host(peer) returned a wrong result")
            case "fault":
                try:
                    sb.call("divide_by_zero")
                except GuestCrashed as exc:
                    if exc.vector_name != "#DE":
                        self.finding(f"divide_by_zero faulted with {exc.vector_name}")
                    return "crashed"
                self.finding("divide_by_zero returned")
            case "interrupt":
                return "interrupted" if sb.interrupt() else "idle"
            case "interrupt_handle":
                handle = sb.current_call
                return "interrupted" if handle is not None and handle.interrupt() else "idle"
            case "dump":
                path = sb.generate_crashdump()
                path.unlink(missing_ok=True)
            case "restore":
                sb.restore()
            case "close":
                sb.close(timeout=1.0)
                with self.lock:
                    if self.slots[index] is sb:
                        self.slots[index] = self._register(self._new(self.configs[index]))
        return "ok"

    def _register(self, sb: Sandbox) -> Sandbox:
        sb.register_host_function("peer", self._peer)
        return sb

    def _peer(self, x: int) -> int:
        """A host function that calls another sandbox (maybe the caller's own:
        then SandboxBusy, reported to the guest as a failed host call)."""
        other = random.choice(self.slots)
        result = other.call("add", x, 1)
        assert isinstance(result, int)
        return result

    # ---------------------------------------------------------------- threads
    def driver(self) -> None:
        """Calls the hot-configured sandboxes back to back, so that they go hot
        whenever the clients leave a gap (a sandbox spins only while no other
        thread calls): the clients' operations then meet hot calls."""
        rnd = random.Random(self.seed)
        while not self.stop.is_set():
            index = rnd.choice(HOT_SLOTS)
            for _ in range(rnd.randrange(1, 200)):
                try:
                    self.slots[index].call("add", 1, 2)
                except CONTENDED:
                    break
                except BaseException as exc:  # noqa: BLE001 - every other outcome is a finding
                    self.finding(f"driver add: {describe(exc)}")
                    break

    def client(self, number: int) -> None:
        rnd = random.Random(self.seed * 1000 + number)
        names = [name for name, _ in OPERATIONS]
        weights = [weight for _, weight in OPERATIONS]
        quiet = [weight if name not in CALLS else 0 for name, weight in OPERATIONS]
        me = threading.get_ident()
        while not self.stop.is_set():
            # Half of the time the clients make no calls: the driver's sandboxes
            # go hot, and the interrupts, dumps, restores and closes meet them so.
            hot_phase = int(time.monotonic() / PHASE) % 2 == 0
            operation = rnd.choices(names, quiet if hot_phase else weights)[0]
            with self.lock:
                self.busy[me] = (operation, time.monotonic())
                self.report.operations[operation] += 1
            try:
                outcome = self.act(rnd, operation)
            except HostFunctionError as exc:
                outcome = f"HostFunctionError({type(exc.__cause__).__name__})"
                if operation != "host" or not isinstance(exc.__cause__, CONTENDED):
                    self.finding(f"{operation}: {exc!r} caused by {exc.__cause__!r}")
            except CONTENDED as exc:
                outcome = type(exc).__name__
            except CrashdumpError as exc:
                outcome = "CrashdumpError"
                if operation != "dump":
                    self.finding(f"{operation}: {exc!r}")
            except BaseException as exc:  # noqa: BLE001 - every other outcome is a finding
                outcome = type(exc).__name__
                self.finding(f"{operation}: {describe(exc)}")
            with self.lock:
                self.busy.pop(me, None)
                self.report.outcomes[f"{operation}: {outcome}"] += 1
            if hot_phase:
                time.sleep(rnd.random() * PAUSE)

    def watchdog(self) -> None:
        while not self.stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                hung = [(op, now - t) for op, t in self.busy.values() if now - t > HANG_AFTER]
            if hung:
                self.finding(f"hung: {hung}")
                faulthandler.dump_traceback(all_threads=True)
                self.stop.set()

    def run(self) -> Report:
        for sb in self.slots:
            self._register(sb)
        clients = [
            threading.Thread(target=self.client, args=(n,), name=f"stress-{n}", daemon=True)
            for n in range(self.threads)
        ]
        clients.append(threading.Thread(target=self.driver, name="stress-driver", daemon=True))
        watchdog = threading.Thread(target=self.watchdog, name="stress-watchdog", daemon=True)
        trims = trim.trims()
        for thread in [*clients, watchdog]:
            thread.start()
        self.stop.wait(self.seconds)
        self.report.trims = trim.trims() - trims
        self.stop.set()
        for thread in clients:
            thread.join(HANG_AFTER)
            if thread.is_alive():
                self.finding(f"{thread.name} did not end")
        watchdog.join()
        self._check_the_end()
        return self.report

    def _check_the_end(self) -> None:
        for sb in self.slots:
            sb.close(timeout=5)
        deadline = time.monotonic() + 10
        while any(t.name.startswith("hlasync-hot") for t in threading.enumerate()):
            if time.monotonic() > deadline:
                self.finding("hot threads still alive after every sandbox closed")
                break
            time.sleep(0.05)
        process = psutil.Process()
        before = sum(process.cpu_times()[:2])
        time.sleep(0.5)
        spent = sum(process.cpu_times()[:2]) - before
        if spent > 0.2:
            self.finding(f"{spent:.2f} s of CPU in 0.5 s after every sandbox closed")


def describe(exc: BaseException) -> str:
    """An unexpected error, with where it was raised."""
    where = traceback.extract_tb(exc.__traceback__)[-1:]
    place = f" at {where[0].filename}:{where[0].lineno}" if where else ""
    return f"{type(exc).__name__}: {exc}{place}"


def run(seconds: float, seed: int, threads: int = 8) -> Report:
    with tempfile.TemporaryDirectory(prefix="stress-dumps-") as dumps:
        return Stress(seconds, seed, threads, Path(dumps)).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=8)
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"stress: {options.seconds:g} s, seed {seed}, {options.threads} threads", flush=True)
    return show(run(options.seconds, seed, options.threads))


def show(report: Report) -> int:
    """Print a run's outcomes and findings; the exit status (1: findings)."""
    for name, count in sorted(report.outcomes.items()):
        print(f"  {name:<45} {count}")
    trims = f", idle trims: {report.trims}" if report.trims else ""  # this process's
    print(f"operations: {sum(report.operations.values())}{trims}")
    for finding in report.findings:
        print(f"FINDING: {finding}")
    print("result: " + ("OK" if not report.findings else f"{len(report.findings)} findings"))
    return 0 if not report.findings else 1


if __name__ == "__main__":
    sys.exit(main())
