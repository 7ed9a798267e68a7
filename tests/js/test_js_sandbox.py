"""JavaScript handlers in a JSSandbox, on real KVM with the bundled jsruntime guest."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hlasync import (
    ArgumentError,
    CoreDump,
    FunctionNotFound,
    GuestTimeout,
    JSError,
    JSResultError,
    JSSyntaxError,
    SandboxBusy,
)
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

GREET = "function handler(event) { event.message = 'Hello, ' + event.name; return event }"
LOOP = "function spin(n) {\n  while (true) { n++ }\n}\nfunction handler(e) { return spin(0) }"


@pytest.fixture(scope="module")
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    """One sandbox for the tests that only call handlers (each test loads its own)."""
    printed: list[tuple[str, str]] = []

    def output(level: str, text: str) -> None:
        printed.append((level, text))

    with JSSandbox(heap_size=16 << 20, output=output) as sb:
        sb.printed = printed  # type: ignore[attr-defined]
        yield sb


def _load(js: JSSandbox, **handlers: str) -> JSSandbox:
    for name in list(js.handlers):
        js.remove_handler(name)
    for name, source in handlers.items():
        js.add_handler(name, source)
    js.load()
    return js


def test_the_issue_example(js: JSSandbox) -> None:
    _load(js, greet=GREET)
    assert js.call_handler("greet", {"name": "World"}) == {
        "name": "World",
        "message": "Hello, World",
    }


@pytest.mark.parametrize(
    "event",
    [
        None,
        True,
        0,
        -1.5,
        'héllo ✓ \U0001f600 \u0000 "quotes"',
        [1, "two", [3, {"four": None}]],
        {"nested": {"deeper": {"deepest": [True, False]}}},
        2**53,
        -(2**53),
        1.7976931348623157e308,
        5e-324,
    ],
)
def test_json_values_round_trip(js: JSSandbox, event: Any) -> None:
    _load(js, echo="function handler(event) { return event }")
    result = js.call_handler("echo", event)
    assert result == event and type(result) is type(event)


def test_negative_zero_becomes_zero_as_in_json(js: JSSandbox) -> None:
    _load(js, echo="function handler(event) { return [event, Object.is(event, -0)] }")
    value, was_negative_zero = js.call_handler("echo", -0.0)
    assert was_negative_zero is True  # the engine saw -0 ...
    assert value == 0 and math.copysign(1, value) == 1  # ... JSON.stringify writes 0


def test_integers_from_events_compute_like_any_javascript_number(js: JSSandbox) -> None:
    """Integral event numbers enter the engine as int32 where they fit (a build
    adjustment, for speed): arithmetic at and past the int32 edges must not see it."""
    source = (
        "function handler(e) { return [e[0] + 1, e[1] - 1, e[2] * 2, e[3] / 2, e[4] / 2,"
        " e[0] * 4, -e[6], Object.is(-e[6], -0), e[7] % 7, 2 ** e[4] === 8, e[5] + 1 === e[5]] }"
    )
    _load(js, edges=source)
    event = [2**31 - 1, -(2**31), 2**31, 1.0, 3, 2**53, 0, 10**20]
    assert js.call_handler("edges", event) == [
        2**31,
        -(2**31) - 1,
        2**32,
        0.5,
        1.5,
        (2**31 - 1) * 4,
        0,
        True,
        float(10**20) % 7,
        True,
        True,
    ]


def test_a_one_mebibyte_event(js: JSSandbox) -> None:
    _load(js, size="function handler(e) { return [e.blob.length, e.blob.slice(-3)] }")
    blob = "x" * (1 << 20) + "end"
    assert js.call_handler("size", {"blob": blob}) == [len(blob), "end"]


def test_events_that_are_not_json_are_refused(js: JSSandbox) -> None:
    _load(js, echo="function handler(event) { return event }")
    for bad in ({1, 2}, float("nan"), b"bytes", {"key": object()}, "lone \ud800"):
        with pytest.raises(ArgumentError, match="not a JSON value"):
            js.call_handler("echo", bad)
    assert js.call_handler("echo", "still fine") == "still fine"


def test_results_that_are_not_json_are_clear_errors(js: JSSandbox) -> None:
    _load(
        js,
        nothing="function handler(e) { }",
        function="function handler(e) { return () => 1 }",
        bigint="function handler(e) { return 10n }",
        cycle="function handler(e) { const a = {}; a.a = a; return a }",
    )
    with pytest.raises(JSResultError, match="returned undefined"):
        js.call_handler("nothing", {})
    with pytest.raises(JSResultError, match="JSON"):
        js.call_handler("function", {})
    for name in ("bigint", "cycle"):
        with pytest.raises(JSError):
            js.call_handler(name, {})
    assert js.call_handler is not None


def test_a_thrown_error_keeps_its_name_message_and_stack(js: JSSandbox) -> None:
    source = (
        "function check(e) {\n"
        "  if (!e.ok)\n"
        "    throw new TypeError('not ok: ' + e.why)\n"
        "}\n"
        "function handler(e) { check(e); return 1 }"
    )
    _load(js, thrower=source)
    with pytest.raises(JSError) as info:
        js.call_handler("thrower", {"ok": False, "why": "because"})
    error = info.value
    assert error.name == "TypeError" and error.js_message == "not ok: because"
    assert "at check (thrower.js:3" in error.stack and "at handler (thrower.js:5" in error.stack
    assert error.core_path is None  # not a crash: no dump
    assert js.call_handler("thrower", {"ok": True}) == 1  # the sandbox stays usable


def test_thrown_non_errors_and_rejected_promises(js: JSSandbox) -> None:
    _load(
        js,
        string="function handler(e) { throw 'just a string' }",
        rejected="async function handler(e) { await null; throw new RangeError('later') }",
        fulfilled="async function handler(e) { await null; return e * 2 }",
    )
    with pytest.raises(JSError, match="just a string") as info:
        js.call_handler("string", 0)
    assert info.value.name == ""
    with pytest.raises(JSError) as info:
        js.call_handler("rejected", 0)
    assert info.value.name == "RangeError" and info.value.js_message == "later"
    assert js.call_handler("fulfilled", 21) == 42


def test_syntax_errors_name_the_handler_line_and_column(js: JSSandbox) -> None:
    with pytest.raises(JSSyntaxError) as info:
        js.add_handler("broken", "function handler(e) {\n  return e +\n}\n")
    error = info.value
    assert error.function == "broken" and error.file == "broken.js"
    assert error.line == 3 and error.column is not None
    assert "broken" not in js.handlers
    with pytest.raises(JSSyntaxError):
        js.add_handler("module", "export function handler(e) { return e ++ + }")


def test_a_handler_must_define_handler(js: JSSandbox) -> None:
    js.add_handler("no_handler", "function other(e) { return e }")
    with pytest.raises(JSSyntaxError, match="must define"):
        js.load()
    js.remove_handler("no_handler")


def test_bad_names_and_unknown_handlers(js: JSSandbox) -> None:
    for bad in ("", " ", "../x", "a" * 101, 5):
        with pytest.raises(ValueError):
            js.add_handler(bad, GREET)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        js.add_handler("empty", "   ")
    _load(js, greet=GREET)
    with pytest.raises(FunctionNotFound):
        js.call_handler("missing", {})
    js.add_handler("other", GREET)
    with pytest.raises(SandboxBusy, match="load"):
        js.call_handler("greet", {"name": "x"})


def test_modules_and_es_module_handlers(js: JSSandbox) -> None:
    js.add_module("math", "export const square = (x) => x * x; export const PI = 3;")
    js.add_module(
        "lib/util", "import { square } from 'math'; export const area = (r) => 3 * square(r);"
    )
    _load(
        js,
        area="import { area } from 'lib/util'; export function handler(e) { return area(e.r) }",
        script="function handler(e) { return typeof square }",
    )
    assert js.call_handler("area", {"r": 2}) == 12
    assert js.call_handler("script", {}) == "undefined"  # modules do not leak into scripts


def test_console_levels_reach_the_output(js: JSSandbox) -> None:
    printed: list[tuple[str, str]] = js.printed  # type: ignore[attr-defined]
    printed.clear()
    _load(
        js,
        talk="function handler(e) { console.log('a', 1, {b: 2}); console.info('i'); "
        "console.warn('w'); console.error('e'); console.debug('d'); return 0 }",
    )
    js.call_handler("talk", {})
    assert printed == [
        ("log", 'a 1 {"b":2}'),
        ("info", "i"),
        ("warn", "w"),
        ("error", "e"),
        ("debug", "d"),
    ]


def test_host_functions(kvm: Kvm) -> None:
    store = {"k": {"v": [1, 2]}}

    def get(key: str) -> Any:
        return store[key]

    def fail(message: str) -> None:
        raise PermissionError(message)

    with JSSandbox(heap_size=8 << 20) as js:
        js.register_host_function("db", "get", get)
        js.register_host_function("db", "fail", fail)
        js.register_host_function("db", "weird", lambda: {1, 2})
        js.add_handler(
            "use",
            "import { get, fail, weird } from 'db';\n"
            "export function handler(e) {\n"
            "  const out = { value: get(e.key) };\n"
            "  try { fail('no access') } catch (err) { out.caught = [err.name, err.message] }\n"
            "  try { weird() } catch (err) { out.weird = err.name }\n"
            "  try { get('missing') } catch (err) { out.missing = err.name }\n"
            "  return out\n"
            "}\n",
        )
        js.load()
        assert js.call_handler("use", {"key": "k"}) == {
            "value": {"v": [1, 2]},
            "caught": ["PermissionError", "no access"],
            "weird": "TypeError",
            "missing": "KeyError",
        }


def test_memory_limit_and_recursion_are_js_errors(kvm: Kvm) -> None:
    with JSSandbox(heap_size=4 << 20) as js:
        js.add_handler(
            "hog", "function handler(e) { const a = []; for (;;) a.push('x'.repeat(1e5)) }"
        )
        js.add_handler(
            "deep", "function f(n) { return f(n + 1) + 1 } function handler(e) { return f(0) }"
        )
        js.add_handler("ok", "function handler(e) { return 'fine' }")
        js.load()
        with pytest.raises(JSError) as info:
            js.call_handler("hog", {})
        assert info.value.name == "InternalError" and "memory" in info.value.js_message
        with pytest.raises(JSError) as info:
            js.call_handler("deep", {})
        assert info.value.name in ("RangeError", "InternalError")
        assert js.call_handler("ok", {}) == "fine"


def test_every_call_starts_from_the_loaded_state(js: JSSandbox) -> None:
    _load(
        js,
        count="let calls = 0; globalThis.leak = globalThis.leak || 0;\n"
        "function handler(e) {\n"
        "  calls += 1; globalThis.leak += 1; return [calls, globalThis.leak, Math.random()]\n"
        "}",
    )
    first = js.call_handler("count", {})
    second = js.call_handler("count", {})
    assert first[:2] == second[:2] == [1, 1]
    assert first[2] != second[2]  # Math.random is reseeded for every call


def test_hostile_scripts_leave_the_next_call_unaffected(js: JSSandbox) -> None:
    _load(
        js,
        pollute="function handler(e) { Object.prototype.polluted = 1; JSON.parse = () => 666;"
        " Array.prototype.push = null; return 0 }",
        huge="function handler(e) { return 'x'.repeat(2 ** 28) }",
        parse_deep="function handler(e) { return JSON.parse('['.repeat(1e6) + ']'.repeat(1e6)) }",
        return_deep="function handler(e) { let a = []; for (let i = 0; i < 1500; i++) a = [a];"
        " return a }",
        check="function handler(e) { return [({}).polluted, JSON.parse('[1]'), typeof [].push] }",
    )
    js.call_handler("pollute", {})
    with pytest.raises(JSError):
        js.call_handler("huge", {})
    with pytest.raises(JSError):
        js.call_handler("parse_deep", {})
    with pytest.raises(JSResultError, match="nests too deeply"):
        js.call_handler("return_deep", {})
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ArgumentError, match="nests too deeply"):
        js.call_handler("check", deep)
    assert js.call_handler("check", {}) == [None, [1], "function"]


def test_a_hang_is_stopped_with_its_javascript_stack_and_a_dump(kvm: Kvm, dump_dir: Path) -> None:
    with JSSandbox(heap_size=8 << 20) as js:
        js.add_handler("loop", LOOP)
        js.add_handler("ok", "function handler(e) { return 'after' }")
        js.load()
        each: tuple[dict[str, Any], ...] = ({"timeout": 0.3}, {"cpu_timeout": 0.3})
        for limits in each:
            with pytest.raises(GuestTimeout) as info:
                js.call_handler("loop", {}, **limits)
            error = info.value
            assert error.js_stack is not None and "at spin (loop.js:2" in error.js_stack
            assert error.core_path is not None
            with CoreDump.open(error.core_path) as dump:
                assert "at spin (loop.js:2" in dump.metadata["js_stack"]
                assert "at spin (loop.js:2" in dump.report()
            assert js.call_handler("ok", {}) == "after"


def test_on_demand_dump_of_a_running_handler_carries_its_stack(kvm: Kvm) -> None:
    with JSSandbox(heap_size=8 << 20) as js:
        js.add_handler("loop", "function handler(e) {\n  let i = 0\n  for (;;) { i++ }\n}")
        js.load()
        paths: list[Path] = []

        def dump_then_stop() -> None:
            while js.current_call is None:
                time.sleep(0.001)
            time.sleep(0.05)  # into the handler's loop
            paths.append(js.generate_crashdump())
            js.interrupt()

        helper = threading.Thread(target=dump_then_stop)
        helper.start()
        with pytest.raises(Exception):  # noqa: B017 - GuestCancelled, whatever stops it
            js.call_handler("loop", {})
        helper.join(10)
        with CoreDump.open(paths[0]) as dump:
            assert "at handler (loop.js:3" in dump.metadata["js_stack"]
