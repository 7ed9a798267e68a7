"""Hang capture: from a hung call's deadline to a core file a debugger opens."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .. import GuestTimeout, SandboxConfig, Supervisor
from .. import events as ev
from ._child import build_spin, reap, start_ready
from ._common import BenchError, Counts, Row, allocated_bytes, quiet_stderr, skipped

TIME = "hang_time"
BYTES = "hang_bytes"
#: A backtrace frame in function ``spin`` (not ``spin_for``).
SPIN_FRAME = re.compile(r"^#\d+\s.*\bspin\b", re.MULTILINE)


def gdb_backtrace_shows_spin(gdb: str, binary: Path, core: Path) -> tuple[bool, str]:
    """``gdb -nx -batch -ex bt BINARY CORE``: (a frame is in ``spin``, the output)."""
    proc = subprocess.run(
        [gdb, "-nx", "-batch", "-ex", "bt", str(binary), str(core)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    return SPIN_FRAME.search(proc.stdout) is not None, output


async def _hlasync_samples(
    guest: Path, directory: Path, counts: Counts
) -> tuple[list[float], list[float], list[float], Path]:
    """(ns from deadline to GuestTimeout caught, allocated core bytes, ns the watchdog
    noticed the deadline late, one core kept)."""
    limit = counts.hang_timeout_s
    times: list[float] = []
    sizes: list[float] = []
    late: list[float] = []
    kept: Path | None = None
    config = SandboxConfig(crashdump_dir=directory)
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(guest, size=1, config=config)
        if await pool.call("add", 1, 2) != 3:
            raise BenchError("pool.call('add', 1, 2) != 3")
        async with sup.subscribe(ev.CallStarted) as started:
            for i in range(1 + counts.hangs):  # one warm-up
                submitted = time.monotonic()
                try:
                    await pool.call("spin", timeout=limit)
                except GuestTimeout as exc:
                    caught = time.monotonic()
                    core = exc.core_path
                    noticed_late = exc.elapsed - limit
                else:
                    raise BenchError("spin() returned")
                event = await asyncio.wait_for(started.receive(), 10.0)
                if not isinstance(event, ev.CallStarted) or event.function != "spin":
                    raise BenchError(f"expected CallStarted for spin, got {event}")
                # The watchdog's deadline is the call's start on the vCPU thread plus the
                # limit. ``submitted`` is taken just before the call is queued, so this
                # estimate is at most a few microseconds early: never in hlasync's favour.
                deadline = submitted + event.queued + limit
                if core is None or not core.is_file():
                    raise BenchError(f"GuestTimeout without a core dump: {core}")
                if i > 0:
                    times.append((caught - deadline) * 1e9)
                    sizes.append(allocated_bytes(core))
                    late.append(noticed_late * 1e9)
                if kept is None:
                    kept = core
                else:
                    core.unlink()
        if await pool.call("add", 1, 2) != 3:
            raise BenchError("pool broken after the timeouts")
    assert kept is not None
    return times, sizes, late, kept


def bench_hlasync(guest: Path, counts: Counts, directory: Path, gdb: str | None) -> list[Row]:
    with quiet_stderr():
        times, sizes, late, core = asyncio.run(_hlasync_samples(guest, directory, counts))
    label = 'Supervisor watchdog: pool.call("spin", timeout=...) until GuestTimeout with core_path'
    time_row = Row(
        TIME,
        "hang_time.hlasync",
        "hlasync",
        label,
        times,
        baseline=True,
        # GuestTimeout.elapsed - timeout: how late the watchdog thread woke up.
        extra={"watchdog_late_samples_ns": late},
    )
    bytes_row = Row(
        BYTES,
        "hang_bytes.hlasync",
        "hlasync",
        "watchdog core of an 8 MiB sandbox",
        sizes,
        baseline=True,
    )
    _gdb_check(gdb, guest, core, [time_row, bytes_row])
    core.unlink()
    return [time_row, bytes_row]


def _gdb_check(gdb: str | None, binary: Path, core: Path, rows: list[Row]) -> None:
    if gdb is None:
        for row in rows:
            row.notes.append("gdb bt shows spin: not checked (gdb not installed)")
            row.extra["gdb_backtrace_shows_spin"] = None
        return
    ok, output = gdb_backtrace_shows_spin(gdb, binary, core)
    for row in rows:
        row.notes.append(f"gdb bt shows spin: {'yes' if ok else 'no'}")
        row.extra["gdb_backtrace_shows_spin"] = ok
        row.extra["gdb_backtrace"] = output[-4000:]


def bench_gcore(counts: Counts, directory: Path) -> list[Row]:
    time_key, bytes_key, peer = "hang_time.gcore", "hang_bytes.gcore", "gcore"
    time_label = "gcore -o FILE PID of a hung native process until gcore exited and FILE exists"
    bytes_label = "gcore core of the hung native process"
    gcc, gcore, gdb = shutil.which("gcc"), shutil.which("gcore"), shutil.which("gdb")
    missing = [name for name, path in (("gcc", gcc), ("gcore", gcore), ("gdb", gdb)) if not path]
    if missing:
        reason = f"{', '.join(missing)} not installed"
        return [
            skipped(TIME, time_key, peer, time_label, reason),
            skipped(BYTES, bytes_key, peer, bytes_label, reason),
        ]
    assert gcc is not None and gcore is not None and gdb is not None
    binary = build_spin(directory, gcc)
    times: list[float] = []
    sizes: list[float] = []
    kept: Path | None = None
    clock = time.perf_counter_ns
    for i in range(1 + counts.gcores):  # one warm-up
        proc = start_ready([str(binary)])
        prefix = directory / f"gcore-{i}"
        core = Path(f"{prefix}.{proc.pid}")
        try:
            time.sleep(counts.hang_timeout_s)
            if proc.poll() is not None:
                raise BenchError(f"hung child exited early ({proc.returncode})")
            start = clock()  # the deadline
            result = subprocess.run(
                [gcore, "-o", str(prefix), str(proc.pid)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            exists = core.is_file()
            elapsed = clock() - start
        finally:
            reap(proc)
        if result.returncode != 0 or not exists:
            raise BenchError(
                f"gcore failed (exit {result.returncode}, {core} exists: {exists}):\n"
                f"{result.stdout}{result.stderr}"
            )
        if i > 0:
            times.append(elapsed)
            sizes.append(allocated_bytes(core))
        if kept is None:
            kept = core
        else:
            core.unlink()
    assert kept is not None
    time_row = Row(TIME, time_key, peer, time_label, times)
    bytes_row = Row(BYTES, bytes_key, peer, bytes_label, sizes)
    _gdb_check(gdb, binary, kept, [time_row, bytes_row])
    kept.unlink()
    return [time_row, bytes_row]


def run(guest: Path, counts: Counts) -> list[Row]:
    gdb = shutil.which("gdb")
    with tempfile.TemporaryDirectory(prefix="hlasync-bench-") as tmp:
        directory = Path(tmp)
        hl_dir = directory / "hlasync"
        gc_dir = directory / "gcore"
        hl_dir.mkdir()
        gc_dir.mkdir()
        rows = bench_hlasync(guest, counts, hl_dir, gdb)
        rows += bench_gcore(counts, gc_dir)
    # The table lists time rows, then byte rows.
    return sorted(rows, key=lambda r: r.category != TIME)
