"""JS pools under the Supervisor, on asyncio and trio."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import pytest

from hlasync import CoreDump, GuestTimeout, JSError, JSSyntaxError, Supervisor
from hlasync import events as ev
from hlasync.js import default_config
from hlasync.kvm import Kvm
from tests.sandbox.test_hot_restore import InPlace

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("supervisor_mode")]

GREET = "function handler(event) { event.message = 'Hello, ' + event.name; return event }"
LOOP = "function spin(n) {\n  while (true) { n++ }\n}\nfunction handler(e) { return spin(0) }"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_the_issue_example_and_two_hundred_concurrent_calls(kvm: Kvm) -> None:
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_js_pool({"greet": GREET}, size=4, heap_size=8 << 20)
        assert await pool.call_handler("greet", {"name": "x"}, timeout=5.0, cpu_timeout=2.0) == {
            "name": "x",
            "message": "Hello, x",
        }
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(await pool.call_handler("greet", {"name": str(i)}, timeout=10.0))

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert sorted(r["message"] for r in results) == sorted(f"Hello, {i}" for i in range(200))


async def test_fresh_state_in_every_pool_call(kvm: Kvm) -> None:
    source = (
        "function handler(e) { globalThis.seen = (globalThis.seen || 0) + 1;"
        " return globalThis.seen }"
    )
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_js_pool({"count": source}, size=1, heap_size=8 << 20)
        assert [await pool.call_handler("count", {}) for _ in range(3)] == [1, 1, 1]


async def test_host_functions_sync_and_async_and_console_events(kvm: Kvm) -> None:
    async def fetch(key: str) -> str:
        await anyio.sleep(0)
        return key.upper()

    def lookup(key: str) -> int:
        return len(key)

    source = (
        "import { fetch, lookup } from 'svc';\n"
        "export function handler(e) {\n"
        "  console.warn('asked', e.key); return [fetch(e.key), lookup(e.key)]\n"
        "}"
    )
    async with Supervisor() as sup, sup.subscribe(ev.GuestOutput) as events:
        pool = await sup.create_js_pool(
            {"use": source},
            size=2,
            heap_size=8 << 20,
            host_functions={"svc": {"fetch": fetch, "lookup": lookup}},
        )
        assert await pool.call_handler("use", {"key": "abc"}) == ["ABC", 3]
        event = await events.receive()
        assert isinstance(event, ev.GuestOutput)
        assert (event.level, event.text) == ("warn", "asked abc")


async def test_errors_from_pools(kvm: Kvm) -> None:
    async with Supervisor() as sup:
        with pytest.raises(JSSyntaxError) as info:
            await sup.create_js_pool({"bad": "function handler( {"}, size=1)
        assert info.value.function == "bad"
        pool = await sup.create_js_pool(
            {"throws": "function handler(e) { throw new Error('nope') }"}, size=1, heap_size=8 << 20
        )
        with pytest.raises(JSError, match="nope"):
            await pool.call_handler("throws", {})


async def test_hung_handlers_time_out_with_their_javascript_stack(kvm: Kvm) -> None:
    async with Supervisor(workers=2) as sup, sup.subscribe(ev.CallTimedOut) as events:
        pool = await sup.create_js_pool(
            {"loop": LOOP, "ok": "function handler(e) { return 1 }"}, size=2, heap_size=8 << 20
        )
        for limits in ({"timeout": 0.3}, {"cpu_timeout": 0.3}):
            with pytest.raises(GuestTimeout) as info:
                await pool.call_handler("loop", {}, **limits)
            error = info.value
            assert error.js_stack is not None and "at spin (loop.js:2" in error.js_stack
            assert error.core_path is not None
            with CoreDump.open(error.core_path) as dump:
                assert "at spin (loop.js:2" in dump.metadata["js_stack"]
            event = await events.receive()
            assert isinstance(event, ev.CallTimedOut) and event.js_stack == error.js_stack
        assert await pool.call_handler("ok", {}) == 1


async def test_catastrophic_regex_is_stopped_by_the_watchdog(kvm: Kvm, dump_dir: Path) -> None:
    source = "function handler(e) { return /^(a+)+$/.test('a'.repeat(40) + 'b') }"
    async with Supervisor() as sup:
        pool = await sup.create_js_pool({"regex": source}, size=1, heap_size=8 << 20)
        with pytest.raises(GuestTimeout) as info:
            await pool.call_handler("regex", {}, timeout=0.3)
        assert info.value.core_path is not None
        with CoreDump.open(info.value.core_path) as dump:
            assert "js_stack" in dump.metadata  # the stack, or why it is unavailable


@pytest.mark.threads_only
async def test_a_hot_js_pool_restores_in_place_and_keeps_no_secret(
    kvm: Kvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JS pool whose config has ``hot_restore``: its member parks after each
    handler call and is restored without a VM exit, and every call still starts
    from the loaded state: the handler's globals are gone, and the secret it
    spread over the heap is in guest memory during the call, not after it."""
    spy = InPlace(monkeypatch)
    seen: list[bool] = []
    holder: list[Any] = []

    def memory() -> bytes:
        return bytes(holder[0]._members[0]._machine.memory.view)

    def scan(secret: str) -> bool:
        seen.append(secret.encode() in memory())
        return seen[-1]

    source = (
        "import { scan } from 'host';\n"
        "export function handler(e) {\n"
        "  globalThis.seen = (globalThis.seen || 0) + 1;\n"
        "  globalThis.kept = [e.secret.repeat(64), Array.from(e.secret, (c) => c + '!')];\n"
        "  return [globalThis.seen, scan(e.secret)]\n"
        "}"
    )
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_js_pool(
            {"count": source},
            size=1,
            heap_size=8 << 20,
            config=default_config(8 << 20, hot_restore=True, spin=0.2),
            host_functions={"host": {"scan": scan}},
        )
        holder.append(pool)
        for i in range(30):
            secret = f"S3CR3T-{i:04d}-{random.getrandbits(48):012x}"
            assert await pool.call_handler("count", {"secret": secret}) == [1, True]
            with anyio.fail_after(5):  # the member's restore follows the answer
                while pool._members[0] not in pool._free:
                    await anyio.sleep(0.001)
            assert secret.encode() not in memory(), f"call {i}'s secret survived"
        assert seen == [True] * 30
    # Most restores were done in the park (a member whose thread lost the CPU
    # as it parked, or whose spin ended, takes the exit path now and then).
    assert spy.count >= 15


async def test_a_config_too_small_for_the_heap_is_refused(kvm: Kvm) -> None:
    """A plain SandboxConfig (8 MiB) under a 32 MiB heap: refused with the way
    out, not an engine that runs out of memory in the handlers."""
    from hlasync import ConfigError, SandboxConfig

    async with Supervisor() as sup:
        with pytest.raises(ConfigError, match=r"too small for a JS heap.*default_config"):
            await sup.create_js_pool({"h": GREET}, config=SandboxConfig(hot_restore=True))
        pool = await sup.create_js_pool(
            {"h": GREET}, heap_size=8 << 20, config=default_config(8 << 20, hot_restore=True)
        )
        assert await pool.call_handler("h", {"name": "y"}) == {"name": "y", "message": "Hello, y"}
