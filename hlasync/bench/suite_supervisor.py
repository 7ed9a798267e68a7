"""Async supervisor benchmarks: pool call latency, throughput, watchdog
timeouts, and what hlasync's OpenTelemetry instrumentation costs a pool call.

The ``supervisor`` suite of ``python -m hlasync.bench`` (``python -m
hlasync.bench supervisor``).

Prints the machine description and a markdown table (median, p90, p99, n,
target, met) and writes every raw sample to ``supervisor.json``. ``--quick``
takes few samples and is a smoke test only; numbers worth quoting come from
the full mode.

Measurements that are compared with each other (supervised and synchronous
calls; 2 and 1 workers; instrumentation off, on without an SDK, on with an
SDK recording) run in the same process, interleaved in rounds, so that
machine noise that comes and goes between minutes hits them alike.

Timed-out calls write their core dumps to a fresh temporary directory (through
``HYPERLIGHT_CORE_DUMP_DIR``, restored afterwards) that is deleted at the end;
each dump is checked and deleted as soon as its exception is caught. The
``Core dump created: ...`` line each dump prints to stderr is discarded.

The exit status is non-zero only when something fails, never because a target
was missed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

import hlasync.guests
from hlasync import GuestTimeout, Sandbox, SandboxConfig, _telemetry
from hlasync.crashdump.placement import DUMP_DIR_ENV, DUMP_GLOB
from hlasync.supervisor import Pool, Supervisor, SupervisorStatistics, loop_waker

from ._common import (
    MS,
    US,
    SuiteOutput,
    Target,
    format_ns,
    gc_off,
    gc_paused,
    machine_lines,
    package_version,
    percentile,
    quiet_stderr,
    summarize,
)

#: Sandboxes in the pool of the latency and throughput measurements.
POOL_SIZE = 4
#: Sandboxes in the pool of the timeout measurement (default 8 MiB config).
TIMEOUT_POOL_SIZE = 2
#: The wall-clock ``timeout`` of every ``spin()`` call.
SPIN_TIMEOUT_S = 0.05
#: Untimed pause between timeouts, so the stopped sandbox is restored and the
#: supervisor is idle when the next call is submitted.
TIMEOUT_GAP_S = 0.005

Unit = Literal["ns", "calls/s"]
BACKENDS = ("asyncio", "trio")


@dataclass(frozen=True)
class Counts:
    """Samples (and warm-up) per measurement."""

    seq_calls: int  # per side (supervised, sync), split evenly over seq_rounds
    seq_rounds: int
    seq_warmup: int
    tp_rounds: int  # per worker count
    tp_calls: int  # calls per round
    tp_tasks: int  # concurrent tasks per round
    tp_warmup: int  # calls of one untimed round per worker count
    timeouts: int
    timeout_warmup: int
    otel_calls: int  # per instrumentation mode, split evenly over otel_rounds
    otel_rounds: int
    otel_warmup: int  # untimed calls per mode before the first round


QUICK = Counts(
    seq_calls=300,
    seq_rounds=3,
    seq_warmup=100,
    tp_rounds=2,
    tp_calls=2_000,
    tp_tasks=64,
    tp_warmup=500,
    timeouts=10,
    timeout_warmup=1,
    otel_calls=300,
    otel_rounds=3,
    otel_warmup=50,
)
FULL = Counts(
    seq_calls=5_000,
    seq_rounds=10,
    seq_warmup=1_000,
    tp_rounds=7,
    tp_calls=10_000,
    tp_tasks=64,
    tp_warmup=2_000,
    timeouts=100,
    timeout_warmup=3,
    otel_calls=6_000,
    otel_rounds=20,
    otel_warmup=500,
)

#: The instrumentation modes of the overhead measurement: (key, label).
OTEL_MODES = (
    ("otel_off", "instrumentation off"),
    ("otel_no_sdk", "instrumentation on, no SDK configured"),
    ("otel_sdk", "instrumentation on, SDK recording (in-memory exporter and reader)"),
)
#: The most each mode may cost over "off" (ratio of medians): issue 20's targets.
OTEL_TARGETS = {"otel_no_sdk": 1.02, "otel_sdk": 1.15}
OTEL_RATIO_LABELS = {
    "otel_no_sdk": "instrumentation on, no SDK / off (ratio of medians)",
    "otel_sdk": "instrumentation on, SDK recording / off (ratio of medians)",
}


@dataclass
class Result:
    key: str
    label: str
    samples: Sequence[float]  # ns per sample, or calls/s per round
    unit: Unit = "ns"
    target: Target | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more JSON fields

    def stats(self) -> dict[str, float]:
        return summarize(self.samples)


@dataclass(frozen=True)
class Ratio:
    """The ratio of two measurements' medians (``numerator / denominator``)."""

    key: str
    label: str
    numerator: str
    denominator: str
    #: The same ratio for each interleaved round (medians within the round).
    per_round: list[float]
    #: The row of the table it is printed under.
    after: str = "sync_add_restore"
    #: The most the ratio may be (None: no target).
    at_most: float | None = None
    #: The target as the table says it (default: an overhead over the denominator).
    target_text: str | None = None

    def value(self, by_key: dict[str, Result]) -> float:
        return by_key[self.numerator].stats()["median"] / by_key[self.denominator].stats()["median"]

    def evaluate(self, by_key: dict[str, Result]) -> tuple[str, str]:
        """(target text, met text), as :func:`evaluate` for a row."""
        if self.at_most is None:
            return "-", "-"
        got = self.value(by_key)
        overhead = round((self.at_most - 1) * 100)
        text = self.target_text or f"<= {self.at_most:.2f}x off (+{overhead} %)"
        return text, "yes" if got <= self.at_most else "no"


@dataclass
class Report:
    results: list[Result]
    ratios: list[Ratio]
    statistics: dict[str, SupervisorStatistics]
    #: Lines printed below the table (a measurement left out, and why).
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ helpers
def median(samples: Sequence[float]) -> float:
    return percentile(sorted(samples), 50.0)


def format_rate(value: float) -> str:
    return f"{value:,.0f} calls/s"


@contextlib.contextmanager
def dump_dir(directory: Path) -> Iterator[None]:
    """Point ``HYPERLIGHT_CORE_DUMP_DIR`` at ``directory``; restore it afterwards."""
    previous = os.environ.get(DUMP_DIR_ENV)
    os.environ[DUMP_DIR_ENV] = str(directory)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DUMP_DIR_ENV, None)
        else:
            os.environ[DUMP_DIR_ENV] = previous


async def expect_add(pool: Pool, when: str) -> None:
    value = await pool.call("add", 1, 2)
    if value != 3:
        raise RuntimeError(f"pool add(1, 2) gave {value!r} {when}")


def expect_sync_add(sb: Sandbox, when: str) -> None:
    value = sb.call("add", 1, 2)
    if value != 3:
        raise RuntimeError(f"Sandbox add(1, 2) gave {value!r} {when}")
    sb.restore()


# ------------------------------------------------------------- measurements
#: Before each timed side of the latency rounds: a pause longer than the hot
#: budget's window for other threads' calls (no sandbox spins within 20 ms of
#: a call of another thread, :data:`hlasync.sandbox.hot.OTHER_CALLERS_WINDOW`),
#: then this many untimed calls, so that each side runs as it would alone.
SIDE_PAUSE_S = 0.03
SIDE_WARMUP = 10


async def _settle_pool(pool: Pool) -> None:
    await anyio.sleep(SIDE_PAUSE_S)
    for _ in range(SIDE_WARMUP):
        await expect_add(pool, "before a timed side")


async def _settle_sync(sb: Sandbox) -> None:
    await anyio.sleep(SIDE_PAUSE_S)
    for _ in range(SIDE_WARMUP):
        expect_sync_add(sb, "before a timed side")


async def _time_pool_adds(pool: Pool, n: int, *, settle: bool = False) -> list[int]:
    if settle:
        await _settle_pool(pool)
    samples = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        start = clock()
        value = await pool.call("add", 1, 2)
        samples[i] = clock() - start
        if value != 3:
            raise RuntimeError(f"pool add(1, 2) gave {value!r}")
    return samples


def _time_sync_adds(sb: Sandbox, n: int) -> list[int]:
    """``Sandbox.call("add", 1, 2)`` then ``restore()``: the work a pool does per call."""
    samples = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        start = clock()
        value = sb.call("add", 1, 2)
        sb.restore()
        samples[i] = clock() - start
        if value != 3:
            raise RuntimeError(f"Sandbox add(1, 2) gave {value!r}")
    return samples


async def _time_handoffs(n: int) -> list[int]:
    """The floor under any supervised call: event loop -> thread -> event loop with
    no guest at all, through the primitives the supervisor uses (a Condition to
    wake the thread, ``call_soon_threadsafe``/``run_sync_soon`` back, an anyio Event)."""
    waker = loop_waker()
    condition = threading.Condition()
    inbox: list[anyio.Event | None] = []

    def thread_main() -> None:
        while True:
            with condition:
                while not inbox:
                    condition.wait()
                event = inbox.pop()
            if event is None:
                return
            waker.soon(event.set)

    thread = threading.Thread(target=thread_main, name="handoff-floor")
    thread.start()
    samples = [0] * n
    clock = time.perf_counter_ns
    try:
        for i in range(n):
            event = anyio.Event()
            start = clock()
            with condition:
                inbox.append(event)
                condition.notify()
            await event.wait()
            samples[i] = clock() - start
    finally:
        with condition:
            inbox.append(None)
            condition.notify()
        thread.join()
    return samples


async def bench_latency(
    pool: Pool, hot_pool: Pool, guest: Path, counts: Counts
) -> tuple[list[Result], list[Ratio]]:
    """Sequential calls through a pool and a hot pool (``hot_restore``), and
    synchronous call+restore on the exit path and in place, interleaved in
    rounds.

    The synchronous sandboxes run on the event loop thread, which blocks the
    loop; the supervisor is idle meanwhile (its workers wait for calls).
    """
    supervised: list[int] = []
    hot: list[int] = []
    sync: list[int] = []
    sync_hot: list[int] = []
    handoffs: list[int] = []
    per_round: list[float] = []
    hot_rounds: list[float] = []
    hot_over_exit: list[float] = []
    per_side = max(1, counts.seq_calls // counts.seq_rounds)
    with Sandbox(guest) as sb, Sandbox(guest, SandboxConfig(hot_restore=True)) as hot_sb:
        for _ in range(counts.seq_warmup):
            await expect_add(pool, "during warm-up")
            await expect_add(hot_pool, "during warm-up")
            expect_sync_add(sb, "during warm-up")
            expect_sync_add(hot_sb, "during warm-up")
        for round_ in range(counts.seq_rounds):
            with gc_paused():
                # Alternate which goes first so neither always runs on a warmer cache.
                if round_ % 2:
                    await _settle_sync(sb)
                    s = _time_sync_adds(sb, per_side)
                    h = await _time_pool_adds(hot_pool, per_side, settle=True)
                    a = await _time_pool_adds(pool, per_side, settle=True)
                    await _settle_sync(hot_sb)
                    sh = _time_sync_adds(hot_sb, per_side)
                else:
                    await _settle_sync(hot_sb)
                    sh = _time_sync_adds(hot_sb, per_side)
                    a = await _time_pool_adds(pool, per_side, settle=True)
                    h = await _time_pool_adds(hot_pool, per_side, settle=True)
                    await _settle_sync(sb)
                    s = _time_sync_adds(sb, per_side)
            supervised.extend(a)
            hot.extend(h)
            sync.extend(s)
            sync_hot.extend(sh)
            handoffs.extend(await _time_handoffs(per_side))
            per_round.append(median(a) / median(s))
            hot_rounds.append(median(h) / median(s))
            hot_over_exit.append(median(h) / median(a))
    results = [
        Result(
            "pool_add",
            'async add through a pool: await pool.call("add", 1, 2)',
            supervised,
            target=Target("median", 80 * US, "p50 <= 80 us"),
            extra={"pool_size": POOL_SIZE, "workers": 2},
        ),
        Result(
            "hot_pool_add",
            "async add through a hot pool (SandboxConfig(hot_restore=True)): "
            'await pool.call("add", 1, 2)',
            hot,
            extra={"pool_size": POOL_SIZE, "workers": 2},
        ),
        Result(
            "sync_add_restore",
            'sync baseline: Sandbox.call("add", 1, 2) + restore()',
            sync,
        ),
        Result(
            "sync_add_restore_in_place",
            'sync, hot_restore: Sandbox.call("add", 1, 2) + restore() in place',
            sync_hot,
        ),
        Result(
            "loop_thread_handoff",
            "floor: event loop -> thread -> event loop round trip, no guest",
            handoffs,
        ),
    ]
    ratios = [
        Ratio(
            "pool_add_over_sync",
            "supervised / sync call+restore (ratio of medians)",
            "pool_add",
            "sync_add_restore",
            per_round,
        ),
        Ratio(
            "hot_pool_add_over_sync",
            "hot pool / sync call+restore (ratio of medians)",
            "hot_pool_add",
            "sync_add_restore",
            hot_rounds,
            at_most=1.3,
            target_text="<= 1.30x",
        ),
        Ratio(
            "hot_pool_add_over_pool_add",
            "hot pool / pool (ratio of medians)",
            "hot_pool_add",
            "pool_add",
            hot_over_exit,
            at_most=0.5,
            target_text="<= 0.50x",
        ),
    ]
    return results, ratios


# ------------------------------------------------- instrumentation overhead
#: Untimed calls after each switch of mode (the first span or metric of a
#: mode makes its tracer and instruments).
OTEL_SWITCH_WARMUP = 10


@dataclass
class OtelSdk:
    """An OpenTelemetry SDK recording in memory, given to hlasync alone."""

    tracer_provider: Any
    meter_provider: Any
    spans: Any  # its InMemorySpanExporter


def otel_sdk() -> OtelSdk | None:
    """A fresh SDK, or None without opentelemetry-sdk (the ``otel`` extra)."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return OtelSdk(tracer_provider, meter_provider, spans)


def global_sdk_set() -> bool:
    """Whether OpenTelemetry's global providers are real ones (then the "no
    SDK" mode records to them)."""
    api = _telemetry._api()
    if api is None:
        return False
    providers = (api.trace.get_tracer_provider(), api.metrics.get_meter_provider())
    return not all(isinstance(provider, api.proxies) for provider in providers)


@contextlib.contextmanager
def telemetry_restored() -> Iterator[None]:
    """Put hlasync's instrumentation settings back as they were found."""
    enabled = _telemetry.enabled()
    tracer_provider, meter_provider = _telemetry._tracer_provider, _telemetry._meter_provider
    try:
        yield
    finally:
        _telemetry.configure(
            enabled=enabled, tracer_provider=tracer_provider, meter_provider=meter_provider
        )


async def bench_instrumentation(
    pool: Pool, counts: Counts
) -> tuple[list[Result], list[Ratio], list[str]]:
    """Sequential pool ``add`` calls with hlasync's instrumentation off, on with
    no SDK configured, and on with an SDK recording to memory: blocks of
    each mode in turn, in rounds (which mode goes first rotates)."""
    sdk = otel_sdk()
    if sdk is None:
        return [], [], ["- instrumentation overhead: not measured, opentelemetry-sdk is missing"]
    modes = [key for key, _ in OTEL_MODES]
    switch: dict[str, Callable[[], None]] = {
        "otel_off": lambda: _telemetry.configure(
            enabled=False, tracer_provider=None, meter_provider=None
        ),
        "otel_no_sdk": lambda: _telemetry.configure(
            enabled=True, tracer_provider=None, meter_provider=None
        ),
        "otel_sdk": lambda: _telemetry.configure(
            enabled=True, tracer_provider=sdk.tracer_provider, meter_provider=sdk.meter_provider
        ),
    }
    samples: dict[str, list[int]] = {key: [] for key in modes}
    round_medians: dict[str, list[float]] = {key: [] for key in modes}
    per_mode = max(1, counts.otel_calls // counts.otel_rounds)
    global_sdk = global_sdk_set()
    recorded = 0  # spans the SDK mode's calls made
    try:
        with telemetry_restored():
            for key in modes:
                switch[key]()
                for _ in range(counts.otel_warmup):
                    await expect_add(pool, f"during warm-up ({key})")
            # Round -1 is timed like the others and thrown away: the first
            # timed block after the warm-up came out up to 1.7x slower here.
            for round_ in range(-1, counts.otel_rounds):
                sdk.spans.clear()  # memory stays flat over the rounds
                shift = round_ % len(modes)
                for key in modes[shift:] + modes[:shift]:
                    switch[key]()
                    for _ in range(OTEL_SWITCH_WARMUP):
                        await expect_add(pool, f"after switching to {key}")
                    with gc_paused():
                        got = await _time_pool_adds(pool, per_mode)
                    if round_ >= 0:
                        samples[key].extend(got)
                        round_medians[key].append(median(got))
                if round_ >= 0:
                    recorded += len(sdk.spans.get_finished_spans())
    finally:
        sdk.tracer_provider.shutdown()
        sdk.meter_provider.shutdown()
    expected = counts.otel_rounds * (per_mode + OTEL_SWITCH_WARMUP)
    if recorded != expected:
        raise RuntimeError(f"the SDK mode recorded {recorded} spans, expected {expected}")
    labels = dict(OTEL_MODES)
    if global_sdk:
        labels["otel_no_sdk"] += " (a global SDK is set: it records)"
    results = [
        Result(
            key,
            f'instrumentation overhead: await pool.call("add", 1, 2), {labels[key]}',
            samples[key],
            extra={"pool_size": POOL_SIZE, "workers": 2, "global_sdk_set": global_sdk},
        )
        for key in modes
    ]
    ratios = [
        Ratio(
            f"{key}_over_off",
            OTEL_RATIO_LABELS[key],
            key,
            "otel_off",
            [a / b for a, b in zip(round_medians[key], round_medians["otel_off"], strict=True)],
            after=key,
            at_most=OTEL_TARGETS[key],
        )
        for key in ("otel_no_sdk", "otel_sdk")
    ]
    return results, ratios, []


async def _throughput_round(pool: Pool, calls: int, tasks: int) -> tuple[float, float]:
    """``tasks`` tasks make ``calls`` pool calls in all; (calls/s, wall seconds)."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            value = await pool.call("add", 1, 2)
            if value != 3:
                raise RuntimeError(f"pool add(1, 2) gave {value!r}")

    start = time.perf_counter_ns()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    wall_s = (time.perf_counter_ns() - start) / 1e9
    return calls / wall_s, wall_s


async def bench_throughput(pools: dict[int, Pool], counts: Counts) -> list[Result]:
    """Rounds of concurrent calls, alternating between the supervisors (by worker count)."""
    rates: dict[int, list[float]] = {w: [] for w in pools}
    walls: dict[int, list[float]] = {w: [] for w in pools}
    for pool in pools.values():
        await _throughput_round(pool, counts.tp_warmup, counts.tp_tasks)
    order = list(pools)
    for round_ in range(counts.tp_rounds):
        for workers in order if round_ % 2 == 0 else order[::-1]:
            with gc_paused():
                rate, wall_s = await _throughput_round(
                    pools[workers], counts.tp_calls, counts.tp_tasks
                )
            rates[workers].append(rate)
            walls[workers].append(wall_s)
    results: list[Result] = []
    for workers in order:
        results.append(
            Result(
                f"throughput_{workers}w",
                f"throughput, {workers} worker{'s' if workers > 1 else ''} "
                f"({counts.tp_tasks} tasks, pool of {POOL_SIZE})",
                rates[workers],
                unit="calls/s",
                target=(
                    Target("median", 15_000, ">= 15,000 calls/s (median)", at_least=True)
                    if workers == 2
                    else None
                ),
                extra={
                    "workers": workers,
                    "pool_size": POOL_SIZE,
                    "tasks": counts.tp_tasks,
                    "calls_per_round": counts.tp_calls,
                    "round_wall_s": walls[workers],
                },
            )
        )
    return results


async def bench_timeouts(
    sup: Supervisor, guest: Path, directory: Path, counts: Counts
) -> list[Result]:
    """``spin`` with ``timeout=0.05`` until ``GuestTimeout``; the dump goes to ``directory``."""
    pool = await sup.create_pool(guest, size=TIMEOUT_POOL_SIZE)  # default 8 MiB config
    await expect_add(pool, "before the timeouts")
    latencies: list[int] = []
    lateness: list[int] = []
    clock = time.perf_counter_ns
    timeout_ns = round(SPIN_TIMEOUT_S * 1e9)
    for i in range(counts.timeout_warmup + counts.timeouts):
        await anyio.sleep(TIMEOUT_GAP_S)
        with gc_off():
            submitted = clock()
            try:
                value = await pool.call("spin", timeout=SPIN_TIMEOUT_S)
            except GuestTimeout as exc:
                caught = clock()
                error = exc
            else:
                raise RuntimeError(f"spin() returned {value!r} instead of timing out")
        if error.kind != "wall" or error.function != "spin":
            raise RuntimeError(f"unexpected GuestTimeout: {error!r} (kind {error.kind})")
        path = error.core_path
        if path is None or not path.is_file():
            raise RuntimeError(f"GuestTimeout without a dump file: core_path={path}")
        if path.parent != directory:
            raise RuntimeError(f"dump written to {path}, not into {directory}")
        path.unlink()
        if i >= counts.timeout_warmup:
            latencies.append(caught - submitted - timeout_ns)
            lateness.append(round(error.elapsed * 1e9) - timeout_ns)
    await anyio.sleep(TIMEOUT_GAP_S)
    await expect_add(pool, "after the timeouts")
    await pool.aclose()
    left = sorted(directory.glob(DUMP_GLOB))
    if left:
        raise RuntimeError(f"dump files left behind: {[p.name for p in left]}")
    return [
        Result(
            "timeout_latency",
            f"deadline-to-exception latency, 8 MiB guest dump (timeout={SPIN_TIMEOUT_S:g} s)",
            latencies,
            target=Target("p99", 20 * MS, "p99 <= 20 ms"),
            extra={"timeout_s": SPIN_TIMEOUT_S, "pool_size": TIMEOUT_POOL_SIZE},
        ),
        Result(
            "watchdog_lateness",
            "of which watchdog lateness (GuestTimeout.elapsed - timeout)",
            lateness,
        ),
    ]


async def run_async(guest: Path, counts: Counts) -> Report:
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(guest, size=POOL_SIZE)
        hot_pool = await sup.create_pool(
            guest, size=POOL_SIZE, config=SandboxConfig(hot_restore=True)
        )
        results, latency_ratios = await bench_latency(pool, hot_pool, guest, counts)
        await hot_pool.aclose()
        otel_results, otel_ratios, notes = await bench_instrumentation(pool, counts)
        results.extend(otel_results)
        async with Supervisor(workers=1) as sup1:
            pool1 = await sup1.create_pool(guest, size=POOL_SIZE)
            results.extend(await bench_throughput({2: pool, 1: pool1}, counts))
            stats1 = sup1.statistics()
        with (
            tempfile.TemporaryDirectory(prefix="hlasync-bench-supervisor-") as tmp,
            quiet_stderr(),
        ):
            directory = Path(tmp).resolve()
            with dump_dir(directory):
                results.extend(await bench_timeouts(sup, guest, directory, counts))
        stats2 = sup.statistics()
    expected_timeouts = counts.timeout_warmup + counts.timeouts
    for name, stats in (("workers=2", stats2), ("workers=1", stats1)):
        if stats.failed or stats.dumps_failed or stats.pending or stats.running:
            raise RuntimeError(f"supervisor {name} ended with {stats}")
    if stats2.timed_out != expected_timeouts or stats2.dumps_written != expected_timeouts:
        raise RuntimeError(f"expected {expected_timeouts} timeouts and dumps, got {stats2}")
    return Report(
        results, [*latency_ratios, *otel_ratios], {"workers_2": stats2, "workers_1": stats1}, notes
    )


def run(counts: Counts, backend: str) -> Report:
    guest = hlasync.guests.path("simpleguest")  # may rebuild a stale guest: not timed
    Sandbox(guest).close()  # boot the guest and build its template outside any timing
    return anyio.run(run_async, guest, counts, backend=backend)


# ------------------------------------------------------------------ report
def evaluate(result: Result) -> tuple[str, str]:
    """(target text, met text) for one row, computed from the samples."""
    if result.target is None:
        return "-", "-"
    return result.target.description, "yes" if result.target.met(result.stats()) else "no"


def render(machine: dict[str, Any], mode: str, report: Report) -> str:
    by_key = {r.key: r for r in report.results}
    lines = [
        "## hlasync supervisor benchmarks",
        "",
        *machine_lines(machine),
        f"- async backend: {machine['backend']}",
        f"- mode: {mode}",
        "",
        "| measurement | median | p90 | p99 | n | target | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for result in report.results:
        stats = result.stats()
        target, met = evaluate(result)
        if result.unit == "ns":
            cells = [format_ns(stats[s]) for s in ("median", "p90", "p99")]
        else:  # a few rounds: tail percentiles of throughput mean little
            cells = [format_rate(stats["median"]), "-", "-"]
        lines.append(
            f"| {result.label} | {cells[0]} | {cells[1]} | {cells[2]} "
            f"| {len(result.samples)} | {target} | {met} |"
        )
        for ratio in report.ratios:
            if ratio.after == result.key:
                target, met = ratio.evaluate(by_key)
                lines.append(
                    f"| {ratio.label} | {ratio.value(by_key):.2f}x | - | - "
                    f"| {len(ratio.per_round)} rounds | {target} | {met} |"
                )
    lines.append("")
    lines.extend(report.notes)
    for result in report.results:
        if result.unit == "calls/s":
            rounds = ", ".join(f"{rate:,.0f}" for rate in result.samples)
            lines.append(f"- {result.label}, per round (calls/s): {rounds}")
    for ratio in report.ratios:
        rounds = ", ".join(f"{value:.2f}" for value in ratio.per_round)
        lines.append(f"- {ratio.label}, per round: {rounds}")
    return "\n".join(lines)


def to_json(
    machine: dict[str, Any],
    mode: str,
    backend: str,
    counts: Counts,
    report: Report,
    wall_s: float,
) -> dict[str, Any]:
    by_key = {r.key: r for r in report.results}
    measurements: dict[str, Any] = {}
    for result in report.results:
        stats = result.stats()
        target, met = evaluate(result)
        u = "ns" if result.unit == "ns" else "calls_per_s"
        measurements[result.key] = {
            "label": result.label,
            "unit": result.unit,
            "n": len(result.samples),
            f"median_{u}": stats["median"],
            f"p90_{u}": stats["p90"],
            f"p99_{u}": stats["p99"],
            f"min_{u}": stats["min"],
            f"max_{u}": stats["max"],
            f"mean_{u}": stats["mean"],
            "target": None if target == "-" else target,
            "met": None if met == "-" else met == "yes",
            f"samples_{u}": list(result.samples),
            **result.extra,
        }
    derived = {}
    for ratio in report.ratios:
        target, met = ratio.evaluate(by_key)
        derived[ratio.key] = {
            "label": ratio.label,
            "median_ratio": ratio.value(by_key),
            "numerator": ratio.numerator,
            "denominator": ratio.denominator,
            "per_round_ratios": ratio.per_round,
            "target": None if target == "-" else target,
            "met": None if met == "-" else met == "yes",
        }
    return {
        "machine": machine,
        "mode": mode,
        "backend": backend,
        "counts": asdict(counts),
        "wall_seconds": wall_s,
        "measurements": measurements,
        "derived": derived,
        "supervisor_statistics": {k: v._asdict() for k, v in report.statistics.items()},
        "notes": report.notes,
    }


def suite(quick: bool, machine: dict[str, Any], backend: str) -> SuiteOutput:
    """The supervisor suite on ``backend`` (asyncio or trio)."""
    counts = QUICK if quick else FULL
    mode = "quick (smoke test, not for quoting)" if quick else "full"
    machine = dict(machine)
    trio = f" {package_version('trio')}" if backend == "trio" else ""
    machine["backend"] = f"{backend}{trio} (anyio {package_version('anyio')})"
    started = time.perf_counter()
    report = run(counts, backend)
    wall = time.perf_counter() - started
    document = to_json(machine, "quick" if quick else "full", backend, counts, report, wall)
    return SuiteOutput(render(machine, mode, report), document, wall, [])
