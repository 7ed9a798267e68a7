"""Crash dump benchmarks: on-demand dumps (idle and mid-call) and the cost of
automatic dumps.

The ``crashdump`` suite of ``python -m hlasync.bench`` (``python -m
hlasync.bench crashdump``).

Prints the machine description and a markdown table (median, p90, p99, n,
target, met) and writes every raw sample (nanoseconds or bytes) to
``crashdump.json``. ``--quick`` takes few samples and is a smoke test only;
numbers worth quoting come from the full mode.

Dumps go to a fresh temporary directory that is deleted at the end; every dump
file is deleted as soon as it has been measured. The ``Core dump created:
...`` line each dump prints to stderr is discarded while measuring.

The exit status is non-zero only when something fails, never because a target
was missed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import hlasync.guests
from hlasync import (
    CrashdumpRecord,
    GuestCancelled,
    GuestCrashed,
    Sandbox,
    SandboxConfig,
    SandboxState,
)
from hlasync.crashdump.placement import DUMP_DIR_ENV, DUMP_GLOB

from ._common import (
    MS,
    KiB,
    MiB,
    SuiteOutput,
    Target,
    format_ns,
    format_value,
    gc_paused,
    machine_lines,
    quiet_stderr,
    summarize,
)

#: Guest memory of the dumped sandboxes.
MEMORY_SIZE = 8 * MiB
#: ``spin_for`` rounds for the "call survives a mid-call dump" check (~0.5 s here).
SPIN_FOR_ITERATIONS = 2_000_000_000
#: Longest wait for a worker thread to be inside its call or to finish.
WORKER_TIMEOUT_S = 10.0
#: Longest wait for ``spin_for(SPIN_FOR_ITERATIONS)`` to return.
SPIN_FOR_TIMEOUT_S = 120.0

Unit = Literal["ns", "bytes"]


@dataclass(frozen=True)
class Counts:
    """Samples (and warm-up rounds) per measurement."""

    idle_dumps: int
    idle_warmup: int
    running_dumps: int
    running_warmup: int
    faults: int
    fault_warmup: int


QUICK = Counts(
    idle_dumps=20,
    idle_warmup=3,
    running_dumps=20,
    running_warmup=3,
    faults=20,
    fault_warmup=3,
)
FULL = Counts(
    idle_dumps=500,
    idle_warmup=20,
    running_dumps=500,
    running_warmup=20,
    faults=500,
    fault_warmup=20,
)


@dataclass
class Result:
    key: str
    label: str
    samples: list[int]
    unit: Unit = "ns"
    target: Target | None = None

    def stats(self) -> dict[str, float]:
        return summarize(self.samples)


@dataclass(frozen=True)
class Difference:
    """The difference of two measurements' medians (``minuend - subtrahend``)."""

    key: str
    label: str
    minuend: str
    subtrahend: str

    def value(self, by_key: dict[str, Result]) -> float:
        return by_key[self.minuend].stats()["median"] - by_key[self.subtrahend].stats()["median"]


@dataclass
class Check:
    """A correctness check reported next to the table (not a timing)."""

    key: str
    description: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    results: list[Result]
    differences: list[Difference]
    checks: list[Check]


# ------------------------------------------------------------------ helpers
def check_dump_file(path: Path, directory: Path, what: str) -> os.stat_result:
    """Stat a dump file, checking it is an ELF file in ``directory``."""
    if path.parent != directory:
        raise RuntimeError(f"{what}: dump written to {path}, not into {directory}")
    with open(path, "rb") as dump:
        magic = dump.read(4)
    if magic != b"\x7fELF":
        raise RuntimeError(f"{what}: {path} is not an ELF file (starts with {magic!r})")
    return path.stat()


def leftover_dumps(directory: Path) -> list[Path]:
    return sorted(directory.glob(DUMP_GLOB))


def expect_add(sb: Sandbox, when: str) -> None:
    if sb.call("add", 1, 2) != 3:
        raise RuntimeError(f"add(1, 2) != 3 {when}")


class _CallWorker:
    """A thread that makes one guest call and keeps its outcome for the main thread."""

    def __init__(self, sb: Sandbox, name: str, *args: int) -> None:
        self.sb = sb
        self.value: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(name, args), name=f"{name}-worker", daemon=True
        )
        self.thread.start()

    def _run(self, name: str, args: tuple[int, ...]) -> None:
        try:
            self.value = self.sb.call(name, *args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            self.done.set()

    def wait_running(self) -> None:
        """Return once the call is in progress (``sb.state`` is RUNNING)."""
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while self.sb.state is not SandboxState.RUNNING:
            if self.done.is_set() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the worker's call is not running (state {self.sb.state.value})", self.error
                )
            time.sleep(0.001)

    def join(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise RuntimeError(f"the worker's call did not end within {timeout} s")
        self.thread.join(timeout)


# ------------------------------------------------------------- measurements
def bench_idle_dump(guest: Path, directory: Path, counts: Counts) -> list[Result]:
    """Time ``generate_crashdump`` of an idle 8 MiB sandbox; size every dump file."""
    sb = Sandbox(guest, SandboxConfig(memory_size=MEMORY_SIZE))
    try:
        payload = os.urandom(1 * KiB)
        expect_add(sb, "before the idle dumps")
        if sb.call("echo_bytes", payload) != payload:
            raise RuntimeError("echo_bytes of 1 KiB did not return its input")
        times: list[int] = []
        allocated: list[int] = []
        apparent: list[int] = []
        clock = time.perf_counter_ns
        with gc_paused():
            for i in range(counts.idle_warmup + counts.idle_dumps):
                start = clock()
                path = sb.generate_crashdump(directory)
                elapsed = clock() - start
                st = check_dump_file(path, directory, "idle dump")
                path.unlink()
                if i >= counts.idle_warmup:
                    times.append(elapsed)
                    allocated.append(st.st_blocks * 512)
                    apparent.append(st.st_size)
        if sb.state is not SandboxState.READY:
            raise RuntimeError(f"sandbox is {sb.state.value} after idle dumps, not ready")
        expect_add(sb, "after the idle dumps")
    finally:
        sb.close()
    return [
        Result(
            "idle_dump",
            "dump of an idle 8 MiB sandbox",
            times,
            target=Target("median", 10 * MS, "p50 <= 10 ms"),
        ),
        Result(
            "idle_dump_allocated",
            "idle dump: allocated disk bytes (st_blocks * 512)",
            allocated,
            unit="bytes",
            target=Target("median", 1 * MiB, "median <= 1 MiB"),
        ),
        Result(
            "idle_dump_apparent",
            "idle dump: apparent size (st_size)",
            apparent,
            unit="bytes",
        ),
    ]


def bench_running_dump(guest: Path, directory: Path, counts: Counts) -> Result:
    """Time ``generate_crashdump`` from the main thread while ``spin()`` runs in a worker."""
    sb = Sandbox(guest, SandboxConfig(memory_size=MEMORY_SIZE))
    worker: _CallWorker | None = None
    try:
        worker = _CallWorker(sb, "spin")
        worker.wait_running()
        samples: list[int] = []
        clock = time.perf_counter_ns
        with gc_paused():
            for i in range(counts.running_warmup + counts.running_dumps):
                start = clock()
                path = sb.generate_crashdump(directory)
                elapsed = clock() - start
                check_dump_file(path, directory, "mid-call dump")
                path.unlink()
                if worker.done.is_set() or sb.state is not SandboxState.RUNNING:
                    raise RuntimeError(
                        f"spin() stopped after mid-call dump {i + 1} (state {sb.state.value})",
                        worker.error,
                    )
                if i >= counts.running_warmup:
                    samples.append(elapsed)
        if not sb.interrupt():
            raise RuntimeError("interrupt() found no running call after the mid-call dumps")
        worker.join(WORKER_TIMEOUT_S)
        if not isinstance(worker.error, GuestCancelled):
            raise RuntimeError("spin() did not end with GuestCancelled") from worker.error
        sb.restore()
        expect_add(sb, "after the mid-call dumps, interrupt and restore")
    finally:
        sb.close()
        if worker is not None:
            worker.thread.join(WORKER_TIMEOUT_S)
    return Result("running_dump", "on-demand dump of a running call", samples)


def check_call_survives_dump(guest: Path, directory: Path) -> Check:
    """Dump once during ``spin_for``; the call must still return its count."""
    sb = Sandbox(guest, SandboxConfig(memory_size=MEMORY_SIZE))
    records: list[CrashdumpRecord] = []
    sb.add_crashdump_listener(records.append)
    worker: _CallWorker | None = None
    try:
        worker = _CallWorker(sb, "spin_for", SPIN_FOR_ITERATIONS)
        worker.wait_running()
        path = sb.generate_crashdump(directory)
        still_running = sb.state is SandboxState.RUNNING and not worker.done.is_set()
        check_dump_file(path, directory, "spin_for dump")
        path.unlink()
        worker.join(SPIN_FOR_TIMEOUT_S)
        if worker.error is not None:
            raise RuntimeError("spin_for failed after a mid-call dump") from worker.error
        state_after = sb.state
        expect_add(sb, "after spin_for")
    finally:
        sb.close()
        if worker is not None:
            worker.thread.join(WORKER_TIMEOUT_S)
    record = records[0] if records else None
    dumped_mid_call = record is not None and record.function == "spin_for"
    returned = worker.value
    ok = (
        returned == SPIN_FOR_ITERATIONS
        and dumped_mid_call
        and state_after is SandboxState.READY
        and len(records) == 1
    )
    detail = (
        f"spin_for({SPIN_FOR_ITERATIONS:_}) returned {returned!r} after a dump taken mid-call "
        f"(dump records the running function: {record.function if record else None!r}; "
        f"call still running right after the dump: {'yes' if still_running else 'no'}; "
        f"sandbox then {state_after.value})"
    )
    return Check(
        "call_survives_dump",
        "a call dumped mid-way still returns the right value",
        ok,
        detail,
        {
            "iterations": SPIN_FOR_ITERATIONS,
            "returned": returned,
            "dump_function": record.function if record else None,
            "dump_reason": record.reason if record else None,
            "running_after_dump": still_running,
            "state_after_call": state_after.value,
        },
    )


def _fault_sample(sb: Sandbox, directory: Path, with_dump: bool) -> int:
    """Time one ``divide_by_zero`` call; check (and delete) its dump; restore."""
    clock = time.perf_counter_ns
    start = clock()
    try:
        sb.call("divide_by_zero")
    except GuestCrashed as exc:
        elapsed = clock() - start
        core_path = exc.core_path
        dump_error = exc.crashdump_error
    else:
        raise RuntimeError("divide_by_zero() returned instead of faulting")
    if with_dump:
        if core_path is None:
            raise RuntimeError("no automatic dump for the fault", dump_error)
        check_dump_file(core_path, directory, "automatic dump")
        core_path.unlink()
    elif core_path is not None or dump_error is not None:
        raise RuntimeError(f"a dump was attempted with crashdump_enabled=False ({core_path})")
    if sb.state is not SandboxState.POISONED:
        raise RuntimeError(f"sandbox is {sb.state.value} after the fault, not poisoned")
    sb.restore()
    return elapsed


def bench_faults(guest: Path, directory: Path, counts: Counts) -> list[Result]:
    """``divide_by_zero`` with and without the automatic dump, samples interleaved."""
    previous = os.environ.get(DUMP_DIR_ENV)
    os.environ[DUMP_DIR_ENV] = str(directory)  # the automatic dump's directory
    try:
        with contextlib.ExitStack() as stack:
            with_dump = stack.enter_context(Sandbox(guest, SandboxConfig(memory_size=MEMORY_SIZE)))
            disabled = SandboxConfig(memory_size=MEMORY_SIZE, crashdump_enabled=False)
            without_dump = stack.enter_context(Sandbox(guest, disabled))
            dumped: list[int] = []
            plain: list[int] = []
            with gc_paused():
                for i in range(counts.fault_warmup + counts.faults):
                    # Alternate which goes first so neither always runs on a warmer cache.
                    order = [(with_dump, True), (without_dump, False)]
                    if i % 2:
                        order.reverse()
                    for sb, enabled in order:
                        elapsed = _fault_sample(sb, directory, enabled)
                        if i >= counts.fault_warmup:
                            (dumped if enabled else plain).append(elapsed)
            expect_add(with_dump, "after the faults (dumps enabled)")
            expect_add(without_dump, "after the faults (dumps disabled)")
    finally:
        if previous is None:
            os.environ.pop(DUMP_DIR_ENV, None)
        else:
            os.environ[DUMP_DIR_ENV] = previous
    left = leftover_dumps(directory)
    if left:
        raise RuntimeError(f"dump files left behind: {[p.name for p in left]}")
    return [
        Result("fault_with_dump", "fault with automatic dump", dumped),
        Result("fault_without_dump", "fault without dump", plain),
    ]


# ------------------------------------------------------------------ report
def evaluate(result: Result) -> tuple[str, str]:
    """(target text, met text) for one row, computed from the samples."""
    if result.target is None:
        return "-", "-"
    return result.target.description, "yes" if result.target.met(result.stats()) else "no"


def render(machine: dict[str, Any], mode: str, report: Report) -> str:
    by_key = {r.key: r for r in report.results}
    lines = [
        "## hlasync crash dump benchmarks",
        "",
        *machine_lines(machine),
        f"- mode: {mode}",
        "",
        "| measurement | median | p90 | p99 | n | target | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for result in report.results:
        stats = result.stats()
        target, met = evaluate(result)
        cells = [format_value(stats[s], result.unit) for s in ("median", "p90", "p99")]
        lines.append(
            f"| {result.label} | {cells[0]} | {cells[1]} | {cells[2]} "
            f"| {len(result.samples)} | {target} | {met} |"
        )
    for diff in report.differences:
        lines.append(f"| {diff.label} | {format_ns(diff.value(by_key))} | - | - | - | - | - |")
    lines.append("")
    for check in report.checks:
        lines.append(f"- check ({'ok' if check.ok else 'FAILED'}): {check.detail}")
    return "\n".join(lines)


def to_json(
    machine: dict[str, Any], mode: str, counts: Counts, report: Report, wall_s: float
) -> dict[str, Any]:
    by_key = {r.key: r for r in report.results}
    measurements: dict[str, Any] = {}
    for result in report.results:
        stats = result.stats()
        target, met = evaluate(result)
        u = result.unit
        measurements[result.key] = {
            "label": result.label,
            "unit": u,
            "n": len(result.samples),
            f"median_{u}": stats["median"],
            f"p90_{u}": stats["p90"],
            f"p99_{u}": stats["p99"],
            f"min_{u}": stats["min"],
            f"max_{u}": stats["max"],
            f"mean_{u}": stats["mean"],
            "target": None if target == "-" else target,
            "met": None if met == "-" else met == "yes",
            f"samples_{u}": result.samples,
        }
    derived = {
        diff.key: {
            "label": diff.label,
            "unit": "ns",
            "median_difference_ns": diff.value(by_key),
            "minuend": diff.minuend,
            "subtrahend": diff.subtrahend,
        }
        for diff in report.differences
    }
    checks = {
        check.key: {
            "description": check.description,
            "ok": check.ok,
            "detail": check.detail,
            **check.data,
        }
        for check in report.checks
    }
    return {
        "machine": machine,
        "mode": mode,
        "counts": asdict(counts),
        "wall_seconds": wall_s,
        "measurements": measurements,
        "derived": derived,
        "checks": checks,
    }


def run(counts: Counts) -> Report:
    guest = hlasync.guests.path("simpleguest")  # may rebuild a stale guest: not timed
    Sandbox(guest).close()  # boot the guest and build its template outside any timing
    with (
        tempfile.TemporaryDirectory(prefix="hlasync-bench-crashdump-") as tmp,
        quiet_stderr(),
    ):
        directory = Path(tmp).resolve()
        results = bench_idle_dump(guest, directory, counts)
        results.append(bench_running_dump(guest, directory, counts))
        checks = [check_call_survives_dump(guest, directory)]
        results.extend(bench_faults(guest, directory, counts))
        left = leftover_dumps(directory)
        if left:
            raise RuntimeError(f"dump files left behind: {[p.name for p in left]}")
    differences = [
        Difference(
            "fault_dump_cost",
            "automatic dump cost (difference of medians)",
            "fault_with_dump",
            "fault_without_dump",
        )
    ]
    return Report(results, differences, checks)


def suite(quick: bool, machine: dict[str, Any], backend: str) -> SuiteOutput:
    """The crash dump suite: its table, raw samples and the checks that failed."""
    del backend  # synchronous
    counts = QUICK if quick else FULL
    mode = "quick (smoke test, not for quoting)" if quick else "full"
    started = time.perf_counter()
    report = run(counts)
    wall = time.perf_counter() - started
    document = to_json(machine, "quick" if quick else "full", counts, report, wall)
    failed = [check.key for check in report.checks if not check.ok]
    return SuiteOutput(render(machine, mode, report), document, wall, failed)
