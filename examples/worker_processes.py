"""A supervisor whose sandboxes live in worker processes, and what happens
when one of those processes dies.

Run it from a checkout (needs /dev/kvm)::

    python examples/worker_processes.py

It starts ``Supervisor(processes=2)``: two worker processes, each with its
own vCPU thread, watchdog and dump writing. A pool of four sandboxes is split
two and two; a host function given as an importable reference
(``"math:factorial"``) runs inside the workers, a plain one (``double``) in
this process. Then it kills one worker with SIGKILL while a call runs there
and another waits there for its vCPU thread: the running one fails with
``WorkerLost``, the waiting one (its start mark says it never started) runs
on another worker, a ``WorkerDied`` event says one call was lost, a new
worker takes the dead one's sandboxes, and the pool goes on serving.
"""

from __future__ import annotations

import os
import signal

import anyio
import psutil

from hlasync import WorkerLost, guests
from hlasync import events as ev
from hlasync.supervisor import Supervisor


def double(x: int) -> int:  # runs in this process (one round trip per host call)
    return 2 * x


def worker_pids() -> list[int]:
    return [
        child.pid
        for child in psutil.Process().children()
        if "hlasync.supervisor.worker" in " ".join(child.cmdline())
    ]


async def main() -> None:
    async with (
        Supervisor(processes=2, workers=1) as sup,
        sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as events,
    ):
        pool = await sup.create_pool(
            guests.path("simpleguest"),
            size=4,
            host_functions={"factorial": "math:factorial", "double": double},
        )
        print(f"{sup!r}: worker processes {worker_pids()}, sandboxes {len(pool.sandbox_ids)}")
        print("call_host('factorial', 10) ->", await pool.call("call_host", "factorial", 10))
        print("call_host('double', 21)    ->", await pool.call("call_host", "double", 21))

        victim = worker_pids()[0]
        outcomes: list[str] = []

        async def long_call() -> None:
            try:
                await pool.call("spin_for", 4_000_000_000, timeout=30)
                outcomes.append("returned")
            except WorkerLost as exc:
                outcomes.append(f"WorkerLost (exit status {exc.exit_status})")

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(long_call)
            await anyio.sleep(0.3)  # each worker runs one and has the next one queued
            print(f"killing worker process {victim} with SIGKILL")
            os.kill(victim, signal.SIGKILL)
        print("the four calls:", ", ".join(sorted(outcomes)))
        with anyio.fail_after(30):
            died = await events.receive()
            started = await events.receive()
        assert isinstance(died, ev.WorkerDied) and isinstance(started, ev.WorkerStarted)
        print(
            f"WorkerDied: worker {died.worker} (pid {died.pid}), exit status "
            f"{died.exit_status}, calls lost: {died.lost_calls}"
        )
        print(f"WorkerStarted: worker {started.worker} again, now pid {started.pid}")
        results = [await pool.call("add", i, 1) for i in range(8)]
        print("the pool goes on: add(i, 1) for i < 8 ->", results)
        stats = sup.statistics()
        print(f"statistics: workers_lost={stats.workers_lost}, completed={stats.completed}")


if __name__ == "__main__":
    anyio.run(main)
