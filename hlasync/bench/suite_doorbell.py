"""Exit-less calls side by side: the exit path (``SandboxConfig(spin=0)``),
the doorbell (``spin="auto"``, the default) and wasmtime, in one run.

The ``doorbell`` suite of ``python -m hlasync.bench``. Each row measures the
modes in alternating rounds so that they see the same (shared, noisy)
machine; the table shows medians and the doorbell/exit ratio.

Rows (issue #12): sync ``add`` p50 (target <= 8 µs on a PVM host); a host call
made from the guest (time per host call, 100 per call); a sync ``add`` +
``restore()``, on the exit path and restored in place (``hot_restore``, issue
22); a call through the supervisor to a dedicated sandbox, and to a pool (an
ordinary one, which restores on the exit path, and a hot one); throughput on
every CPU with one caller thread per CPU and with two; CPU time per call
(spinning shows here); CPU used in 1 s by 100 idle sandboxes after a burst of
calls each (target ~0).

Then the same rows (but the idle one) once more with a busy loop on every CPU
(a process each, ``while True: pass``): a spinning guest that shares
its CPU with other work must not make calls slower than the exit path
(issue #17: ``spin="auto"`` no slower than ``spin=0`` in any row, in both
tables).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .. import Sandbox, SandboxConfig, guests
from ..supervisor import Supervisor
from . import _wasm
from ._common import (
    SuiteOutput,
    call_back_to_back,
    format_ns,
    machine_lines,
    summarize,
    time_awaits,
    time_calls,
)

__all__ = ["suite"]

EXIT, DOORBELL, WASMTIME = "exit path", "doorbell", "wasmtime"
CONFIGS = {EXIT: SandboxConfig(spin=0), DOORBELL: SandboxConfig(spin="auto")}
#: Host calls per guest call in the host-call row.
HOST_CALLS = 100

#: ``call_host_times(n)``: calls the imported ``twice`` n times (the sum).
HOST_WAT = """
(module
  (import "host" "twice" (func $twice (param i32) (result i32)))
  (func (export "call_host_times") (param $n i32) (result i32)
    (local $i i32) (local $sum i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $n)))
        (local.set $sum (i32.add (local.get $sum) (call $twice (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $sum)))
"""


@dataclass(frozen=True)
class Counts:
    rounds: int
    calls: int  # per round and mode
    host_rounds: int  # calls of call_host_times per round and mode
    pool_calls: int
    window_s: float  # throughput window per round and mode
    idle: int


QUICK = Counts(rounds=2, calls=200, host_rounds=10, pool_calls=200, window_s=0.1, idle=10)
FULL = Counts(rounds=5, calls=4000, host_rounds=100, pool_calls=3000, window_s=0.5, idle=100)


@dataclass
class Row:
    key: str
    label: str
    unit: str  # "ns" or "calls/s"
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""
    target: str = ""


def _per_host_call(samples: list[float]) -> list[float]:
    """Times of calls that each made HOST_CALLS host calls, per host call."""
    return [sample / HOST_CALLS for sample in samples]


def _wasm_instances() -> tuple[Callable[[], object], Callable[[], object]] | None:
    if _wasm.missing() is not None:
        return None
    import wasmtime  # type: ignore[import-not-found, unused-ignore]

    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    add = wasmtime.Instance(store, wasmtime.Module(engine, _wasm.WAT), []).exports(store)["add"]
    i32 = wasmtime.ValType.i32()
    twice = wasmtime.Func(store, wasmtime.FuncType([i32], [i32]), lambda x: 2 * x)
    host = wasmtime.Instance(store, wasmtime.Module(engine, HOST_WAT), [twice])
    loop = host.exports(store)["call_host_times"]
    assert isinstance(add, wasmtime.Func) and isinstance(loop, wasmtime.Func)
    expected = sum(2 * i for i in range(HOST_CALLS))
    if add(store, 1, 2) != 3 or loop(store, HOST_CALLS) != expected:
        raise RuntimeError("wasmtime gave a wrong answer")
    return (lambda: add(store, 1, 2)), (lambda: loop(store, HOST_CALLS))


def _latencies(guest: Path, counts: Counts) -> list[Row]:
    """add, a host call and CPU per call, the modes in alternating rounds."""
    add = Row("add", 'sync call("add", 1, 2), p50', "ns", target="<= 8 µs (doorbell)")
    host = Row("host_call", "host-call round trip from the guest, per host call", "ns")
    cpu = Row("cpu", "CPU time per add, back to back (every thread)", "ns")
    for row in (add, host, cpu):
        row.samples = {EXIT: [], DOORBELL: []}
    sandboxes = {mode: Sandbox(guest, config) for mode, config in CONFIGS.items()}
    expected = sum(2 * i for i in range(HOST_CALLS))
    try:
        for sb in sandboxes.values():
            sb.register_host_function("twice", lambda x: 2 * x)
            for _ in range(200):
                sb.call("add", 1, 2)
            if sb.call("call_host_times", "twice", HOST_CALLS) != expected:
                raise RuntimeError("call_host_times gave a wrong answer")
        for _ in range(counts.rounds):
            for mode, sb in sandboxes.items():
                for _ in range(50):  # back to back again: the doorbell's auto spin follows
                    sb.call("add", 1, 2)
                add.samples[mode] += time_calls(
                    functools.partial(sb.call, "add", 1, 2), counts.calls, 0
                )
                before = time.process_time_ns()
                for _ in range(counts.calls):
                    sb.call("add", 1, 2)
                cpu.samples[mode].append((time.process_time_ns() - before) / counts.calls)
                loop = functools.partial(sb.call, "call_host_times", "twice", HOST_CALLS)
                host.samples[mode] += _per_host_call(time_calls(loop, counts.host_rounds, 0))
    finally:
        for sb in sandboxes.values():
            sb.close()
    wasm = _wasm_instances()
    if wasm is None:
        for row in (add, host, cpu):
            row.note = f"wasmtime: {_wasm.missing()}"
    else:
        wasm_add, wasm_loop = wasm
        for _ in range(counts.rounds):
            add.samples.setdefault(WASMTIME, []).extend(time_calls(wasm_add, counts.calls, 0))
            before = time.process_time_ns()
            for _ in range(counts.calls):
                wasm_add()
            cpu.samples.setdefault(WASMTIME, []).append(
                (time.process_time_ns() - before) / counts.calls
            )
            host.samples.setdefault(WASMTIME, []).extend(
                _per_host_call(time_calls(wasm_loop, counts.host_rounds, 0))
            )
    return [add, host, cpu]


#: A hot sandbox or pool (issue 22): restores in place, spins as "auto" says.
HOT_RESTORE = SandboxConfig(spin="auto", hot_restore=True)


def _restores(guest: Path, counts: Counts) -> Row:
    """``call("add")`` + ``restore()``: the exit path, and in place (a hot
    sandbox, ``hot_restore=True``), in alternating rounds."""
    row = Row(
        "call_restore",
        'sync call("add", 1, 2) + restore(), p50 (doorbell: restored in place)',
        "ns",
        {EXIT: [], DOORBELL: []},
    )
    sandboxes = {EXIT: Sandbox(guest, CONFIGS[EXIT]), DOORBELL: Sandbox(guest, HOT_RESTORE)}

    def fresh(sb: Sandbox) -> None:
        sb.call("add", 1, 2)
        sb.restore()

    try:
        for _ in range(counts.rounds):
            for mode, sb in sandboxes.items():
                row.samples[mode] += time_calls(functools.partial(fresh, sb), counts.calls, 50)
    finally:
        for sb in sandboxes.values():
            sb.close()
    return row


async def _supervised_samples(guest: Path, counts: Counts) -> dict[str, dict[str, list[float]]]:
    """p50 of ``add`` through a Supervisor (threads): a dedicated sandbox on
    each path, an ordinary pool (the exit path) and a hot pool, in
    alternating rounds."""
    samples: dict[str, dict[str, list[float]]] = {
        "sandbox": {EXIT: [], DOORBELL: []},
        "pool": {EXIT: [], DOORBELL: []},
    }
    async with Supervisor(processes=0, workers=1) as sup:
        targets = {
            ("sandbox", EXIT): await sup.create_sandbox(guest, CONFIGS[EXIT]),
            ("sandbox", DOORBELL): await sup.create_sandbox(guest, CONFIGS[DOORBELL]),
            ("pool", EXIT): await sup.create_pool(guest, size=1),
            ("pool", DOORBELL): await sup.create_pool(guest, size=1, config=HOT_RESTORE),
        }
        per_round = max(counts.pool_calls // counts.rounds, 1)
        for _ in range(counts.rounds):
            for (kind, mode), target in targets.items():
                call = functools.partial(target.call, "add", 1, 2)
                samples[kind][mode] += await time_awaits(call, per_round, 50)
    return samples


def _supervised(guest: Path, counts: Counts) -> list[Row]:
    samples = anyio.run(_supervised_samples, guest, counts)
    return [
        Row(
            "supervised_sandbox",
            'await sandbox.call("add", 1, 2), p50 (Supervisor, dedicated sandbox)',
            "ns",
            samples["sandbox"],
        ),
        Row(
            "pool",
            'await pool.call("add", 1, 2), p50 (Supervisor, pool of 1; doorbell: a hot pool)',
            "ns",
            samples["pool"],
            note=(
                "pool row: exit path = an ordinary pool (it restores after every call on the "
                "exit path); doorbell = a hot pool (SandboxConfig(hot_restore=True), "
                "spin='auto'), restored in place"
            ),
        ),
    ]


def _throughput(guest: Path, counts: Counts, threads: int) -> Row:
    """Calls/s of ``threads`` threads, each calling its own sandbox back to back."""
    row = Row(
        f"throughput_{threads}",
        f"throughput, {threads} threads each calling its own sandbox (calls/s)",
        "calls/s",
        {EXIT: [], DOORBELL: []},
    )
    groups = {
        mode: [Sandbox(guest, config) for _ in range(threads)] for mode, config in CONFIGS.items()
    }
    try:
        for _ in range(counts.rounds):
            for mode, group in groups.items():
                calls, seconds = call_back_to_back(group, counts.window_s)
                row.samples[mode].append(calls / seconds)
    finally:
        for group in groups.values():
            for sb in group:
                sb.close()
    return row


def _idle(guest: Path, counts: Counts) -> Row:
    """CPU used in 1 s by ``counts.idle`` sandboxes after a burst of calls each."""
    row = Row(
        "idle",
        f"CPU time in 1 s of {counts.idle} idle sandboxes, after a burst of calls each",
        "ns",
        {EXIT: [], DOORBELL: []},
        target="~0 (<= 10 ms)",
    )
    for mode, config in CONFIGS.items():
        sandboxes = [Sandbox(guest, config) for _ in range(counts.idle)]
        try:
            for sb in sandboxes:
                for _ in range(50):
                    sb.call("add", 1, 2)
            time.sleep(0.1)  # every spin has ended (1 ms at most)
            for _ in range(3):
                before = time.process_time_ns()
                time.sleep(1.0 if counts.idle >= 100 else 0.2)
                row.samples[mode].append(time.process_time_ns() - before)
        finally:
            for sb in sandboxes:
                sb.close()
    return row


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes that each keep a CPU busy (``while True: pass``)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.2)  # running before the first measurement
        yield
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()


def _value(row: Row, mode: str) -> float | None:
    samples = row.samples.get(mode)
    return statistics.median(samples) if samples else None


def _text(row: Row, mode: str) -> str:
    value = _value(row, mode)
    if value is None:
        return "-"
    return f"{value:,.0f}" if row.unit == "calls/s" else format_ns(value)


def render(machine: dict[str, Any], mode: str, rows: list[Row], contended: list[Row]) -> str:
    lines = [
        "## hlasync doorbell benchmarks: exit path, doorbell and wasmtime side by side",
        "",
        *machine_lines(machine),
        f"- mode: {mode}",
        "",
        *_table(rows),
        "",
        f"### The same with a busy loop on every CPU ({len(os.sched_getaffinity(0))} processes)",
        "",
        *_table(contended),
    ]
    notes = sorted({row.note for row in [*rows, *contended] if row.note})
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def _table(rows: list[Row]) -> list[str]:
    lines = [
        "| measurement | exit path | doorbell (auto) | wasmtime | doorbell / exit | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        exit_, bell = _value(row, EXIT), _value(row, DOORBELL)
        ratio = f"{bell / exit_:.2f}x" if exit_ and bell is not None else "-"
        lines.append(
            f"| {row.label} | {_text(row, EXIT)} | {_text(row, DOORBELL)} "
            f"| {_text(row, WASMTIME)} | {ratio} | {row.target or '-'} |"
        )
    return lines


def suite(quick: bool, machine: dict[str, Any], backend: str) -> SuiteOutput:
    del backend  # synchronous, but for the pool row (asyncio)
    counts = QUICK if quick else FULL
    started = time.perf_counter()
    guest = guests.path("simpleguest")  # may rebuild a stale guest: not timed
    cpus = len(os.sched_getaffinity(0))
    rows = _latencies(guest, counts)
    rows.append(_restores(guest, counts))
    rows += _supervised(guest, counts)
    rows.append(_throughput(guest, counts, cpus))
    rows.append(_throughput(guest, counts, 2 * cpus))
    rows.append(_idle(guest, counts))
    with busy_loops(cpus):
        contended = _latencies(guest, counts)
        contended.append(_restores(guest, counts))
        contended += _supervised(guest, counts)
        contended.append(_throughput(guest, counts, cpus))
        contended.append(_throughput(guest, counts, 2 * cpus))
    wall = time.perf_counter() - started
    mode = "quick (smoke test, not for quoting)" if quick else "full"
    document = {
        "machine": machine,
        "mode": "quick" if quick else "full",
        "wall_seconds": wall,
        "measurements": _measurements(rows),
        "with_busy_loops": _measurements(contended),
    }
    return SuiteOutput(render(machine, mode, rows, contended), document, wall, [])


def _measurements(rows: list[Row]) -> dict[str, Any]:
    return {
        row.key: {
            "label": row.label,
            "unit": row.unit,
            "note": row.note,
            "target": row.target,
            "modes": {
                mode: {"samples": samples, **summarize(samples)}
                for mode, samples in row.samples.items()
                if samples
            },
        }
        for row in rows
    }
