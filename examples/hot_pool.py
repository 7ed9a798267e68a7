"""Hot pools: fresh state for every call without a VM exit.

Run it from a checkout (needs /dev/kvm)::

    python examples/hot_pool.py

A pool restores its member after every call, so that no call sees what the
one before it left. An ordinary pool does that on the exit path: the guest
stops, the host copies back the pages the call wrote and sets every
register. A *hot* pool (``SandboxConfig(hot_restore=True)``) keeps its
members' guests running: after each call the guest runtime parks in
``hl_park``, which resets its registers, flags and x87/SSE/AVX state
itself, and the host copies the pages back around it. The next call is
posted on the doorbell page: no ``KVM_RUN`` returns at all.

The registers are reset by guest code, so a hot pool trusts the guest's
runtime: use it for guests whose machine code you trust (your own C guests,
the bundled JavaScript runtime running tenants' JavaScript), an ordinary
pool for guest binaries you do not. ``create_js_pool(...,
config=default_config(heap, hot_restore=True))`` makes a hot JavaScript pool, and
``JSSandbox(config=default_config(heap, hot_restore=True))`` a JavaScript
sandbox restored in place.
"""

from __future__ import annotations

import statistics
import time

import anyio

from hlasync import SandboxConfig, guests
from hlasync.js import JSSandbox, default_config
from hlasync.supervisor import Pool, Supervisor


async def p50_us(pool: Pool, n: int = 1000) -> float:
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        assert await pool.call("add", i, 1) == i + 1
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


async def main() -> None:
    guest = guests.path("simpleguest")
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(guest, size=2)
        hot = await sup.create_pool(guest, size=2, config=SandboxConfig(hot_restore=True))

        # Fresh state in both: increment() counts in guest memory, and every
        # call starts from the pool's snapshot again.
        print("pool:     increment x3 ->", [await pool.call("increment") for _ in range(3)])
        print("hot pool: increment x3 ->", [await hot.call("increment") for _ in range(3)])

        for which in (pool, hot):  # warm up: a hot pool's members start spinning
            await p50_us(which, 200)
        await anyio.sleep(0.03)
        exit_path = await p50_us(pool)
        await anyio.sleep(0.03)
        in_place = await p50_us(hot)
        print(f"await pool.call('add'), pool:     p50 {exit_path:6.1f} us")
        print(f"await pool.call('add'), hot pool: p50 {in_place:6.1f} us")
        print(f"hot / ordinary: {in_place / exit_path:.2f}x")

        # A JavaScript pool is hot the same way: each handler call starts from
        # the loaded snapshot (its globals are gone), restored in place.
        counter = (
            "function handler(e) { globalThis.n = (globalThis.n || 0) + 1; return globalThis.n }"
        )
        js = await sup.create_js_pool(
            {"count": counter},
            size=1,
            heap_size=8 << 20,
            config=default_config(8 << 20, hot_restore=True),
        )
        print("hot JS pool: count x3 ->", [await js.call_handler("count", {}) for _ in range(3)])

    # A JSSandbox (synchronous) restores in place the same way.
    with JSSandbox(heap_size=8 << 20, config=default_config(8 << 20, hot_restore=True)) as sync:
        sync.add_handler("count", counter)
        sync.load()
        print("hot JSSandbox: count x3 ->", [sync.call_handler("count", {}) for _ in range(3)])


if __name__ == "__main__":
    anyio.run(main)
