"""``JSSandbox(keep_state=True)``: hyperlight-js's model of handler state.

Handlers keep their state between calls; a call that does not complete (a
timeout, ``interrupt()``, a crash) poisons the sandbox until ``restore()``,
``unload()`` or ``load()``; snapshots bring back handlers and state. The
default (fresh state for every call) and pools are unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from hlasync import (
    CallError,
    FunctionNotFound,
    GuestCancelled,
    GuestCrashed,
    GuestTimeout,
    JSError,
    JSSyntaxError,
    SandboxBusy,
    SandboxPoisoned,
    Supervisor,
)
from hlasync.js import JSSandbox, JSSnapshot
from hlasync.js import sandbox as js_sandbox
from hlasync.kvm import Kvm
from hlasync.sandbox import Sandbox

COUNTER = "let count = 0;\nfunction handler(event) { count += 1; return count }"
GLOBAL_COUNTER = (
    "function handler(e) { globalThis.n = (globalThis.n || 0) + 1; return globalThis.n }"
)
THROWS = "let count = 0;\nfunction handler(e) { count += 1; throw new Error('call ' + count) }"
SPIN = "function handler(e) { while (true) {} }"
#: Busy for ``event.ms`` milliseconds of the host's clock, then returns its call count.
BURN = """let calls = 0;
function handler(event) {
  calls += 1;
  const start = Date.now();
  while (Date.now() - start < event.ms) {}
  return calls;
}
"""
REFUSED = r"JS sandbox .* is poisoned: handler 'spin' did not complete \({}\)"


@pytest.fixture
def kept(kvm: Kvm) -> Iterator[JSSandbox]:
    """A state-keeping sandbox with COUNTER loaded as "count" and SPIN as "spin"."""
    with JSSandbox(heap_size=8 << 20, keep_state=True) as js:
        js.add_handler("count", COUNTER)
        js.add_handler("spin", SPIN)
        js.load()
        yield js


def _count(js: JSSandbox, name: str = "count") -> int:
    result = js.call_handler(name, {})
    assert isinstance(result, int)
    return result


def _interrupt_when_running(js: JSSandbox) -> threading.Thread:
    """A thread that calls ``js.interrupt()`` once a call runs (for 10 s at most)."""

    def interrupt() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if js.current_call is not None:
                time.sleep(0.05)  # into the handler's loop
                if js.interrupt():
                    return
            time.sleep(0.005)

    thread = threading.Thread(target=interrupt)
    thread.start()
    return thread


def _assert_refused(js: JSSandbox, error: str) -> None:
    """Poisoned: calls and snapshot() raise SandboxPoisoned saying why and what helps."""
    assert js.poisoned
    with pytest.raises(SandboxPoisoned, match=REFUSED.format(error)) as info:
        js.call_handler("count", {})
    assert "restore(snapshot), restore() (the state load() left), unload() or load()" in str(
        info.value
    )
    with pytest.raises(SandboxPoisoned):
        js.snapshot()


# ------------------------------------------------------------------ state kept
def test_handlers_keep_their_state_between_calls(kept: JSSandbox) -> None:
    assert kept.keep_state is True
    kept.add_handler("global", GLOBAL_COUNTER)
    kept.load()
    assert [_count(kept) for _ in range(3)] == [1, 2, 3]
    assert [_count(kept, "global") for _ in range(2)] == [1, 2]
    kept.load()  # a fresh engine: every handler starts over
    assert [_count(kept), _count(kept, "global")] == [1, 1]


def test_a_handler_error_keeps_the_state_and_does_not_poison(kept: JSSandbox) -> None:
    kept.add_handler("throws", THROWS)
    kept.load()
    for expected in ("call 1", "call 2"):
        with pytest.raises(JSError) as info:
            kept.call_handler("throws", {})
        assert info.value.js_message == expected
    assert not kept.poisoned
    assert _count(kept) == 1


def test_add_handler_leaves_the_state_as_it_was(kept: JSSandbox) -> None:
    assert [_count(kept), _count(kept)] == [1, 2]
    with pytest.raises(JSSyntaxError):
        kept.add_handler("broken", "function handler(e) { return ) }")
    assert kept.loaded and _count(kept) == 3  # compiling it in the guest changed nothing
    kept.add_handler("other", COUNTER)
    assert not kept.loaded
    kept.remove_handler("other")
    kept.load()
    assert _count(kept) == 1


# -------------------------------------------------------------------- poisoned
@pytest.mark.parametrize("limit", ["timeout", "cpu_timeout"])
def test_a_timeout_poisons_until_restore(kept: JSSandbox, dump_dir: Path, limit: str) -> None:
    limits: dict[str, Any] = {limit: 0.2}
    assert [_count(kept), _count(kept)] == [1, 2]
    snapshot = kept.snapshot()
    assert _count(kept) == 3
    with pytest.raises(GuestTimeout) as info:
        kept.call_handler("spin", {}, **limits)
    assert info.value.kind == ("wall" if limit == "timeout" else "cpu")
    assert info.value.js_stack is not None and "spin.js" in info.value.js_stack
    _assert_refused(kept, "GuestTimeout")
    kept.restore(snapshot)
    assert not kept.poisoned
    assert _count(kept) == 3  # the snapshot's state: two calls made
    with pytest.raises(GuestTimeout):
        kept.call_handler("spin", {}, **limits)
    kept.restore()  # no snapshot: the state load() left
    assert not kept.poisoned
    assert _count(kept) == 1


def test_interrupt_poisons_until_unload(kept: JSSandbox) -> None:
    assert _count(kept) == 1
    interrupter = _interrupt_when_running(kept)
    try:
        with pytest.raises(GuestCancelled):
            kept.call_handler("spin", {})
    finally:
        interrupter.join()
    _assert_refused(kept, "GuestCancelled")
    kept.unload()
    assert not kept.poisoned and not kept.loaded and not kept.handlers
    with pytest.raises(SandboxBusy):
        kept.call_handler("count", {})
    kept.add_handler("count", COUNTER)
    kept.load()
    assert [_count(kept), _count(kept)] == [1, 2]


def test_a_crash_poisons_until_load(kept: JSSandbox, dump_dir: Path) -> None:
    assert _count(kept) == 1
    sandbox: Sandbox = kept.sandbox
    # Zeroed engine structures: the engine follows a null pointer.
    sandbox._write_memory(sandbox.layout.heap_addr, bytes(64 << 10))
    with pytest.raises(GuestCrashed):
        kept.call_handler("count", {})
    assert kept.poisoned
    with pytest.raises(SandboxPoisoned, match=r"handler 'count' did not complete \(GuestCrashed\)"):
        kept.call_handler("count", {})
    kept.add_handler("global", GLOBAL_COUNTER)  # host-side, compiled in a clean engine
    assert kept.poisoned  # still: nothing said the lost state may go
    with pytest.raises(SandboxPoisoned):
        kept.call_handler("count", {})
    kept.load()
    assert not kept.poisoned
    assert [_count(kept), _count(kept), _count(kept, "global")] == [1, 2, 1]


# ------------------------------------------------------------------ snapshots
def test_snapshot_and_restore_bring_back_handlers_and_state(kept: JSSandbox) -> None:
    assert _count(kept) == 1
    snapshot = kept.snapshot()
    assert isinstance(snapshot, JSSnapshot)
    assert dict(snapshot.handlers) == {"count": COUNTER, "spin": SPIN}
    kept.unload()
    kept.add_handler("other", COUNTER)
    kept.load()
    assert _count(kept, "other") == 1
    kept.restore(snapshot)
    assert dict(kept.handlers) == {"count": COUNTER, "spin": SPIN} and kept.loaded
    assert [_count(kept), _count(kept)] == [2, 3]
    with pytest.raises(FunctionNotFound):
        kept.call_handler("other", {})
    kept.restore()  # the load the snapshot descends from, not the one of "other"
    assert _count(kept) == 1


def test_a_snapshot_of_nothing_loaded_restores_no_handlers(kept: JSSandbox) -> None:
    kept.unload()
    empty = kept.snapshot()
    kept.add_handler("count", COUNTER)
    kept.load()
    kept.restore(empty)
    assert not kept.loaded and not kept.handlers
    with pytest.raises(SandboxBusy):
        kept.call_handler("count", {})


def test_a_module_changed_since_the_snapshot_needs_a_load(kept: JSSandbox) -> None:
    snapshot = kept.snapshot()
    kept.add_module("lib", "export const two = 2;")
    kept.restore(snapshot)
    assert dict(kept.handlers) == {"count": COUNTER, "spin": SPIN}
    assert not kept.loaded  # loaded without "lib"
    kept.load()
    assert kept.loaded


def test_restore_takes_only_its_own_snapshots(kept: JSSandbox, kvm: Kvm) -> None:
    with JSSandbox(heap_size=8 << 20, keep_state=True) as other:
        foreign = other.snapshot()
    with pytest.raises(ValueError, match="another JSSandbox"):
        kept.restore(foreign)
    with pytest.raises(TypeError, match="JSSnapshot"):
        kept.restore(kept.sandbox.snapshot())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- limits
def test_limits_combine_and_the_first_to_expire_wins(kept: JSSandbox, dump_dir: Path) -> None:
    with pytest.raises(GuestTimeout) as info:
        kept.call_handler("spin", {}, timeout=30, cpu_timeout=0.2)
    assert info.value.kind == "cpu" and info.value.limit == 0.2
    kept.restore()
    with pytest.raises(GuestTimeout) as info:
        kept.call_handler("spin", {}, timeout=0.2, cpu_timeout=30)
    assert info.value.kind == "wall" and info.value.limit == 0.2
    assert kept.poisoned


@pytest.mark.parametrize("limits", [{"cpu_timeout": 5.0}, {"timeout": 5.0, "cpu_timeout": 5.0}])
def test_a_cpu_limit_that_cannot_be_armed_fails_closed(
    kept: JSSandbox, monkeypatch: pytest.MonkeyPatch, limits: dict[str, Any]
) -> None:
    assert _count(kept) == 1

    def no_clock(thread: int) -> int:
        raise OSError("no CPU clock for this thread")

    monkeypatch.setattr(time, "pthread_getcpuclockid", no_clock)
    with pytest.raises(CallError, match=r"could not be armed .*no CPU clock.*did not run"):
        kept.call_handler("count", {}, **limits)
    assert not kept.poisoned
    monkeypatch.undo()
    assert _count(kept) == 2  # the refused call did not run


def test_a_wall_clock_limit_that_cannot_be_armed_fails_closed(
    kept: JSSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = threading.Thread.start

    def refuse_watch(thread: threading.Thread) -> None:
        if thread.name == "hlasync-js-watch":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_watch)
    with pytest.raises(CallError, match="can't start new thread"):
        kept.call_handler("count", {}, timeout=5.0)
    monkeypatch.undo()
    assert not kept.poisoned
    assert _count(kept) == 1


def test_a_limit_expired_before_the_call_started_still_stops_it(
    kept: JSSandbox, monkeypatch: pytest.MonkeyPatch, dump_dir: Path
) -> None:
    kept.add_handler("burn", BURN)
    kept.load()
    begin = Sandbox._begin_call

    def late(sandbox: Sandbox, function: str, *rest: object) -> object:
        time.sleep(0.1)  # the limit expires meanwhile
        return begin(sandbox, function, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(Sandbox, "_begin_call", late)
    with pytest.raises(GuestTimeout):
        kept.call_handler("burn", {"ms": 3000}, timeout=0.01)


def test_an_expired_limit_stops_the_call_without_its_stack(
    kept: JSSandbox, monkeypatch: pytest.MonkeyPatch, dump_dir: Path
) -> None:
    def broken(sandbox: Sandbox) -> object:
        raise RuntimeError("guest memory unreadable")

    monkeypatch.setattr(js_sandbox, "capture_stack", broken)
    kept.add_handler("burn", BURN)
    kept.load()
    with pytest.raises(GuestTimeout) as info:
        kept.call_handler("burn", {"ms": 3000}, timeout=0.2)
    assert info.value.js_stack is None


# ------------------------------------------------- the default, pools, options
def test_the_default_is_fresh_state_for_every_call(kvm: Kvm, dump_dir: Path) -> None:
    with JSSandbox(heap_size=8 << 20) as js:
        assert js.keep_state is False
        js.add_handler("count", COUNTER)
        js.add_handler("global", GLOBAL_COUNTER)
        js.add_handler("spin", SPIN)
        js.load()
        assert [js.call_handler("count", {}, gc=gc) for gc in (True, False, True)] == [1, 1, 1]
        assert [_count(js, "global"), _count(js, "global")] == [1, 1]
        with pytest.raises(GuestTimeout):
            js.call_handler("spin", {}, timeout=0.2)
        assert not js.poisoned  # restored at once, as after every call
        assert _count(js) == 1


def test_pools_stay_fresh(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HLASYNC_PROCESSES", "0")
    with JSSandbox(heap_size=8 << 20, keep_state=True) as js:
        js.add_handler("count", COUNTER)
        js.load()
        assert [_count(js), _count(js)] == [1, 2]

    async def pool_counts() -> list[object]:
        async with Supervisor(workers=1) as sup:
            pool = await sup.create_js_pool({"count": COUNTER}, size=1, heap_size=8 << 20)
            return [await pool.call_handler("count", {}) for _ in range(3)]

    assert anyio.run(pool_counts) == [1, 1, 1]


def test_gc_is_a_bool_and_keeps_the_state(kept: JSSandbox) -> None:
    assert [kept.call_handler("count", {}, gc=gc) for gc in (True, False, True)] == [1, 2, 3]
    with pytest.raises(TypeError, match="gc must be a bool"):
        kept.call_handler("count", {}, gc=1)  # type: ignore[arg-type]
    assert _count(kept) == 4  # the refused call did not run


def test_keep_state_is_a_bool(kvm: Kvm) -> None:
    with pytest.raises(TypeError, match="keep_state must be a bool"):
        JSSandbox(keep_state="yes")  # type: ignore[arg-type]


GARBAGE = """
let ref = null;
export function handler(event) {
  if (event.make) {
    const a = {}; const b = { a }; a.b = b;  // a cycle only a WeakRef reaches
    ref = new WeakRef(a);
    return "made";
  }
  return ref === null ? "none" : ref.deref() === undefined ? "collected" : "alive";
}
"""


@pytest.mark.parametrize("gc", [True, False])
def test_gc_collects_after_the_call_in_kept_state(kvm: Kvm, gc: bool) -> None:
    """hyperlight-js's gc flag: with keep_state, gc=True runs the collector
    after the handler, so a cycle the call left is gone by the next call;
    gc=False leaves it to the engine (a small heap does not collect by itself)."""
    js = JSSandbox(keep_state=True)
    try:
        js.add_handler("garbage", GARBAGE)
        js.load()
        assert js.call_handler("garbage", {"make": True}, gc=gc) == "made"
        assert js.call_handler("garbage", {}, gc=False) == ("collected" if gc else "alive")
    finally:
        js.close()
