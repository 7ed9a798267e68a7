"""What crossing Ray costs: the same pool through ``Supervisor(processes=N)``
(worker processes on this machine, a socketpair each) and through
``RaySupervisor(actors=N)`` (Ray actors on a one-node local Ray instance
that offers the ``kvm`` resource), in alternating rounds of one run.

Rows: the p50 of one ``await pool.call("add", 1, 2)`` at a time, and calls/s
with many calls in flight (the channel then batches the messages of many
calls into one frame, and one Ray call carries each frame).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from .. import guests
from ..supervisor import Supervisor
from ._common import (
    SuiteOutput,
    awaits_per_second,
    format_ns,
    machine_lines,
    time_awaits,
)

__all__ = ["suite"]

LOCAL, RAY = "worker processes", "Ray actors"
#: Worker processes (or actors), and calls in flight for the throughput rows.
WORKERS = 2
IN_FLIGHT = 64


def _ray_available() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (python -m pip install -e '.[ray]' in a checkout of hlasync)"
    return None


async def _measure(
    make: Callable[[], Supervisor], guest: Path, calls: int, window: float
) -> tuple[list[float], float]:
    """Latencies of sequential calls (ns) and calls/s with IN_FLIGHT tasks."""
    async with make() as sup:
        pool = await sup.create_pool(guest, size=WORKERS * 2)
        samples = await time_awaits(lambda: pool.call("add", 1, 2), calls, 50)
        rate = await awaits_per_second(lambda: pool.call("add", 1, 2), IN_FLIGHT, window)
        return samples, rate


def suite(quick: bool, machine: dict[str, Any], backend: str) -> SuiteOutput:
    started = time.perf_counter()
    mode = "quick (smoke test, not for quoting)" if quick else "full"
    missing = _ray_available()
    if missing is not None:
        text = f"## hlasync across Ray\n\nskipped: {missing}"
        return SuiteOutput(text, {"skipped": missing}, time.perf_counter() - started, [])
    import ray

    from ..ray import KVM_RESOURCE, RaySupervisor

    guest = guests.path("simpleguest")
    rounds, calls, window = (2, 100, 0.3) if quick else (5, 1000, 1.0)
    temp = tempfile.mkdtemp(prefix="hlray-", dir="/tmp")  # Ray's socket paths stay short
    ray.init(
        resources={KVM_RESOURCE: WORKERS},
        num_cpus=max(os.cpu_count() or 1, 1),
        include_dashboard=False,
        object_store_memory=100 << 20,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=temp,
    )
    makers: dict[str, Callable[[], Supervisor]] = {
        LOCAL: lambda: Supervisor(processes=WORKERS, workers=1),
        RAY: lambda: RaySupervisor(actors=WORKERS, workers=1),
    }
    latencies: dict[str, list[float]] = {name: [] for name in makers}
    rates: dict[str, list[float]] = {name: [] for name in makers}
    try:
        for _ in range(rounds):
            for name, make in makers.items():
                samples, per_second = anyio.run(
                    _measure, make, guest, calls, window, backend=backend
                )
                latencies[name] += samples
                rates[name].append(per_second)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    wall = time.perf_counter() - started
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    rate = {name: statistics.median(values) for name, values in rates.items()}
    lines = [
        "## hlasync across Ray: the same pool through worker processes and through Ray actors",
        "",
        *machine_lines(machine),
        f"- mode: {mode}; {WORKERS} workers of 1 vCPU thread, a pool of {WORKERS * 2}; "
        f"Ray {ray.__version__}, one local node",
        "",
        f"| measurement | {LOCAL} | {RAY} | Ray / processes |",
        "|---|---:|---:|---:|",
        f'| `await pool.call("add", 1, 2)`, one at a time, p50 | {format_ns(p50[LOCAL])} '
        f"| {format_ns(p50[RAY])} | {p50[RAY] / p50[LOCAL]:.2f}x |",
        f"| calls/s, {IN_FLIGHT} calls in flight (batched) | {rate[LOCAL]:,.0f} "
        f"| {rate[RAY]:,.0f} | {rate[RAY] / rate[LOCAL]:.2f}x |",
        "",
        f"Crossing Ray adds {format_ns(p50[RAY] - p50[LOCAL])} to a call made alone (two Ray "
        "calls: the request's frame out, the answer's back).",
    ]
    document = {
        "machine": machine,
        "mode": "quick" if quick else "full",
        "wall_seconds": wall,
        "ray_version": ray.__version__,
        "latency_samples_ns": latencies,
        "rates": rates,
    }
    return SuiteOutput("\n".join(lines), document, wall, [])
