"""A hot ``JSSandbox`` (``config=default_config(heap, hot_restore=True)``): its
guest parks after each handler call and the restore to the loaded state is
done in place, with no VM exit. Every call still starts from that state, a
hung handler still stops at its limit with its JavaScript stack, and what a
hot restore cannot do (another snapshot, a stopped call) takes the exit path.
(CI also runs every JavaScript test with ``HLASYNC_HOT_RESTORE=1``.)"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from hlasync import GuestTimeout, SandboxConfig
from hlasync.js import JSSandbox, runtime
from hlasync.kvm import Kvm
from tests.sandbox.test_hot_restore import InPlace

HEAP = 8 << 20
SECRET = (
    "import { seen } from 'host';\n"
    "export function handler(e) {\n"
    "  globalThis.calls = (globalThis.calls || 0) + 1;\n"
    "  globalThis.kept = [e.secret.repeat(64), Array.from(e.secret, (c) => c + '!')];\n"
    "  return [globalThis.calls, seen(e.secret)]\n"
    "}"
)
LOOP = "function spin(n) {\n  while (true) { n++ }\n}\nfunction handler(e) { return spin(0) }"


def hot_config() -> SandboxConfig:
    return runtime.default_config(HEAP, hot_restore=True, spin=0.2)


@pytest.fixture
def hot(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox(heap_size=HEAP, config=hot_config()) as js:
        yield js


def memory(js: JSSandbox) -> bytes:
    guest = js.sandbox._machine.memory
    assert guest is not None
    return bytes(guest.view)


def test_each_call_starts_from_the_loaded_state_restored_in_place(
    hot: JSSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler's globals are gone after each call, and the secret it spread
    over the heap is in guest memory during the call (the host function looks)
    and nowhere in it after the restore, which was done in the park."""
    spy = InPlace(monkeypatch)
    during: list[bool] = []
    hot.register_host_function(
        "host", "seen", lambda secret: during.append(secret.encode() in memory(hot))
    )
    hot.add_handler("keep", SECRET)
    hot.load()
    for i in range(30):
        secret = f"S3CR3T-{i:04d}-{random.getrandbits(48):012x}"
        assert hot.call_handler("keep", {"secret": secret}) == [1, None]
        assert secret.encode() not in memory(hot), f"call {i}'s secret survived"
    assert during == [True] * 30
    # Most restores were done in the park (a guest whose thread lost the CPU
    # as it parked, or whose spin ended, takes the exit path now and then).
    assert spy.count >= 15


def test_an_ordinary_jssandbox_restores_on_the_exit_path(
    kvm: Kvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = InPlace(monkeypatch)
    config = runtime.default_config(HEAP, hot_restore=False)
    with JSSandbox(heap_size=HEAP, config=config) as js:
        js.add_handler("echo", "function handler(e) { return e }")
        js.load()
        for i in range(20):
            assert js.call_handler("echo", {"i": i}) == {"i": i}
    assert spy.count == 0


@pytest.mark.parametrize("limit", ["timeout", "cpu_timeout"])
def test_a_hung_handler_of_a_hot_sandbox_stops_with_its_stack(hot: JSSandbox, limit: str) -> None:
    hot.add_handler("loop", LOOP)
    hot.add_handler("ok", "function handler(e) { return e.n + 1 }")
    hot.load()
    for n in range(20):  # hot by now
        assert hot.call_handler("ok", {"n": n}) == n + 1
    with pytest.raises(GuestTimeout) as info:
        if limit == "timeout":
            hot.call_handler("loop", {}, timeout=0.3)
        else:
            hot.call_handler("loop", {}, cpu_timeout=0.3)
    assert info.value.js_stack is not None and "at spin (loop.js:2" in info.value.js_stack
    assert hot.call_handler("ok", {"n": 41}) == 42  # restored after the stop


def test_snapshots_of_a_hot_sandbox(hot: JSSandbox) -> None:
    """restore(snapshot) of another state takes the exit path; calls go on hot."""
    counter = "function handler(e) { globalThis.n = (globalThis.n || 0) + 1; return globalThis.n }"
    hot.add_handler("count", counter)
    hot.load()
    assert [hot.call_handler("count", {}) for _ in range(3)] == [1, 1, 1]
    saved = hot.snapshot()
    hot.restore(saved)
    assert [hot.call_handler("count", {}) for _ in range(3)] == [1, 1, 1]


def test_a_config_too_small_for_the_heap_is_refused(kvm: Kvm) -> None:
    from hlasync import ConfigError

    with pytest.raises(ConfigError, match=r"8 MiB, too small for a JS heap of 32 MiB"):
        JSSandbox(config=SandboxConfig(hot_restore=True))


def test_cpu_timeout_of_a_hot_call_counts_the_guest_not_the_wait(hot: JSSandbox) -> None:
    """On the doorbell the caller polls for the answer; that polling is the
    guest's time seen from the caller, and a CPU-time limit must not charge it
    twice: the guest gets its whole cpu_timeout (before: about 12% less)."""
    hot.add_handler("loop", LOOP)
    hot.add_handler("ok", "function handler(e) { return 1 }")
    hot.load()
    owner = hot.sandbox._machine.vcpu.owner.ident
    assert owner is not None
    clock = time.pthread_getcpuclockid(owner)
    for _ in range(3):
        for _ in range(20):  # hot again after the last stop
            hot.call_handler("ok", {})
        assert hot.sandbox._hot is not None and hot.sandbox._hot.running
        before = time.clock_gettime(clock)
        with pytest.raises(GuestTimeout):
            hot.call_handler("loop", {}, cpu_timeout=0.5)
        guest = time.clock_gettime(clock) - before
        assert guest >= 0.48, f"the guest ran {guest:.3f} s of its 0.5 s"
