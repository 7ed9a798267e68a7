"""Going past one event loop: a service spread over several front processes,
each with its own event loop and its own supervisor and worker processes.

Run it from a checkout (needs /dev/kvm)::

    python examples/front_processes.py [FRONTS] [SECONDS]

One event loop does some Python for every call it awaits (tens of
microseconds: see docs/benchmarks.md, "loop CPU per call"), so one loop
feeds at most a few tens of thousands of calls a second, however many
worker processes it has. A service that needs more runs as several
processes (as web servers do: ``uvicorn --workers N``, gunicorn), and each
of them holds its own ``Supervisor``: nothing is shared between them but
the machine. Give each ``processes=cores // fronts`` so that together they
use every core once.

This script starts FRONTS (default 2) such processes with the standard
library's ``multiprocessing`` (spawned, never forked: a process that holds
VMs is not forked), lets each call its own hot pool from 32 tasks for
SECONDS (default 1), and prints what each did and their sum.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import queue
import sys
import time
from collections.abc import Sequence

import anyio

from hlasync import SandboxConfig, guests
from hlasync.supervisor import Supervisor


async def serve(index: int, processes: int, seconds: float) -> tuple[int, float]:
    """One front: its supervisor, its pool, its callers. (calls made, seconds)."""
    async with Supervisor(processes=processes, workers=1) as sup:
        pool = await sup.create_pool(
            guests.path("simpleguest"), size=2 * processes, config=SandboxConfig(hot_restore=True)
        )
        assert await pool.call("add", index, 1) == index + 1
        calls = 0
        began = time.monotonic()
        deadline = began + seconds

        async def caller() -> None:
            nonlocal calls
            while time.monotonic() < deadline:
                assert await pool.call("add", calls, 1) is not None
                calls += 1

        async with anyio.create_task_group() as group:
            for _ in range(32):
                group.start_soon(caller)
        return calls, time.monotonic() - began


Result = tuple[int, int, int, float]  # front index, its pid, calls, seconds


def front(
    index: int, processes: int, seconds: float, results: multiprocessing.Queue[Result]
) -> None:
    """A front process's main: its own event loop (``anyio.run``)."""
    calls, took = anyio.run(serve, index, processes, seconds)
    results.put((index, os.getpid(), calls, took))


def collect(
    results: multiprocessing.Queue[Result],
    children: Sequence[multiprocessing.process.BaseProcess],
    deadline: float,
) -> list[Result]:
    """Every front's result; fails at once, naming it, when a front died
    without one (rather than waiting for a result that cannot come)."""
    done: list[Result] = []
    while len(done) < len(children):
        try:
            done.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        dead = [c for c in children if c.exitcode not in (None, 0)]
        if dead:
            raise SystemExit(f"front process {dead[0].pid} ended with exit code {dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise SystemExit("the front processes did not answer within 120 s")
    return done


def main() -> None:
    fronts = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    cores = len(os.sched_getaffinity(0))
    processes = max(1, cores // fronts)
    spawn = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[Result] = spawn.Queue()
    children = [
        spawn.Process(target=front, args=(index, processes, seconds, results))
        for index in range(fronts)
    ]
    for child in children:
        child.start()
    try:
        done = sorted(collect(results, children, deadline=time.monotonic() + 120))
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    total = 0.0
    for index, pid, calls, took in done:
        rate = calls / took
        total += rate
        print(f"front {index} (pid {pid}, {processes} worker processes): {rate:,.0f} calls/s")
    print(f"{fronts} fronts on {cores} cores together: {total:,.0f} calls/s")
    print("every front answered its own calls with its own supervisor")
    assert all(child.exitcode == 0 for child in children)


if __name__ == "__main__":
    main()
