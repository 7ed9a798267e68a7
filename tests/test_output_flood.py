"""A guest that prints a flood of lines, and an output callback slower than
the guest: the event loop keeps serving its other tasks between the lines, it
is never held for a whole read's worth of them."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from hlasync.kvm import Kvm
from hlasync.supervisor import Supervisor
from hlasync.supervisor.proc_dispatch import MESSAGES_PER_TURN

pytestmark = pytest.mark.anyio

LINES = 3000


async def test_a_slow_output_callback_does_not_hold_the_loop_for_a_flood(
    kvm: Kvm, hostile_guest: Path
) -> None:
    """Worker processes (threads call ``output`` on the vCPU thread: the loop is
    not in it)."""
    ticks = 0
    seen: list[int] = []

    def output(text: str) -> None:
        seen.append(ticks)
        time.sleep(0.0002)  # slower than the guest prints

    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(hostile_guest, size=1, output=output)
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await pool.call("flood_print", LINES)
            with anyio.fail_after(60):
                while len(seen) < LINES:
                    await anyio.sleep(0.01)
            done = True
    assert len(seen) == LINES
    # The ticker ran between every MESSAGES_PER_TURN lines (trio runs the tasks
    # ready in one batch in random order: two turns may go by back to back).
    runs = _runs(seen)
    assert max(runs) <= 2 * MESSAGES_PER_TURN, (max(runs), len(runs))


def _runs(seen: list[int]) -> list[int]:
    """Lengths of the runs of lines printed with no tick between them."""
    runs: list[int] = []
    last = None
    for tick in seen:
        if tick == last:
            runs[-1] += 1
        else:
            runs.append(1)
            last = tick
    return runs
