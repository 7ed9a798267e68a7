"""The QuickJS engine built as a guest: the language runs, the libc behaves,
limits end in JavaScript errors rather than crashes, and no system call
instruction is linked in.

Most tests use ``jsprobe.c``, a glue of their own linked exactly like the
bundled ``jsruntime`` (same engine, libc and flags), so they keep testing the
build when jsruntime's glue changes.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hlasync import GuestAborted, HostFunctionError, Sandbox, SandboxConfig, guests
from hlasync._build import build_js_guest
from hlasync.kvm import Kvm
from tests.conftest import require_tool

#: Enough for the engine and these tests (see docs/javascript-build.md for sizes).
CONFIG = SandboxConfig(memory_size=24 << 20, heap_size=16 << 20)
NOW = 1_700_000_000.25  # what the host clock says in these tests


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("jsprobe") / "jsprobe.elf"
    return build_js_guest([Path(__file__).with_name("jsprobe.c")], output)


def start(sb: Sandbox, memory_limit: int = 0, max_stack: int = 0) -> Sandbox:
    sb.register_host_function("__hl_clock", lambda: NOW)
    assert sb.call("js_start", memory_limit, max_stack) == 0
    return sb


@pytest.fixture
def js(kvm: Kvm, probe: Path) -> Iterator[Sandbox]:
    with Sandbox(probe, config=CONFIG) as sb:
        yield start(sb)


def text(sb: Sandbox, name: str, *args: int | float | str) -> str:
    result = sb.call(name, *args)
    assert isinstance(result, str)
    return result


def evaluate(sb: Sandbox, source: str) -> Any:
    reply = json.loads(text(sb, "js_eval", source))
    if "error" in reply:
        return ("error", reply["error"])
    return reply.get("result")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("(2 ** 53 + 2) % 7 + 40 / 8", (2**53 + 2) % 7 + 40 / 8),
        ("'Straße'.toUpperCase() + 'abc'.padStart(5, '-')", "STRASSE--abc"),
        ("[10, 9, 1].sort().join()", "1,10,9"),
        ("JSON.parse('{\"a\": [1, 2.5, null]}').a", [1, 2.5, None]),
        ("/(\\d+)-(\\p{L}+)/u.exec('x 12-été y').slice(1)", ["12", "été"]),
        ("'a1b22c333'.replace(/\\d+/g, m => m.length)", "a1b2c3"),
        ("String(0.1 + 0.2) + ' ' + (1e21).toString() + ' ' + (123.456).toFixed(1)", None),
        ("parseFloat('3.25e-5') * 2", 6.5e-5),
        ("(2n ** 70n).toString()", str(2**70)),
        ("[...new Set([3, 1, 3])].map(x => x * 2)", [6, 2]),
        ("Object.entries({b: 1, a: 2}).flat()", ["b", 1, "a", 2]),
    ],
)
def test_the_language_and_its_builtins(js: Sandbox, source: str, expected: Any) -> None:
    result = evaluate(js, source)
    if expected is None:  # number formatting (dtoa, musl's printf)
        assert result == "0.30000000000000004 1e+21 123.5"
    else:
        assert result == expected


def test_math_matches_the_host_libm(js: Sandbox) -> None:
    names = ["sin", "cos", "tan", "exp", "log", "log2", "log10", "sqrt", "cbrt", "atan", "tanh"]
    values = [0.5, 1.0, 2.75, 10.0, 123.456]
    results = evaluate(js, f"{values}.map(v => [{', '.join(f'Math.{n}(v)' for n in names)}])")
    for value, row in zip(values, results, strict=True):
        for name, got in zip(names, row, strict=True):
            assert got == pytest.approx(getattr(math, name)(value), rel=1e-15), (name, value)
    assert evaluate(
        js, "[Math.pow(2, 0.5), Math.hypot(3, 4), Math.round(2.5), Math.floor(-0.5)]"
    ) == [
        math.sqrt(2),
        5,
        3,
        -1,
    ]


def test_dates_use_the_host_clock_in_utc(js: Sandbox) -> None:
    assert evaluate(js, "Date.now()") == NOW * 1000
    assert evaluate(js, "new Date().toISOString()") == "2023-11-14T22:13:20.250Z"
    assert evaluate(js, "new Date(2020, 5, 1).getTimezoneOffset()") == 0
    assert evaluate(js, "new Date(0).toString()") == "Thu Jan 01 1970 00:00:00 GMT+0000"


def test_the_clock_is_a_host_call(kvm: Kvm, probe: Path) -> None:
    with Sandbox(probe, config=CONFIG) as sb:
        # Making a context seeds Math.random from the clock: without `__hl_clock`
        # registered, the call fails as any host call to a missing function does.
        with pytest.raises(HostFunctionError, match="__hl_clock"):
            sb.call("js_start", 0, 0)
        sb.restore()
        ticks = iter(range(1000, 2000, 5))
        sb.register_host_function("__hl_clock", lambda: float(next(ticks)))
        assert sb.call("js_start", 0, 0) == 0
        first, second = evaluate(sb, "[Date.now(), Date.now()]")
        assert 1000_000 <= first < second < 2000_000


def test_exceptions_carry_name_message_and_stack(js: Sandbox) -> None:
    _, error = evaluate(js, "function thrower() { throw new TypeError('boom') }\nthrower()")
    assert (error["name"], error["message"]) == ("TypeError", "boom")
    assert "at thrower (<eval>:1:" in error["stack"]
    _, error = evaluate(js, "let x = ;")
    assert error["name"] == "SyntaxError"


@pytest.mark.parametrize(
    "source",
    [
        "(function f() { f() })()",
        "(function f(n) { return [n].map(() => f(n + 1)) })(0)",
        "JSON.parse('['.repeat(200000))",
        "eval('('.repeat(200000) + '1' + ')'.repeat(200000))",
        "let o = {}; for (let i = 0; i < 100000; i++) o = {o}; JSON.stringify(o)",
        "/(a|b)*c/.test('ab'.repeat(200000))",
    ],
)
def test_deep_recursion_is_a_javascript_error(js: Sandbox, source: str) -> None:
    result = evaluate(js, source)
    # The regexp engine backtracks on a heap stack: it may succeed or run out of memory.
    if result is not False:
        kind, error = result
        assert kind == "error"
        assert error["name"] in ("RangeError", "InternalError", "SyntaxError")
        assert re.search("stack|recursion|memory in regexp", error["message"]), error
    assert evaluate(js, "1 + 1") == 2  # the sandbox goes on working


# Both grow in 1 MiB steps: the allocation that fails is a big one, so there is
# room left for the error object. (When even that cannot be made, QuickJS
# throws null instead.) In a function, so that what it grew is garbage once
# the error is thrown.


def test_memory_limit_is_an_out_of_memory_error(kvm: Kvm, probe: Path) -> None:
    with Sandbox(probe, config=CONFIG) as sb:
        start(sb, memory_limit=4 << 20)
        grow = "(() => { let a = []; for (;;) a.push('x'.repeat(1 << 20) + a.length) })()"
        _, error = evaluate(sb, grow)
        assert (error["name"], error["message"]) == ("InternalError", "out of memory")
        assert evaluate(sb, "'still ' + 'alive'") == "still alive"


def test_a_full_heap_is_an_out_of_memory_error(kvm: Kvm, probe: Path) -> None:
    # No engine limit: the guest heap (4 MiB) runs out and malloc returns NULL.
    config = SandboxConfig(memory_size=8 << 20, heap_size=4 << 20)
    with Sandbox(probe, config=config) as sb:
        start(sb)
        grow = "(() => { let a = []; for (;;) a.push(new Float64Array(1 << 17)) })()"
        _, error = evaluate(sb, grow)
        assert (error["name"], error["message"]) == ("InternalError", "out of memory")
        assert evaluate(sb, "6 * 7") == 42


def test_printf_reaches_the_sandbox_output(kvm: Kvm, probe: Path) -> None:
    printed: list[str] = []
    with Sandbox(probe, config=CONFIG, output=printed.append) as sb:
        assert sb.call("libc_print", "hello", 0.25) == len("out hello 0.25|err 2.500e-01|")
    assert "".join(printed) == "out hello 0.25|err 2.500e-01|!\n"


def test_libc_functions(js: Sandbox) -> None:
    assert js.call("libc_format", 1 / 3, 255) == (
        "0.33333333333333331 0.333333 3.333333e-01     0.3333 255  | ff s"
    )
    assert js.call("libc_strtod", "  -1.5e300xyz") == -1.5e300
    assert js.call("libc_strtod", "0x1p-3") == 0.125
    assert js.call("libc_qsort", "hlasync") == "achlnsy"
    assert js.call("libc_localtime", 951782400) == "2000-02-29 00:00:00 59 2 0"
    realtime, _ = map(int, text(js, "libc_clocks").split())
    assert realtime == 1_700_000_000_250_000_000


def test_the_monotonic_clock_never_goes_back(kvm: Kvm, probe: Path) -> None:
    with Sandbox(probe, config=CONFIG) as sb:
        times = iter([5.0, 5.0, 4.0, 4.0, 6.0, 6.0])  # the host's clock steps back once
        sb.register_host_function("__hl_clock", lambda: next(times))
        steps = [int(text(sb, "libc_clocks").split()[1]) for _ in range(3)]
        assert steps[1] == 0 and steps[2] == 1_000_000_000


def test_abort_is_a_guest_abort(js: Sandbox) -> None:
    with pytest.raises(GuestAborted) as info:
        js.call("libc_abort")
    assert (info.value.code, info.value.guest_message) == (-4, "abort() called")


def _system_call_instructions(elf: Path) -> list[str]:
    objdump = require_tool("objdump")
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(elf)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "<js_eval>:" in listing or "<hl_main>:" in listing  # it did disassemble
    return [
        line
        for line in listing.splitlines()
        if re.search(r"\t(syscall|sysenter|int\s+\$0x80)", line)
    ]


def test_no_system_call_instruction_is_linked(probe: Path) -> None:
    # A guest has no kernel to call: a stray `syscall` would fault (#UD or #GP).
    assert _system_call_instructions(probe) == []
    assert _system_call_instructions(guests.path("jsruntime")) == []
