"""JavaScript handlers: the bundled QuickJS runtime guest, beside a C guest and
beside the same engine in-process (the PyPI ``quickjs-ng`` wheel: no
isolation at all).

Targets (issue #10): a small handler call at most 2x a C ``echo_bytes`` call of
the same JSON bytes; ``fib(25)`` in the micro-VM at most 1.3x the same code
in-process with the PyPI ``quickjs`` package (Bellard's QuickJS, measured in a
child interpreter: see :data:`QUICKJS_PEER`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .. import Sandbox, Supervisor, guests
from .._build import fetch
from ..js import JSSandbox
from ..js import runtime as js_runtime
from ._common import BenchError, Counts, Row, gc_off, skipped, time_awaits, time_calls

__all__ = ["run"]

EVENT = {"name": "World", "items": [1, 2, 3], "tags": {"a": True}}
ECHO = "function handler(event) { return event }"
FIB = (
    "function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2) }\n"
    "function handler(event) { return fib(event) }"
)
FIB_SOURCE = "function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2) }"
HEAP = 16 << 20


def _c_echo(counts: Counts) -> list[Row]:
    payload = json.dumps(EVENT, separators=(",", ":")).encode()

    def fresh() -> None:
        sb.call("echo_bytes", payload)
        sb.restore()

    with Sandbox(guests.path("simpleguest")) as sb:
        if sb.call("echo_bytes", payload) != payload:
            raise BenchError("echo_bytes returned other bytes")
        samples = time_calls(lambda: sb.call("echo_bytes", payload), counts.js_calls, 200)
        restored = time_calls(fresh, counts.js_calls, 200)
    label = f'Sandbox.call("echo_bytes", <the event\'s {len(payload)} JSON bytes>)'
    return [
        Row("js_call", "js_call.c_echo", "hlasync (C guest)", label, samples, baseline=True),
        Row(
            "js_call",
            "js_call.c_echo_restored",
            "hlasync (C guest)",
            f"{label}, then sb.restore(): the fresh state a JS call gives",
            restored,
        ),
    ]


def _js_echo(js: JSSandbox, counts: Counts, c_restored: Row) -> Row:
    if js.call_handler("echo", EVENT) != EVENT:
        raise BenchError("the echo handler returned another event")
    samples = time_calls(lambda: js.call_handler("echo", EVENT), counts.js_calls, 200)
    ratio = statistics.median(samples) / statistics.median(c_restored.samples)
    return Row(
        "js_call",
        "js_call.jssandbox",
        "hlasync JSSandbox",
        'js.call_handler("echo", small event), restored to the loaded state after each call',
        samples,
        notes=[f"target: <= 2.0x the C call; {ratio:.2f}x the C call with restore"],
    )


#: Rounds of the side-by-side JS pool measurement (each side's calls split over them).
POOL_ROUNDS = 5


async def _pool_samples(
    js: JSSandbox, hot_js: JSSandbox, n: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Side by side, in rounds: ``js.call_handler`` (synchronous, restored after
    each call), the same on a hot JSSandbox (restored in place), a JS pool's and
    a hot JS pool's ``call_handler`` (1 worker, pool of 1 each): samples (ns)
    of each."""
    sync: list[float] = []
    hot_sync: list[float] = []
    cold: list[float] = []
    hot: list[float] = []
    per_round = max(1, n // POOL_ROUNDS)
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_js_pool({"echo": ECHO}, size=1, heap_size=HEAP)
        hot_pool = await sup.create_js_pool(
            {"echo": ECHO},
            size=1,
            heap_size=HEAP,
            config=js_runtime.default_config(HEAP, hot_restore=True),
        )
        for _ in range(POOL_ROUNDS):
            sync += time_calls(lambda: js.call_handler("echo", EVENT), per_round, 10)
            await asyncio.sleep(0.03)  # the last side's hot thread stops spinning
            hot_sync += time_calls(lambda: hot_js.call_handler("echo", EVENT), per_round, 10)
            await asyncio.sleep(0.03)
            cold += await time_awaits(lambda: pool.call_handler("echo", EVENT), per_round, 10)
            await asyncio.sleep(0.03)
            hot += await time_awaits(lambda: hot_pool.call_handler("echo", EVENT), per_round, 10)
            await asyncio.sleep(0.03)
    return sync, hot_sync, cold, hot


def _pool_echo(js: JSSandbox, counts: Counts) -> list[Row]:
    config = js_runtime.default_config(HEAP, hot_restore=True)
    with JSSandbox(heap_size=HEAP, config=config) as hot_js:
        hot_js.add_handler("echo", ECHO)
        hot_js.load()
        sync, hot_sync, cold, hot = asyncio.run(_pool_samples(js, hot_js, counts.js_pool_calls))
    base = statistics.median(sync)
    rows = [
        Row(
            "js_call",
            "js_call.pool_sync",
            "hlasync JSSandbox",
            'js.call_handler("echo", small event), restored after each call '
            "(in rounds with the two pools below)",
            sync,
        ),
        Row(
            "js_call",
            "js_call.hot_sync",
            "hlasync JSSandbox",
            'js.call_handler("echo", small event) on a hot JSSandbox '
            "(hot_restore=True: restored in place)",
            hot_sync,
        ),
        Row(
            "js_call",
            "js_call.pool",
            "hlasync Supervisor",
            'await pool.call_handler("echo", small event) (1 worker, JS pool of 1)',
            cold,
        ),
        Row(
            "js_call",
            "js_call.hot_pool",
            "hlasync Supervisor",
            'await pool.call_handler("echo", small event) (1 worker, JS pool of 1, '
            "default_config(heap, hot_restore=True))",
            hot,
        ),
    ]
    rows[1].notes.append(f"{statistics.median(hot_sync) / base:.2f}x the synchronous call_handler")
    rows[2].notes.append(f"{statistics.median(cold) / base:.2f}x the synchronous call_handler")
    rows[3].notes.append(
        f"{statistics.median(hot) / base:.2f}x the synchronous call_handler of the same rounds "
        "(issue 22 target: <= 1.5x)"
    )
    return rows


def _fib_vm(js: JSSandbox, counts: Counts) -> Row:
    if js.call_handler("fib", 25) != 75025:
        raise BenchError("fib(25) != 75025 in the guest")
    samples = time_calls(lambda: js.call_handler("fib", 25), counts.js_fib, 2)
    return Row(
        "js_compute",
        "js_compute.vm",
        "hlasync JSSandbox",
        "js.call_handler('fib', 25): recursive fib in the micro-VM",
        samples,
        baseline=True,
    )


#: The PyPI ``quickjs`` package (Bellard's QuickJS), the peer issue #10 names.
#: Its module is also called ``quickjs``, like quickjs-ng's, so it cannot share
#: an environment with the bench extra: it is installed into a cache folder of
#: its own and measured in a child interpreter.
QUICKJS_PEER = "quickjs==1.19.4"
_FIB_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import quickjs
context = quickjs.Context()
context.eval(sys.argv[3])
assert context.eval("fib(25)") == 75025
samples = []
for i in range(2 + int(sys.argv[2])):
    start = time.perf_counter_ns()
    context.eval("fib(25)")
    samples.append(time.perf_counter_ns() - start)
print(json.dumps({"version": getattr(quickjs, "__version__", "?"), "samples": samples[2:]}))
"""


def _quickjs_peer() -> Path:
    """A folder holding :data:`QUICKJS_PEER` for this interpreter (pip, once)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    target = fetch.cache_root() / "bench-peers" / f"{QUICKJS_PEER.replace('==', '-')}-{tag}"
    if (target / ".complete").is_file():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--only-binary", ":all:", "--target", str(partial), QUICKJS_PEER]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise BenchError(f"pip could not install {QUICKJS_PEER}: {done.stderr.strip()[-300:]}")
    (partial / ".complete").write_text(QUICKJS_PEER)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _fib_quickjs_child(counts: Counts) -> Row:
    label = "PyPI quickjs (Bellard's QuickJS) in a child Python, no isolation: ctx.eval('fib(25)')"
    peer = f"quickjs {QUICKJS_PEER.split('==')[1]}"
    try:
        folder = _quickjs_peer()
        done = subprocess.run(
            [sys.executable, "-c", _FIB_CHILD, str(folder), str(counts.js_fib), FIB_SOURCE],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        samples = [float(x) for x in json.loads(done.stdout)["samples"]]
    except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return skipped("js_compute", "js_compute.quickjs", peer, label, str(exc))
    return Row("js_compute", "js_compute.quickjs", peer, label, samples)


def _fib_in_process(counts: Counts) -> Row:
    label = "quickjs-ng in this process (PyPI wheel, no isolation): ctx.eval('fib(25)')"
    try:
        import quickjs  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return skipped("js_compute", "js_compute.in_process", "quickjs-ng", label, "not installed")
    context = quickjs.Context()
    context.eval(FIB_SOURCE)
    if context.eval("fib(25)") != 75025:
        raise BenchError("fib(25) != 75025 in-process")
    samples = time_calls(lambda: context.eval("fib(25)"), counts.js_fib, 2)
    return Row("js_compute", "js_compute.in_process", "quickjs-ng", label, samples)


def _fresh(js: JSSandbox, counts: Counts) -> list[Row]:
    restores: list[float] = []
    clock = time.perf_counter_ns
    sandbox = js.sandbox
    for _ in range(counts.js_restores):
        sandbox.call("js_call", "echo", json.dumps(EVENT).encode() + b"\0", 1, 0)
        with gc_off():
            start = clock()
            sandbox.restore()
            restores.append(clock() - start)
    loaded = sandbox.snapshot()
    sandbox._set_baseline(loaded)
    config = sandbox.config
    creates: list[float] = []
    for _ in range(counts.js_creates):
        with gc_off():
            start = clock()
            fresh = Sandbox(guests.path(js_runtime.GUEST), config)
            fresh.restore(loaded)
            creates.append(clock() - start)
        fresh.close()
    return [
        Row(
            "js_fresh",
            "js_fresh.restore",
            "hlasync",
            "restore of a JS sandbox after a handler call",
            restores,
            baseline=True,
        ),
        Row(
            "js_fresh",
            "js_fresh.create",
            "hlasync",
            "new JS sandbox from the loaded snapshot (what a pool member costs)",
            creates,
        ),
    ]


async def _throughput(window_s: float, windows: int) -> list[float]:
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_js_pool({"echo": ECHO}, size=2, heap_size=HEAP)
        rates: list[float] = []
        for _ in range(windows):
            counted = [0]

            async def client(deadline: float, counted: list[int] = counted) -> None:
                while time.perf_counter() < deadline:
                    await pool.call_handler("echo", EVENT)
                    counted[0] += 1

            started = time.perf_counter()
            await asyncio.gather(*(client(started + window_s) for _ in range(8)))
            rates.append(counted[0] / (time.perf_counter() - started))
    return rates


def _rss(counts: Counts) -> Row:
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    sandboxes = [JSSandbox(heap_size=HEAP) for _ in range(counts.js_rss_sandboxes)]
    try:
        for js in sandboxes:
            js.add_handler("echo", ECHO)
            js.load()
            js.call_handler("echo", EVENT)
        per_sandbox = (process.memory_info().rss - before) / len(sandboxes)
    finally:
        for js in sandboxes:
            js.close()
    return Row(
        "js_rss",
        "js_rss.loaded",
        "hlasync",
        f"(RSS with {len(sandboxes)} loaded JS sandboxes, each called once - RSS before) / N",
        [per_sandbox],
        baseline=True,
    )


def run(_guest: Path, counts: Counts) -> list[Row]:
    rows = _c_echo(counts)
    with JSSandbox(heap_size=HEAP) as js:
        js.add_handler("echo", ECHO)
        js.add_handler("fib", FIB)
        js.load()
        rows.append(_js_echo(js, counts, rows[1]))
        rows += _pool_echo(js, counts)
        vm = _fib_vm(js, counts)
        quickjs = _fib_quickjs_child(counts)
        if quickjs.measured:
            ratio = statistics.median(vm.samples) / statistics.median(quickjs.samples)
            vm.notes.append(f"target: <= 1.3x PyPI quickjs in-process; got {ratio:.2f}x")
        rows += [vm, _fib_in_process(counts), quickjs]
        rows += _fresh(js, counts)
    rows.append(
        Row(
            "js_throughput",
            "js_throughput.pool",
            "hlasync Supervisor",
            "2 workers, JS pool of 2, 8 concurrent tasks calling the echo handler",
            asyncio.run(_throughput(counts.throughput_window_s, counts.throughput_windows)),
            baseline=True,
        )
    )
    rows.append(_rss(counts))
    return rows
