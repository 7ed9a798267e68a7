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
