"""What a user debugging a JavaScript guest sees: gdb, lldb and ``hlasync dump
show`` on the dump of a hung handler, the line of every kind of hung loop,
engine faults, and ``hlasync js run`` from the shell."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hlasync import CoreDump, GuestCrashed, GuestTimeout, guests
from hlasync._build import fetch, jsruntime
from hlasync._build.errors import GuestBuildError
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm
from tests.conftest import require_tool, run_cli

TOOL_TIMEOUT = 60
LOOP = "function spin(n) {\n  while (true) { n++ }\n}\nfunction handler(e) { return spin(0) }"


def _tool(*command: str) -> str:
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize("limit", ["timeout", "cpu_timeout"])
def test_a_hung_handler_in_gdb_lldb_and_dump_show(kvm: Kvm, dump_dir: Path, limit: str) -> None:
    with JSSandbox(heap_size=8 << 20) as js:
        js.add_handler("loop", LOOP)
        js.load()
        with pytest.raises(GuestTimeout) as info:
            js.call_handler("loop", {}, **{limit: 0.3})  # type: ignore[arg-type]
    assert info.value.kind == ("wall" if limit == "timeout" else "cpu")
    core, stack = info.value.core_path, info.value.js_stack
    assert core is not None and core.parent == dump_dir
    assert stack is not None and "at spin (loop.js:2:3)" in stack
    elf = str(guests.path("jsruntime"))
    # The engine's frames down to the SDK's dispatcher, with source lines.
    gdb = _tool(require_tool("gdb"), "-nx", "-batch", "-ex", "bt", elf, str(core))
    assert "JS_CallInternal" in gdb and "js_call" in gdb and "hl_main" in gdb, gdb
    assert "jsruntime.c:" in gdb, gdb
    lldb = _tool(require_tool("lldb"), "--batch", "-c", str(core), elf, "-o", "bt")
    assert "jsruntime.elf`JS_CallInternal" in lldb and "jsruntime.elf`js_call" in lldb, lldb
    # hlasync dump show: the JavaScript stack and the C backtrace together.
    shown = run_cli("dump", "show", str(core))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "javascript stack:" in text and "at spin (loop.js:2:3)" in text
    assert text.index("javascript stack:") < text.index("backtrace:")
    assert "JS_CallInternal" in text[text.index("backtrace:") :]


@pytest.mark.parametrize(
    "source",
    [
        "function handler(e) {\n  while (true) {}\n}",
        "function handler(e) {\n  for (;;) {}\n}",
        "function handler(e) {\n  let x = 1\n  do {} while (x)\n}",
        "function handler(e) {\n  for (let i = 0; i >= 0; i++) {}\n}",
        "function handler(e) {\n  let i = 0\n  while (i >= 0) {\n    i = (i + 1) % 7\n  }\n}",
    ],
    ids=["while-true", "for-ever", "do-while", "for-counting", "while-body"],
)
def test_the_stack_of_a_hung_loop_names_its_line(kvm: Kvm, dump_dir: Path, source: str) -> None:
    line = next(
        n for n, text in enumerate(source.splitlines(), 1) if "while" in text or "for" in text
    )
    with JSSandbox(heap_size=8 << 20) as js:
        js.add_handler("hang", source)
        js.load()
        with pytest.raises(GuestTimeout) as info:
            js.call_handler("hang", {}, timeout=0.15)
    assert info.value.js_stack is not None
    assert f"at handler (hang.js:{line}:" in info.value.js_stack, info.value.js_stack


def test_a_fault_inside_the_engine_is_a_crash_with_a_dump(kvm: Kvm, dump_dir: Path) -> None:
    with JSSandbox(heap_size=8 << 20) as js:
        js.add_handler("ok", "function handler(e) { return e.n + 1 }")
        js.load()
        sandbox = js.sandbox
        # Zeroed engine structures: the engine follows a null pointer.
        sandbox._write_memory(sandbox.layout.heap_addr, bytes(64 << 10))
        with pytest.raises(GuestCrashed) as info:
            js.call_handler("ok", {"n": 1})
        assert info.value.core_path is not None
        with CoreDump.open(info.value.core_path) as dump:
            frames = [frame.symbol or "" for frame in dump.backtrace()]
        assert any(symbol.startswith(("JS_", "js_", "__JS_")) for symbol in frames), frames
        assert js.call_handler("ok", {"n": 1}) == 2  # restored to the loaded state


def test_js_run_from_the_shell(kvm: Kvm, dump_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "greet.js"
    script.write_text("function handler(event) { return {hello: event.name} }\n")
    done = run_cli("js", "run", str(script), "--event", '{"name": "x"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"hello": "x"}
    bad_event = run_cli("js", "run", str(script), "--event", "{nope")
    assert bad_event.returncode == 2 and "--event is not JSON" in bad_event.stderr
    missing = run_cli("js", "run", str(tmp_path / "absent.js"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    hang = tmp_path / "hang.js"
    hang.write_text("function handler(event) {\n  while (true) {}\n}\n")
    stopped = run_cli("js", "run", str(hang), "--timeout", "0.2")
    assert stopped.returncode == 1
    assert "GuestTimeout" in stopped.stderr and "at handler (hang.js:2:3)" in stopped.stderr
    assert "core dump" in stopped.stderr.lower()
    broken = tmp_path / "broken.js"
    broken.write_text("function handler(event) {\n  return )\n}\n")
    syntax = run_cli("js", "run", str(broken))
    assert syntax.returncode == 1 and "JSSyntaxError" in syntax.stderr and "2:" in syntax.stderr


def test_a_changed_engine_source_stops_the_build(tmp_path: Path) -> None:
    """The build adjusts the pinned quickjs.c; a QuickJS that moved on must not
    build silently without those adjustments."""
    pristine = fetch.fetch(fetch.QUICKJS) / "upstream-quickjs"  # cached by the install
    copy = tmp_path / "upstream-quickjs"
    copy.mkdir()
    text = (pristine / "quickjs.c").read_text(encoding="utf-8")
    (copy / "quickjs.c").write_text(text, encoding="utf-8")
    patched = jsruntime.engine_source(copy).read_text(encoding="utf-8")
    assert patched.count("sf->cur_pc = pc;") > text.count("sf->cur_pc = pc;")
    assert patched.count("emit_source_loc_at(s, loop_line, loop_col);") == 2
    (copy / "quickjs.c").write_text(text.replace("case TOK_DO:", "case TOK_DO_:"), encoding="utf-8")
    with pytest.raises(GuestBuildError, match="the pinned QuickJS changed"):
        jsruntime.engine_source(copy)
