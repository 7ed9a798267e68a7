"""Call latency of a trivial function: ``add(1, 2)`` through each peer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from .. import Sandbox, Supervisor
from . import _wasm
from ._child import PipeWorker
from ._common import (
    BenchError,
    Counts,
    Row,
    format_ns,
    percentile,
    skipped,
    time_awaits,
    time_calls,
)

CATEGORY = "call"


def bench_sandbox_call(guest: Path, counts: Counts) -> Row:
    with Sandbox(guest) as sb:
        if sb.call("add", 1, 2) != 3:
            raise BenchError("Sandbox.call('add', 1, 2) != 3")
        samples = time_calls(lambda: sb.call("add", 1, 2), counts.calls, counts.call_warmup)
    label = 'Sandbox.call("add", 1, 2), back to back (the default spin="auto": the doorbell)'
    return Row(CATEGORY, "call.hlasync", "hlasync", label, samples, baseline=True)


async def _supervisor_samples(guest: Path, n: int, warmup: int) -> list[float]:
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(guest, size=1)
        if await pool.call("add", 1, 2) != 3:
            raise BenchError("pool.call('add', 1, 2) != 3")
        return await time_awaits(lambda: pool.call("add", 1, 2), n, warmup)


def bench_supervisor_call(guest: Path, counts: Counts) -> Row:
    samples = asyncio.run(_supervisor_samples(guest, counts.supervisor_calls, counts.call_warmup))
    return Row(
        CATEGORY,
        "call.hlasync_supervisor",
        "hlasync Supervisor",
        'await pool.call("add", 1, 2) (1 worker, pool of 1, restore after each call)',
        samples,
    )


def bench_wasmtime_call(counts: Counts) -> Row:
    key, peer, label = "call.wasmtime", "wasmtime", "exported add(i32, i32) called from Python"
    reason = _wasm.missing()
    if reason is not None:
        return skipped(CATEGORY, key, peer, label, reason)
    import wasmtime  # type: ignore[import-not-found, unused-ignore]

    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, _wasm.WAT)
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, module, [])
    add = instance.exports(store)["add"]
    assert isinstance(add, wasmtime.Func)
    if add(store, 1, 2) != 3:
        raise BenchError("wasmtime add(1, 2) != 3")
    samples = time_calls(lambda: add(store, 1, 2), counts.calls, counts.call_warmup)
    return Row(CATEGORY, key, peer, label, samples)


def bench_pipe_call(counts: Counts) -> Row:
    worker = PipeWorker()
    pinned: list[float] = []
    try:
        if worker.add(1, 2) != 3:
            raise BenchError("pipe worker: 1 + 2 != 3")
        samples = time_calls(lambda: worker.add(1, 2), counts.calls, counts.call_warmup)
        # The same with both processes on one CPU: no cross-CPU wake-up per message.
        allowed = os.sched_getaffinity(0)
        if len(allowed) > 1:
            cpu = {min(allowed)}
            try:
                os.sched_setaffinity(0, cpu)
                os.sched_setaffinity(worker.proc.pid, cpu)
                pinned = time_calls(
                    lambda: worker.add(1, 2), max(1, counts.calls // 4), counts.call_warmup
                )
            finally:
                os.sched_setaffinity(0, allowed)
        if worker.add(2, 3) != 5:
            raise BenchError("pipe worker: 2 + 3 != 5")
    finally:
        worker.close()
    row = Row(
        CATEGORY,
        "call.child_process",
        "child process",
        "request/response over pipes to a long-lived Python worker",
        samples,
        extra={"same_cpu_samples_ns": pinned},
    )
    if pinned:
        row.notes.append(
            f"both pinned to one CPU: median {format_ns(percentile(sorted(pinned), 50.0))}"
        )
    return row


def run(guest: Path, counts: Counts) -> list[Row]:
    return [
        bench_sandbox_call(guest, counts),
        bench_supervisor_call(guest, counts),
        bench_wasmtime_call(counts),
        bench_pipe_call(counts),
    ]
