"""One front process of the scaling suite's "front processes" rows: its own
event loop and :class:`~hlasync.supervisor.Supervisor` with worker processes,
measured in rounds that start when the parent says so, side by side with the
other fronts (the way a service spreads over several processes, each with
its loop, to go past what one event loop can feed).

``python -m hlasync.bench._front_child PROCESSES HOT WINDOW ROUNDS BACKEND``:
prints ``ready`` once its pool answers, waits for ``go`` on stdin (ends at
once without it, and when the suite's process dies), runs
``ROUNDS + 1`` rounds of ``WINDOW`` seconds (the first warms up) and prints one
JSON line: ``{"rates": [...], "loop_cpu_ns": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import anyio

from .. import SandboxConfig, guests
from ..supervisor import Supervisor
from ._common import awaits_per_second

#: As in the scaling suite: sandboxes per worker process, tasks per sandbox.
SANDBOXES_PER_WORKER = 2
TASKS_PER_SANDBOX = 8


async def _front(processes: int, hot: bool, window: float, rounds: int) -> dict[str, object]:
    guest = guests.path("simpleguest")
    async with Supervisor(processes=processes, workers=1) as sup:
        size = processes * SANDBOXES_PER_WORKER
        pool = await sup.create_pool(guest, size=size, config=SandboxConfig(hot_restore=hot))
        assert await pool.call("add", 1, 2) == 3
        print("ready", flush=True)
        if (await anyio.to_thread.run_sync(sys.stdin.readline)).strip() != "go":
            raise SystemExit(2)  # the suite is gone (end of input): measure nothing
        rates: list[float] = []
        loop_cpu = 0.0
        for index in range(rounds + 1):
            before = time.thread_time()
            began = time.perf_counter()
            rate = await awaits_per_second(
                lambda: pool.call("add", 1, 2), size * TASKS_PER_SANDBOX, window
            )
            if index:
                rates.append(rate)
                loop_cpu += (time.thread_time() - before) / (rate * (time.perf_counter() - began))
        return {"rates": rates, "loop_cpu_ns": loop_cpu / rounds * 1e9}


def _end_with_parent() -> None:
    """Get SIGTERM when the suite's process dies (Linux ``PR_SET_PDEATHSIG``),
    so that a suite killed mid-run leaves no front measuring on its own."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl
        raise SystemExit(2)


def main(argv: list[str]) -> None:
    _end_with_parent()
    processes, hot, window, rounds, backend = argv
    result = anyio.run(
        _front, int(processes), hot == "1", float(window), int(rounds), backend=backend
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
