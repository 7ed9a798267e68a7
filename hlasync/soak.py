"""Soak test: ``python -m hlasync.soak --minutes N``.

Drives 100 sandboxes (a pool of 60 and 40 dedicated ones) through one
Supervisor with a random mix of good calls, faults, aborts, timeouts,
cancellations, host calls and on-demand dumps, for N minutes. Every dump is
checked as it appears (it opens, and names the right sandbox, function and
reason) and then deleted, so disk use stays flat. At the end it checks that

- every failure that should dump produced exactly one complete dump, and
  exactly one ``CrashDumpWritten`` event for it, and no dump failed;
- no event was lost (the subscriber's drop counter is zero);
- file descriptors and threads came back to where they started, and RSS
  stayed bounded;

prints a report (and writes JSON with ``--json``) and exits 1 if any check
failed. Guest output is discarded; dumps go to a temporary directory.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil

from . import events as ev
from . import guests
from .crashdump import CoreDump
from .errors import GuestAborted, GuestCrashed, GuestTimeout, HlasyncError, InvalidCoreDump
from .sandbox import Sandbox
from .supervisor import Pool, SupervisedSandbox, Supervisor

__all__ = ["SoakReport", "main", "run_soak"]

POOL_SIZE = 60
DEDICATED = 40
CLIENTS = 24
#: RSS may grow by this much over a run (caches, allocator arenas) before the check fails.
RSS_SLACK = 96 << 20

ACTIONS = (
    ("good", 70),
    ("fault", 8),
    ("abort", 4),
    ("timeout", 5),
    ("cancel", 5),
    ("host", 4),
    ("dump", 4),
)
FAULTS = {
    "divide_by_zero": 0,
    "null_pointer_write": 14,
    "undefined_instruction": 6,
    "privileged_instruction": 13,
    "stack_overflow": 14,
}


@dataclass
class SoakReport:
    seconds: float = 0.0
    seed: int = 0
    processes: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    dumps_expected: int = 0
    dumps_verified: int = 0
    dump_events: int = 0
    events: dict[str, int] = field(default_factory=dict)
    events_dropped: int = 0
    fds: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class _Soak:
    def __init__(self, seconds: float, seed: int, dump_dir: Path, processes: int = 0) -> None:
        self.deadline = time.monotonic() + seconds
        self.processes = processes
        self.seed = seed
        self.dump_dir = dump_dir
        self.report = SoakReport(seed=seed, processes=processes)
        self.actions: collections.Counter[str] = collections.Counter()
        self.expected: dict[Path, tuple[str, str | None, str]] = {}  # path -> sandbox, fn, reason
        self.event_paths: collections.Counter[Path] = collections.Counter()
        self.event_counts: collections.Counter[str] = collections.Counter()
        self.process = psutil.Process()
        self.rss_max = 0

    def fail(self, message: str) -> None:
        if len(self.report.failures) < 50:
            self.report.failures.append(message)

    def expect_dump(
        self, path: Path | None, sandbox: str, function: str | None, reason: str
    ) -> None:
        """Check a dump as soon as it is reported, then delete it. ``function`` None:
        any (an on-demand dump names whatever call was running)."""
        self.report.dumps_expected += 1
        if path is None:
            self.fail(f"{reason} in {function} on {sandbox}: no core dump")
            return
        if path in self.expected:
            self.fail(f"core dump {path} reported twice")
        self.expected[path] = (sandbox, function, reason)
        try:
            with CoreDump.open(path) as dump:
                meta = dump.metadata
                got = (meta["sandbox_id"], meta["reason"], meta["function"])
                if got[:2] != (sandbox, reason) or function not in (None, got[2]):
                    self.fail(f"{path}: metadata {got}, expected {(sandbox, reason, function)}")
                if dump.registers["rip"] == 0:
                    self.fail(f"{path}: no registers")
        except InvalidCoreDump as exc:
            self.fail(f"incomplete core dump: {exc}")
        else:
            self.report.dumps_verified += 1
        path.unlink(missing_ok=True)

    async def client(
        self, rng: random.Random, pool: Pool, dedicated: list[SupervisedSandbox], sup: Supervisor
    ) -> None:
        names = [a for a, _ in ACTIONS]
        weights = [w for _, w in ACTIONS]
        while time.monotonic() < self.deadline:
            action = rng.choices(names, weights)[0]
            target: Pool | SupervisedSandbox = pool if rng.random() < 0.5 else rng.choice(dedicated)
            self.actions[action] += 1
            try:
                await self.act(action, rng, target, sup)
            except HlasyncError as exc:
                self.fail(f"{action} on {target.name}: unexpected {type(exc).__name__}: {exc}")

    async def act(
        self, action: str, rng: random.Random, target: Pool | SupervisedSandbox, sup: Supervisor
    ) -> None:
        if action == "good":
            a, b = rng.randrange(-(10**9), 10**9), rng.randrange(-(10**9), 10**9)
            if (result := await target.call("add", a, b)) != a + b:
                self.fail(f"add({a}, {b}) returned {result!r}")
            text = "x" * rng.randrange(0, 2000)
            if await target.call("echo", text) != text:
                self.fail("echo returned something else")
        elif action == "fault":
            function = rng.choice(list(FAULTS))
            try:
                await target.call(function)
                self.fail(f"{function} did not fault")
            except GuestCrashed as exc:
                if exc.vector != FAULTS[function]:
                    self.fail(f"{function}: vector {exc.vector}, expected {FAULTS[function]}")
                self.expect_dump(exc.core_path, exc.sandbox_id, function, "fault")
        elif action == "abort":
            try:
                await target.call("abort_guest", 7, "soak abort")
                self.fail("abort_guest returned")
            except GuestAborted as exc:
                self.expect_dump(exc.core_path, exc.sandbox_id, "abort_guest", "abort")
        elif action == "timeout":
            try:
                await target.call("spin", timeout=rng.uniform(0.02, 0.08))
                self.fail("spin returned")
            except GuestTimeout as exc:
                self.expect_dump(exc.core_path, exc.sandbox_id, "spin", "timeout")
        elif action == "cancel":
            with anyio.move_on_after(rng.uniform(0.01, 0.05)):
                await target.call("spin")
                self.fail("spin returned")
        elif action == "host":
            x = rng.randrange(1000)
            if (result := await target.call("call_host", "double", x)) != 2 * x:
                self.fail(f"call_host(double, {x}) returned {result!r}")
        elif action == "dump" and isinstance(target, SupervisedSandbox):
            path = await sup.generate_crashdump(target)
            self.expect_dump(path, target.id, None, "on-demand")

    async def consume(self, stream: ev.EventStream) -> None:
        async for event in stream:
            self.event_counts[type(event).__name__] += 1
            if isinstance(event, ev.CrashDumpWritten):
                self.event_paths[event.path] += 1
            elif isinstance(event, ev.CrashDumpFailed):
                self.fail(f"dump failed: {event.error}")

    async def sample(self) -> None:
        while time.monotonic() < self.deadline:
            self.rss_max = max(self.rss_max, self.process.memory_info().rss)
            await anyio.sleep(0.5)

    async def run(self) -> SoakReport:
        started = time.monotonic()
        guest = guests.path("simpleguest")
        # The process keeps /dev/kvm and one template per guest open: open them first.
        Sandbox(guest).close()
        gc.collect()  # what earlier code left for the GC must not close fds during the soak
        self.report.fds["start"] = self.process.num_fds()
        self.report.threads["start"] = threading.active_count()
        rss_start = self.process.memory_info().rss
        rng = random.Random(self.seed)
        async with Supervisor(workers=2, processes=self.processes, shutdown_grace=2.0) as sup:
            host = {"double": lambda x: 2 * x}
            quiet = _discard
            pool = await sup.create_pool(guest, size=POOL_SIZE, host_functions=host, output=quiet)
            dedicated = [
                await sup.create_sandbox(guest, host_functions=host, output=quiet)
                for _ in range(DEDICATED)
            ]
            self.report.fds["running"] = self.process.num_fds()
            self.report.threads["running"] = threading.active_count()
            async with (
                sup.subscribe(buffer=100_000) as stream,
                anyio.create_task_group() as consumers,
            ):
                consumers.start_soon(self.consume, stream)
                async with anyio.create_task_group() as clients:
                    clients.start_soon(self.sample)
                    for i in range(CLIENTS):
                        client_rng = random.Random(rng.random() + i)
                        clients.start_soon(self.client, client_rng, pool, dedicated, sup)
                await anyio.sleep(0.5)  # the last events reach the stream
                self.report.events_dropped = stream.statistics().dropped
                consumers.cancel_scope.cancel()
        self.report.seconds = time.monotonic() - started
        self.report.fds["end"] = self.process.num_fds()
        self.report.threads["end"] = threading.active_count()
        rss_end = self.process.memory_info().rss
        self.report.rss_mib = {
            "start": rss_start / 2**20,
            "max": max(self.rss_max, rss_end) / 2**20,
            "end": rss_end / 2**20,
        }
        self.check()
        return self.report

    def check(self) -> None:
        report = self.report
        report.actions = dict(self.actions)
        report.events = dict(self.event_counts)
        report.dump_events = sum(self.event_paths.values())
        expected = set(self.expected)
        announced = set(self.event_paths)
        for path in expected - announced:
            self.fail(f"no CrashDumpWritten event for {path}")
        for path in announced - expected:
            self.fail(f"CrashDumpWritten for a dump nobody reported: {path}")
        for path, count in self.event_paths.items():
            if count != 1:
                self.fail(f"{count} CrashDumpWritten events for {path}")
        if report.dumps_verified != report.dumps_expected:
            self.fail(f"{report.dumps_expected - report.dumps_verified} dumps missing or broken")
        if report.events_dropped:
            self.fail(f"{report.events_dropped} events dropped")
        if report.fds["end"] != report.fds["start"]:
            self.fail(f"file descriptors: {report.fds['start']} before, {report.fds['end']} after")
        if report.threads["end"] != report.threads["start"]:
            self.fail(f"threads: {report.threads['start']} before, {report.threads['end']} after")
        if report.rss_mib["end"] - report.rss_mib["start"] > RSS_SLACK / 2**20:
            self.fail(f"RSS grew by {report.rss_mib['end'] - report.rss_mib['start']:.0f} MiB")
        leftovers = list(self.dump_dir.iterdir())
        if leftovers:
            self.fail(f"{len(leftovers)} unexpected files in the dump directory")


def _discard(text: str) -> None:
    pass


def run_soak(seconds: float, seed: int | None = None, processes: int = 0) -> SoakReport:
    """Run the soak for ``seconds`` (dumps in a temporary directory) and check it;
    ``processes``: the supervisor's worker processes (0: threads)."""
    seed = random.randrange(2**32) if seed is None else seed
    dump_dir = Path(tempfile.mkdtemp(prefix="hlasync-soak-"))
    previous = os.environ.get("HYPERLIGHT_CORE_DUMP_DIR")
    os.environ["HYPERLIGHT_CORE_DUMP_DIR"] = str(dump_dir)
    stderr = sys.stderr
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - one "Core dump created" line per dump
    try:
        return anyio.run(_Soak(seconds, seed, dump_dir, processes).run)
    finally:
        sys.stderr.close()
        sys.stderr = stderr
        if previous is None:
            os.environ.pop("HYPERLIGHT_CORE_DUMP_DIR", None)
        else:
            os.environ["HYPERLIGHT_CORE_DUMP_DIR"] = previous
        shutil.rmtree(dump_dir, ignore_errors=True)


def render(report: SoakReport) -> str:
    lines = [
        f"hlasync soak: {report.seconds:.0f} s, seed {report.seed}, "
        f"{POOL_SIZE + DEDICATED} sandboxes, {CLIENTS} clients"
        + (f", {report.processes} worker processes" if report.processes else ""),
        "actions:  " + ", ".join(f"{k} {v}" for k, v in sorted(report.actions.items())),
        f"dumps:    {report.dumps_expected} expected, {report.dumps_verified} verified complete, "
        f"{report.dump_events} CrashDumpWritten events",
        "events:   "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.events.items()))
        + f"; dropped {report.events_dropped}",
        f"fds:      {report.fds}",
        f"threads:  {report.threads}",
        "rss MiB:  " + ", ".join(f"{k} {v:.1f}" for k, v in report.rss_mib.items()),
        "result:   " + ("OK" if report.ok else "FAILED"),
    ]
    lines += [f"  - {failure}" for failure in report.failures]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hlasync.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=1.0, help="how long (default 1)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="worker processes of the supervisor (default 0: threads of this process)",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.processes < 0:
        parser.error("--processes must be >= 0")
    report = run_soak(args.minutes * 60, args.seed, args.processes)
    print(render(report))
    if args.json:
        data: dict[str, Any] = asdict(report)
        data["ok"] = report.ok
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
