"""Fresh-state cost: getting an environment no earlier call has touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import Sandbox
from . import _wasm
from ._common import BenchError, Counts, Row, format_ns, gc_off, percentile, skipped

CATEGORY = "fresh"


def bench_restore(guest: Path, counts: Counts) -> Row:
    """``sb.restore()`` (to the initial snapshot) after an ``add`` call."""
    samples: list[float] = []
    clock = time.perf_counter_ns
    with Sandbox(guest) as sb:
        for i in range(counts.fresh_warmup + counts.restores):
            if sb.call("add", i, 1) != i + 1:
                raise BenchError("add returned a wrong sum")
            with gc_off():
                start = clock()
                sb.restore()
                elapsed = clock() - start
            if i >= counts.fresh_warmup:
                samples.append(elapsed)
        if sb.call("add", 1, 2) != 3:
            raise BenchError("sandbox broken after restore")
    return Row(
        CATEGORY,
        "fresh.hlasync_restore",
        "hlasync",
        "sb.restore() after an add call (8 MiB sandbox)",
        samples,
        baseline=True,
    )


def bench_create(guest: Path, counts: Counts) -> Row:
    """``Sandbox(path)`` once the process has created one (``close()`` untimed)."""
    Sandbox(guest).close()  # the per-process template exists from here on
    samples: list[float] = []
    clock = time.perf_counter_ns
    for i in range(counts.fresh_warmup + counts.creates):
        with gc_off():
            start = clock()
            sb = Sandbox(guest)
            elapsed = clock() - start
        sb.close()
        if i >= counts.fresh_warmup:
            samples.append(elapsed)
    return Row(
        CATEGORY,
        "fresh.hlasync_create",
        "hlasync",
        "Sandbox(path) create, warm (8 MiB)",
        samples,
    )


def bench_wasmtime_instance(counts: Counts) -> Row:
    key, peer = "fresh.wasmtime", "wasmtime"
    label = "Store + Instance of a precompiled Module (8 MiB memory)"
    reason = _wasm.missing()
    if reason is not None:
        return skipped(CATEGORY, key, peer, label, reason)
    import wasmtime  # type: ignore[import-not-found, unused-ignore]

    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, _wasm.WAT)

    def instantiate() -> wasmtime.Instance:
        store = wasmtime.Store(engine)
        return wasmtime.Instance(store, module, [])

    samples: list[float] = []
    clock = time.perf_counter_ns
    for i in range(counts.fresh_warmup + counts.instances):
        with gc_off():
            start = clock()
            instance = instantiate()
            elapsed = clock() - start
        del instance
        if i >= counts.fresh_warmup:
            samples.append(elapsed)
    store = wasmtime.Store(engine)
    add = wasmtime.Instance(store, module, []).exports(store)["add"]
    assert isinstance(add, wasmtime.Func)
    if add(store, 1, 2) != 3:
        raise BenchError("wasmtime add(1, 2) != 3")
    return Row(CATEGORY, key, peer, label, samples)


def _fork_once() -> tuple[int, int]:
    """Fork a child that signals readiness over a pipe and exits.

    Returns (ns until the parent read the ready byte, ns until it reaped the child).
    """
    read_end, write_end = os.pipe()
    clock = time.perf_counter_ns
    try:
        start = clock()
        pid = os.fork()
        if pid == 0:  # child: ready, then gone (no atexit handlers, no cleanup)
            os.write(write_end, b"r")
            os._exit(0)
        ready = os.read(read_end, 1)
        ready_at = clock()
        _, status = os.waitpid(pid, 0)
        reaped_at = clock()
    finally:
        os.close(read_end)
        os.close(write_end)
    if ready != b"r" or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise BenchError(f"forked child failed (ready {ready!r}, status {status})")
    return ready_at - start, reaped_at - start


def bench_fork(counts: Counts) -> Row:
    ready: list[float] = []
    reaped: list[float] = []
    for i in range(counts.fresh_warmup + counts.forks):
        with gc_off():
            to_ready, to_reaped = _fork_once()
        if i >= counts.fresh_warmup:
            ready.append(to_ready)
            reaped.append(to_reaped)
    row = Row(
        CATEGORY,
        "fresh.fork",
        "os.fork()",
        "fork of this process until the child signals ready over a pipe",
        ready,
        extra={"reaped_samples_ns": reaped, "rss_bytes_at_fork": _rss()},
    )
    median_reaped = percentile(sorted(reaped), 50.0)
    row.notes.append(f"until reaped by waitpid: median {format_ns(median_reaped)}")
    return row


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run(guest: Path, counts: Counts) -> list[Row]:
    create = bench_create(guest, counts)
    return [
        bench_restore(guest, counts),
        create,
        bench_wasmtime_instance(counts),
        bench_fork(counts),
    ]
