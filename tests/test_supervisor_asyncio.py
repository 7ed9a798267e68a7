"""asyncio-native cancellation of supervised calls (pytest-asyncio)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hlasync.kvm import Kvm
from hlasync.supervisor import Supervisor


@pytest.mark.asyncio
@pytest.mark.usefixtures("supervisor_mode")
async def test_wait_for_and_task_cancel_stop_the_guest(kvm: Kvm, simpleguest: Path) -> None:
    async with Supervisor(workers=1) as sup:
        sb = await sup.create_sandbox(simpleguest)
        assert await sb.call("increment") == 1
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sb.call("spin"), timeout=0.2)
        assert await asyncio.wait_for(sb.call("increment"), timeout=5) == 1

        task = asyncio.create_task(sb.call("spin"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(sb.call("add", 2, 2), timeout=5) == 4
        assert sup.statistics().cancelled == 2


def _double(x: int) -> int:
    return 2 * x


async def _triple(x: int) -> int:
    await asyncio.sleep(0)
    return 3 * x


@pytest.mark.asyncio
async def test_worker_process_messages_are_handled_in_a_task(kvm: Kvm, simpleguest: Path) -> None:
    """Plain asyncio (no anyio.run, which tells sniffio the library for every
    callback): what a worker process's messages run here (host functions, the
    output callback) runs in a task, where sniffio and anyio work, never in
    a bare loop callback (host calls there were never answered)."""
    import sniffio

    seen: list[tuple[str, bool]] = []

    def output(text: str) -> None:
        seen.append((sniffio.current_async_library(), asyncio.current_task() is not None))

    async with asyncio.timeout(60), Supervisor(processes=1, workers=1) as sup:
        functions = {"double": _double, "triple": _triple}
        pool = await sup.create_pool(simpleguest, size=1, output=output, host_functions=functions)
        assert await pool.call("call_host", "double", 21, timeout=15) == 42
        assert await pool.call("call_host", "triple", 5, timeout=15) == 15
        await pool.call("print_message", "hello\n", timeout=15)
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [("asyncio", True)]
        assert sup.statistics().failed == 0
