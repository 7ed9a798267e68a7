"""A randomized stress run of the Supervisor from many tasks:
``python -m tests.stress_supervisor --seconds 30 [--seed N] [--processes 2]
[--backend trio]``.

Tasks call pools and dedicated sandboxes (good calls, faults, calls that
time out, calls cancelled by the caller, async host functions that call
another supervised sandbox), dump dedicated sandboxes on demand, and close
and remake dedicated sandboxes, all at once. Every operation must end within
a bound with its result or an error it may meet (a timeout, a cancellation,
a sandbox closed under it): anything else is a finding. ``run()`` returns
the findings; the test suite runs it with a fixed seed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from hlasync import (
    GuestCancelled,
    GuestCrashed,
    GuestTimeout,
    HostFunctionError,
    SandboxClosed,
    SandboxConfig,
    SupervisorClosed,
    guests,
)
from hlasync.supervisor import SupervisedSandbox, Supervisor

from .stress import Report, describe, show

__all__ = ["Report", "main", "run"]

#: Seconds one operation may take before it counts as hung.
HANG_AFTER = 30.0
#: Errors an operation may meet while others act on the same targets.
CONTENDED: tuple[type[BaseException], ...] = (GuestCancelled, SupervisorClosed, SandboxClosed)
OPERATIONS = (
    ("add", 30),
    ("dedicated_add", 15),
    ("fault", 6),
    ("timeout", 4),
    ("cancel", 6),
    ("host", 10),
    ("dump", 4),
    ("replace", 1),
)


class Stress:
    def __init__(self, seconds: float, seed: int, tasks: int, dumps: Path) -> None:
        self.seconds, self.seed, self.tasks = seconds, seed, tasks
        self.report = Report(seconds, seed)
        # idle_trim: sandboxes resting 10 ms are trimmed (in the workers) amid the rest.
        self.config = SandboxConfig(crashdump_dir=dumps, idle_trim=0.01)
        self.dedicated: list[SupervisedSandbox] = []

    def finding(self, message: str) -> None:
        self.report.findings.append(message)

    async def peer(self, x: int) -> int:
        """An async host function that calls another supervised sandbox."""
        target = random.choice(self.dedicated)
        result = await target.call("add", x, 1, timeout=5)
        assert isinstance(result, int)
        return result

    async def act(self, sup: Supervisor, pool: Any, rnd: random.Random, operation: str) -> str:
        match operation:
            case "add":
                a, b = rnd.randrange(1 << 30), rnd.randrange(1 << 30)
                if await pool.call("add", a, b, timeout=5) != a + b:
                    self.finding("add returned a wrong result")
            case "dedicated_add":
                target = rnd.choice(self.dedicated)
                a = rnd.randrange(1 << 30)
                if await target.call("add", a, 1, timeout=5) != a + 1:
                    self.finding("dedicated add returned a wrong result")
            case "fault":
                try:
                    await pool.call("divide_by_zero", timeout=5)
                except GuestCrashed:
                    return "crashed"
                self.finding("divide_by_zero returned")
            case "timeout":
                try:
                    await rnd.choice([pool, *self.dedicated]).call("spin", timeout=0.05)
                except GuestTimeout as exc:
                    if exc.core_path is None and exc.crashdump_error is None:
                        self.finding("a timeout without a dump and without a dump error")
                    return "timed out"
                self.finding("spin returned")
            case "cancel":
                with anyio.move_on_after(rnd.random() * 0.02):
                    await rnd.choice([pool, *self.dedicated]).call("spin_for", 10**7)
                return "ok"
            case "host":
                x = rnd.randrange(1 << 20)
                if await pool.call("call_host", "peer", x, timeout=10) != x + 1:
                    self.finding("call_host(peer) returned a wrong result")
            case "dump":
                path = await rnd.choice(self.dedicated).generate_crashdump()
                Path(path).unlink(missing_ok=True)
            case "replace":
                index = rnd.randrange(len(self.dedicated))
                old = self.dedicated[index]
                self.dedicated[index] = await sup.create_sandbox(
                    guests.path("simpleguest"), self.config
                )
                await old.aclose()
        return "ok"

    async def client(self, sup: Supervisor, pool: Any, number: int) -> None:
        rnd = random.Random(self.seed * 1000 + number)
        names = [name for name, _ in OPERATIONS]
        weights = [weight for _, weight in OPERATIONS]
        deadline = anyio.current_time() + self.seconds
        while anyio.current_time() < deadline:
            operation = rnd.choices(names, weights)[0]
            self.report.operations[operation] += 1
            try:
                with anyio.fail_after(HANG_AFTER):
                    outcome = await self.act(sup, pool, rnd, operation)
            except TimeoutError:
                outcome = "hung"
                self.finding(f"{operation}: no outcome within {HANG_AFTER:g} s")
            except HostFunctionError as exc:
                outcome = f"HostFunctionError({type(exc.__cause__).__name__})"
                if operation != "host":
                    self.finding(f"{operation}: {exc!r}")
            except CONTENDED as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - every other outcome is a finding
                outcome = type(exc).__name__
                self.finding(f"{operation}: {describe(exc)}")
            self.report.outcomes[f"{operation}: {outcome}"] += 1

    async def run(self, processes: int) -> Report:
        guest = guests.path("simpleguest")
        # Six workers for a pool of three: pool calls blocked in the host function
        # that calls a dedicated sandbox leave workers for that call (a call
        # waits for a free worker, however long its host function waits).
        async with Supervisor(workers=6, processes=processes, shutdown_grace=1.0) as sup:
            pool = await sup.create_pool(
                guest, size=3, config=self.config, host_functions={"peer": self.peer}
            )
            self.dedicated = [await sup.create_sandbox(guest, self.config) for _ in range(3)]
            async with anyio.create_task_group() as tasks:
                for number in range(self.tasks):
                    tasks.start_soon(self.client, sup, pool, number)
        return self.report


def run(
    seconds: float, seed: int, *, processes: int = 0, backend: str = "asyncio", tasks: int = 12
) -> Report:
    with tempfile.TemporaryDirectory(prefix="stress-dumps-") as dumps:
        stress = Stress(seconds, seed, tasks, Path(dumps))
        return anyio.run(stress.run, processes, backend=backend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--processes", type=int, default=0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"stress: {options.seconds:g} s, seed {seed}, processes={options.processes}", flush=True)
    return show(run(options.seconds, seed, processes=options.processes, backend=options.backend))


if __name__ == "__main__":
    sys.exit(main())
