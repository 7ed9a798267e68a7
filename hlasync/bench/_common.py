"""Rows, statistics, timing helpers and the machine description."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import io
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

KiB = 1024
MiB = 1024 * KiB
US = 1_000
MS = 1_000_000

Unit = Literal["ns", "bytes", "count", "calls/s"]


@dataclass(frozen=True)
class Counts:
    """Samples (and warm-up rounds) per measurement."""

    calls: int
    call_warmup: int
    supervisor_calls: int
    creates: int
    restores: int
    instances: int
    forks: int
    fresh_warmup: int
    interrupts: int
    interrupt_warmup: int
    #: Seconds a runaway runs before its deadline.
    runaway_s: float
    hangs: int
    gcores: int
    hang_timeout_s: float
    sandboxes: int
    throughput_windows: int
    throughput_window_s: float
    js_calls: int
    js_pool_calls: int
    js_fib: int
    js_restores: int
    js_creates: int
    js_rss_sandboxes: int


QUICK = Counts(
    calls=500,
    call_warmup=100,
    supervisor_calls=300,
    creates=20,
    restores=50,
    instances=50,
    forks=20,
    fresh_warmup=3,
    interrupts=8,
    interrupt_warmup=1,
    runaway_s=0.010,
    hangs=3,
    gcores=2,
    hang_timeout_s=0.020,
    sandboxes=200,
    throughput_windows=3,
    throughput_window_s=0.25,
    js_calls=300,
    js_pool_calls=200,
    js_fib=5,
    js_restores=50,
    js_creates=10,
    js_rss_sandboxes=5,
)
FULL = Counts(
    calls=20_000,
    call_warmup=2_000,
    supervisor_calls=10_000,
    creates=300,
    restores=1_000,
    instances=1_000,
    forks=300,
    fresh_warmup=20,
    interrupts=200,
    interrupt_warmup=5,
    runaway_s=0.020,
    hangs=100,
    gcores=20,
    hang_timeout_s=0.020,
    sandboxes=1_000,
    throughput_windows=10,
    throughput_window_s=1.0,
    js_calls=5_000,
    js_pool_calls=3_000,
    js_fib=50,
    js_restores=1_000,
    js_creates=100,
    js_rss_sandboxes=50,
)


@dataclass(frozen=True)
class Category:
    key: str
    label: str
    unit: Unit


#: Table and plot order. Every category has one hlasync baseline row.
CATEGORIES: tuple[Category, ...] = (
    Category("call", "call latency of a trivial function", "ns"),
    Category("fresh", "fresh state", "ns"),
    Category("interrupt", "runaway interruption: deadline -> control back in Python", "ns"),
    Category("hang_time", "hang capture: deadline -> core a debugger opens", "ns"),
    Category("hang_bytes", "hang capture: core bytes on disk (st_blocks * 512)", "bytes"),
    Category("scale_alive", "sandboxes alive in one process", "count"),
    Category("scale_rss", "RSS per idle sandbox", "bytes"),
    Category("scale_throughput", "calls/s through the Supervisor", "calls/s"),
    Category("js_call", "JavaScript handler call, small JSON event", "ns"),
    Category("js_compute", "JavaScript compute: fib(25)", "ns"),
    Category("js_fresh", "fresh JavaScript state", "ns"),
    Category("js_throughput", "JavaScript handler calls/s through the Supervisor", "calls/s"),
    Category("js_rss", "RSS per loaded JavaScript sandbox", "bytes"),
)
CATEGORY_BY_KEY = {c.key: c for c in CATEGORIES}


@dataclass
class Row:
    """One measurement of one peer (or the reason it was skipped)."""

    category: str
    key: str
    peer: str
    label: str
    samples: list[float] = field(default_factory=list)
    #: The hlasync row the other rows of the category are divided by.
    baseline: bool = False
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> Unit:
        return CATEGORY_BY_KEY[self.category].unit

    @property
    def measured(self) -> bool:
        return self.skipped is None and bool(self.samples)

    def stats(self) -> dict[str, float]:
        return summarize(self.samples)


def skipped(category: str, key: str, peer: str, label: str, reason: str) -> Row:
    return Row(category, key, peer, label, skipped=reason)


@dataclass
class SuiteOutput:
    """What one suite of ``python -m hlasync.bench`` produced."""

    markdown: str  # the table, with the machine description above it
    document: dict[str, Any]  # raw samples and machine, for the JSON file
    seconds: float
    failed: list[str]  # checks that failed (the command exits 1)


class BenchError(RuntimeError):
    """A measurement went wrong (a wrong result, a missing exception): the run fails."""


# ------------------------------------------------------------------ helpers
def percentile(ordered: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile of already sorted samples."""
    if not ordered:
        raise ValueError("no samples")
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def summarize(samples: Iterable[float]) -> dict[str, float]:
    """Median, p90, p99, min, max and mean of samples in any order."""
    ordered = sorted(samples)
    return {
        "median": percentile(ordered, 50.0),
        "p90": percentile(ordered, 90.0),
        "p99": percentile(ordered, 99.0),
        "min": float(ordered[0]),
        "max": float(ordered[-1]),
        "mean": sum(ordered) / len(ordered),
    }


def format_ns(value: float) -> str:
    """Nanoseconds in ns, us, ms or s; a negative value (a difference) keeps its sign."""
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < US:
        return f"{sign}{value:.0f} ns"
    if value < MS:
        return f"{sign}{value / US:.2f} us"
    if value < 1000 * MS:
        return f"{sign}{value / MS:.3f} ms"
    return f"{sign}{value / (1000 * MS):.3f} s"


def format_bytes(value: float) -> str:
    if value < KiB:
        return f"{value:.0f} B"
    if value < MiB:
        return f"{value / KiB:.1f} KiB"
    return f"{value / MiB:.2f} MiB"


def format_value(value: float, unit: Unit) -> str:
    if unit == "ns":
        return format_ns(value)
    if unit == "bytes":
        return format_bytes(value)
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:,.0f}/s"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic GC out of the timed loop (as timeit does).

    Around a whole loop only: a full collection walks every object and leaves
    the caches cold, which doubled a 20 us restore timed right after it.
    Around one sample, use :func:`gc_off`.
    """
    gc.collect()
    with gc_off():
        yield


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """Keep the cyclic GC out of one timed sample (no collection first)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_calls(function: Callable[[], object], n: int, warmup: int) -> list[float]:
    """Run ``function`` ``warmup`` times, then time ``n`` calls one by one (ns)."""
    for _ in range(warmup):
        function()
    samples: list[float] = [0] * n
    clock = time.perf_counter_ns
    with gc_paused():
        for i in range(n):
            start = clock()
            function()
            samples[i] = clock() - start
    return samples


async def time_awaits(
    function: Callable[[], Awaitable[object]], n: int, warmup: int
) -> list[float]:
    """:func:`time_calls` for an async function: ``n`` awaits one by one (ns)."""
    for _ in range(warmup):
        await function()
    samples: list[float] = [0] * n
    clock = time.perf_counter_ns
    with gc_paused():
        for i in range(n):
            start = clock()
            await function()
            samples[i] = clock() - start
    return samples


async def awaits_per_second(
    function: Callable[[], Awaitable[object]], tasks: int, seconds: float
) -> float:
    """Awaits of ``function`` per second with ``tasks`` tasks awaiting it back
    to back for ``seconds``."""
    import anyio

    count = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal count
        while time.monotonic() < deadline:
            await function()
            count += 1

    began = time.monotonic()
    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(client)
    return count / (time.monotonic() - began)


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


def quiet_stderr() -> contextlib.redirect_stderr[io.TextIOBase]:
    """Drop the ``Core dump created: ...`` lines hlasync prints while dumping."""
    return contextlib.redirect_stderr(_Discard())


def allocated_bytes(path: Path) -> int:
    """Bytes a file occupies on disk (cores are sparse: not ``st_size``)."""
    return os.stat(path).st_blocks * 512


def _first_line(command: Sequence[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        proc = subprocess.run(
            list(command), capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0] if lines else None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The markdown header lines every benchmark report starts with."""
    return [
        f"- CPU: {machine['cpu']} ({machine['cpus']} logical CPUs)",
        f"- kernel: {machine['kernel']}",
        f"- Python: {machine['python']}",
        f"- KVM: {machine['kvm']}",
    ]


@dataclass(frozen=True)
class Target:
    """A goal for one statistic of a measurement (in the measurement's unit)."""

    statistic: str  # "median", "p90" or "p99"
    limit: float
    description: str
    at_least: bool = False  # True: the statistic must be >= limit (throughput)

    def met(self, stats: dict[str, float]) -> bool:
        value = stats[self.statistic]
        return value >= self.limit if self.at_least else value <= self.limit


def machine_description() -> dict[str, Any]:
    model = "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if flags & {"vmx", "svm"}:
        flavour = "hardware KVM (vmx/svm in /proc/cpuinfo flags)"
    else:
        flavour = "PVM (no vmx/svm in /proc/cpuinfo flags)"
    packages = {
        name: package_version(name)
        for name in ("hlasync", "wasmtime", "matplotlib", "psutil", "anyio")
    }
    return {
        "cpu": model,
        "cpus": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "kvm": flavour,
        "packages": packages,
        "tools": {
            "gcc": _first_line(["gcc", "--version"]),
            "gdb": _first_line(["gdb", "--version"]),
        },
    }


def call_back_to_back(sandboxes: Sequence[Any], seconds: float) -> tuple[int, float]:
    """One thread per sandbox, each calling ``add(1, 2)`` on its own sandbox
    back to back for ``seconds``: (calls made by all, seconds elapsed)."""
    done = [0] * len(sandboxes)
    stop = time.monotonic() + seconds

    def worker(index: int) -> None:
        sandbox, n = sandboxes[index], 0
        while time.monotonic() < stop:
            sandbox.call("add", 1, 2)
            n += 1
        done[index] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(sandboxes))]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done), time.perf_counter() - began
