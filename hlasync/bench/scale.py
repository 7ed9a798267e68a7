"""Scale: sandboxes alive in one process, RSS per idle sandbox, calls/s."""

from __future__ import annotations

import asyncio
import gc
import resource
import time
from pathlib import Path
from typing import Any

import psutil

from .. import HlasyncError, Sandbox, SandboxConfig, Supervisor
from ..sandbox import trim
from ._common import BenchError, Counts, Row

#: File descriptors one sandbox holds (its VM and its vCPU).
FDS_PER_SANDBOX = 2
#: The sandboxes' SandboxConfig.idle_trim (seconds; the default, 10, would
#: make the run 9 s longer).
IDLE_TRIM = 1.0


def _raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (as a user would); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def mem_available() -> int:
    """System-wide ``MemAvailable`` (bytes): also sees kernel memory that RSS does not."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("no MemAvailable in /proc/meminfo")


def bench_alive(guest: Path, counts: Counts) -> list[Row]:
    """Create up to ``counts.sandboxes`` idle sandboxes, recording RSS on the way."""
    process = psutil.Process()
    soft, _ = _raise_fd_limit(process.num_fds() + FDS_PER_SANDBOX * counts.sandboxes + 256)
    Sandbox(guest).close()  # the per-process template exists from here on
    config = SandboxConfig(idle_trim=IDLE_TRIM)
    gc.collect()
    base_rss = process.memory_info().rss
    base_available = mem_available()
    step = max(1, counts.sandboxes // 25)
    curve: list[tuple[int, int, int]] = [(0, base_rss, base_available)]
    sandboxes: list[Sandbox] = []
    stopped_by: str | None = None
    started = time.perf_counter()
    try:
        for i in range(counts.sandboxes):
            try:
                sandboxes.append(Sandbox(guest, config))
            except (HlasyncError, OSError) as exc:
                stopped_by = f"{type(exc).__name__}: {exc}"
                break
            if (i + 1) % step == 0:
                curve.append((i + 1, process.memory_info().rss, mem_available()))
        alive = len(sandboxes)
        if curve[-1][0] != alive:
            curve.append((alive, process.memory_info().rss, mem_available()))
        create_s = time.perf_counter() - started
        idle_rss, idle_available = curve[-1][1], curve[-1][2]
        for i, sb in enumerate(sandboxes):  # all of them answer
            if sb.call("add", i, 1) != i + 1:
                raise BenchError(f"sandbox {i} of {alive} gave a wrong sum")
        called_rss = process.memory_info().rss
        # Idle from here: after idle_trim, each stops mapping the template
        # pages its guest only read (docs/architecture.md, "Idle trim").
        deadline = time.monotonic() + IDLE_TRIM + 10.0
        time.sleep(IDLE_TRIM)
        while trim.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        trimmed_rss = process.memory_info().rss
    finally:
        for sb in sandboxes:
            sb.close()
    if alive == 0:
        raise BenchError(f"no sandbox could be created: {stopped_by}")
    extra: dict[str, Any] = {
        "requested": counts.sandboxes,
        "stopped_by": stopped_by,
        "fd_soft_limit": soft,
        "create_seconds": create_s,
        "base_rss_bytes": base_rss,
        "base_mem_available_bytes": base_available,
        "curve": [
            {"sandboxes": n, "rss_bytes": rss, "mem_available_bytes": available}
            for n, rss, available in curve
        ],
        "rss_after_one_call_each_bytes": called_rss,
        "rss_idle_after_idle_trim_bytes": trimmed_rss,
    }
    alive_row = Row(
        "scale_alive",
        "scale_alive.hlasync",
        "hlasync",
        f"Sandbox objects alive at once (asked for {counts.sandboxes}), each then called once",
        [alive],
        baseline=True,
        extra=extra,
    )
    alive_row.notes.append(
        "limit reached: " + stopped_by if stopped_by else f"all {alive} created and called"
    )
    per_sandbox = (idle_rss - base_rss) / alive
    rss_row = Row(
        "scale_rss",
        "scale_rss.hlasync",
        "hlasync",
        f"(RSS with {alive} idle sandboxes - RSS before) / {alive}",
        [per_sandbox],
        baseline=True,
        extra={
            "after_one_call_each_per_sandbox_bytes": (called_rss - base_rss) / alive,
            "idle_after_idle_trim_per_sandbox_bytes": (trimmed_rss - base_rss) / alive,
        },
    )
    system = (base_available - idle_available) / alive
    rss_row.extra["mem_available_drop_per_sandbox_bytes"] = system
    rss_row.notes.append(
        f"after one call each: {(called_rss - base_rss) / alive / 1024:.0f} KiB per sandbox, "
        f"idle since (idle_trim={IDLE_TRIM:g} s): {(trimmed_rss - base_rss) / alive / 1024:.0f} "
        "KiB; "
        f"drop of system MemAvailable (kernel memory too, noisy): {system / 1024:.0f} KiB "
        "per idle sandbox"
    )
    return [alive_row, rss_row]


async def _throughput(guest: Path, workers: int, counts: Counts) -> list[float]:
    """calls/s of ``4 * workers`` tasks calling a pool, per window of time."""
    async with Supervisor(workers=workers) as sup:
        pool = await sup.create_pool(guest, size=workers)
        done = 0
        stop = False

        async def caller() -> None:
            nonlocal done
            while not stop:
                if await pool.call("add", 1, 2) != 3:
                    raise BenchError("pool.call('add', 1, 2) != 3")
                done += 1

        window = counts.throughput_window_s
        samples: list[float] = []
        async with asyncio.TaskGroup() as group:
            for _ in range(4 * workers):
                group.create_task(caller())
            await asyncio.sleep(window)  # warm-up window
            for _ in range(counts.throughput_windows):
                before, started = done, time.perf_counter()
                await asyncio.sleep(window)
                samples.append((done - before) / (time.perf_counter() - started))
            stop = True
    return samples


def bench_throughput(guest: Path, counts: Counts) -> list[Row]:
    rows: list[Row] = []
    for workers in (1, 2):
        samples = asyncio.run(_throughput(guest, workers, counts))
        rows.append(
            Row(
                "scale_throughput",
                f"scale_throughput.hlasync_{workers}",
                "hlasync Supervisor",
                f"{workers} worker{'s' if workers > 1 else ''}, pool of {workers}, "
                f"{4 * workers} concurrent tasks calling add",
                samples,
                baseline=workers == 1,
            )
        )
    return rows


def run(guest: Path, counts: Counts) -> list[Row]:
    return bench_alive(guest, counts) + bench_throughput(guest, counts)
